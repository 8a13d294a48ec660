//! Sizes and times as operators type and read them: `4G`, `512MiB`, `4096`;
//! `2026-11-25T10:00:00Z`. Parsing is strict: a size must be a positive
//! multiple of the 4 KiB block, and a bad one is named in the error.

use crate::error::{NodeError, Result};

const BLOCK: u64 = 4096;

/// Parse `123`, `4K`, `4KiB`, `512M`, `1G`, `2T` (binary units, case-insensitive).
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = |reason: &str| NodeError::BadSize {
        text: text.to_string(),
        reason: reason.to_string(),
    };
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(bad(
            "expected a number with an optional unit (K, M, G, T), e.g. 4G",
        ));
    }
    let n: u64 = t[..digits_end]
        .parse()
        .map_err(|_| bad("number too large"))?;
    let shift =
        unit_shift(&t[digits_end..]).ok_or_else(|| bad("unknown unit; use K, M, G, T or P"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| bad("too large"))?;
    if bytes == 0 {
        return Err(bad("must be greater than zero"));
    }
    if bytes % BLOCK != 0 {
        return Err(bad("must be a multiple of 4096 bytes (4K)"));
    }
    Ok(bytes)
}

/// A rate in bytes per second: `100M`, `1G`, `100MiB/s`, `4096` (any
/// positive number of bytes; no block multiple needed).
pub fn parse_rate(text: &str) -> Result<u64> {
    let bad = |reason: &str| NodeError::BadSize {
        text: text.to_string(),
        reason: format!("rate: {reason}"),
    };
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(bad("expected bytes per second, e.g. 100M"));
    }
    let n: u64 = t[..digits_end]
        .parse()
        .map_err(|_| bad("number too large"))?;
    let shift =
        unit_shift(&t[digits_end..]).ok_or_else(|| bad("unknown unit; use K, M, G or T"))?;
    let v = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| bad("too large"))?;
    if v == 0 {
        return Err(bad("must be greater than zero"));
    }
    Ok(v)
}

/// `30s`, `5m`, `1h`, `500ms`, `1d`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration> {
    let bad = || {
        NodeError::Invalid(format!(
            "bad duration {text:?}: expected a number and a unit (ms, s, m, h, d), e.g. 30s"
        ))
    };
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..digits_end].parse().map_err(|_| bad())?;
    let ms = match &t[digits_end..] {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" | "min" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => None,
    }
    .ok_or_else(bad)?;
    if ms == 0 {
        return Err(bad());
    }
    Ok(std::time::Duration::from_millis(ms))
}

fn unit_shift(unit: &str) -> Option<u32> {
    Some(match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return None,
    })
}

/// `1.5 GiB`, `512 MiB`, `12 KiB`, `7 B`.
pub fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC, second precision.
pub fn fmt_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (the era-based algorithm: 400-year eras of 146097 days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("2TiB").unwrap(), 2 << 40);
        for bad in [
            "",
            "G",
            "0",
            "4097",
            "1X",
            "-1G",
            "99999999999999999999",
            "1.5G",
        ] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn rates_and_durations() {
        assert_eq!(parse_rate("100M").unwrap(), 100 << 20);
        assert_eq!(parse_rate("1GiB/s").unwrap(), 1 << 30);
        assert_eq!(parse_rate("1000").unwrap(), 1000);
        assert!(parse_rate("0").is_err() && parse_rate("fast").is_err());
        assert_eq!(parse_duration("30s").unwrap().as_secs(), 30);
        assert_eq!(parse_duration("5m").unwrap().as_secs(), 300);
        assert_eq!(parse_duration("2").unwrap().as_secs(), 2);
        assert_eq!(parse_duration("250ms").unwrap().as_millis(), 250);
        for bad in ["", "0s", "5x", "s", "-1s"] {
            assert!(parse_duration(bad)
                .unwrap_err()
                .to_string()
                .contains(&format!("{bad:?}")));
        }
    }

    #[test]
    fn times() {
        assert_eq!(fmt_unix_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_unix_ms(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(fmt_unix_ms(1_795_593_600_000), "2026-11-25T08:00:00Z");
    }

    #[test]
    fn bytes() {
        assert_eq!(fmt_bytes(7), "7 B");
        assert_eq!(fmt_bytes(4096), "4 KiB");
        assert_eq!(fmt_bytes(3 << 29), "1.5 GiB");
    }
}
