//! Refused peers in the log: one line per source and interval, not one per
//! attempt.
//!
//! Owns [`RefusalLog`], a sans-IO limiter: a refusal (its source and the
//! time) goes in, a decision comes out: log it now, saying how many
//! refusals of that source were not logged since its last line, or stay
//! quiet. The caller counts every refusal in its metrics either way.
//!
//! A source is the peer's IP address (not its port, which changes with
//! every attempt) and the node name it claimed in its Hello, if any: two
//! nodes behind one address that are refused for their own reasons each
//! get their line.
//!
//! Invariants kept: a source is logged at most once per interval; at most
//! [`SOURCES_MAX`] sources are remembered (sources whose interval passed are
//! forgotten first), refusals from sources beyond that share one overflow
//! entry, itself logged at most once per interval; so at most
//! `SOURCES_MAX + 1` lines per interval, and bounded memory, however many
//! addresses and names a flood uses. Every refusal not logged is counted
//! in the next line of its source (or of the overflow entry), unless its
//! source was forgotten after a quiet interval.

use std::collections::HashMap;

/// Most sources remembered at once.
pub const SOURCES_MAX: usize = 256;
/// Default interval between two lines of one source.
pub const INTERVAL_MS_DEFAULT: u64 = 60_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    logged_ms: u64,
    suppressed: u64,
}

impl Entry {
    /// Log now (and reset) or count one more suppressed refusal.
    fn note(&mut self, now_ms: u64, interval_ms: u64) -> Option<u64> {
        if now_ms.saturating_sub(self.logged_ms) >= interval_ms {
            self.logged_ms = now_ms;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// What to log for one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLine {
    /// Refusals of the same source not logged since its previous line.
    pub suppressed: u64,
    /// The source is one of many beyond [`SOURCES_MAX`]: the line stands
    /// for all of them.
    pub overflow: bool,
}

/// See the module docs.
#[derive(Debug)]
pub struct RefusalLog {
    interval_ms: u64,
    sources: HashMap<String, Entry>,
    overflow: Option<Entry>,
}

impl RefusalLog {
    /// A limiter that logs each source at most once per `interval_ms`.
    pub fn new(interval_ms: u64) -> Self {
        assert!(interval_ms > 0, "a refusal log interval of 0 ms");
        RefusalLog {
            interval_ms,
            sources: HashMap::new(),
            overflow: None,
        }
    }

    /// The source key of a peer at `addr` (`IP:PORT`, or any label) that
    /// claimed node name `node` (empty if it sent no Hello).
    pub fn source(addr: &str, node: &str) -> String {
        let ip = addr
            .parse::<std::net::SocketAddr>()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|_| addr.to_string());
        if node.is_empty() {
            ip
        } else {
            format!("{ip} {node}")
        }
    }

    /// A refusal of `source` at `now_ms` (a monotonic clock): `Some` when
    /// it is to be logged.
    pub fn note(&mut self, source: &str, now_ms: u64) -> Option<LogLine> {
        let interval = self.interval_ms;
        if let Some(e) = self.sources.get_mut(source) {
            return e.note(now_ms, interval).map(|suppressed| LogLine {
                suppressed,
                overflow: false,
            });
        }
        if self.sources.len() >= SOURCES_MAX {
            self.sources
                .retain(|_, e| now_ms.saturating_sub(e.logged_ms) < interval);
        }
        if self.sources.len() >= SOURCES_MAX {
            let Some(e) = &mut self.overflow else {
                self.overflow = Some(Entry {
                    logged_ms: now_ms,
                    suppressed: 0,
                });
                return Some(LogLine {
                    suppressed: 0,
                    overflow: true,
                });
            };
            return e.note(now_ms, interval).map(|suppressed| LogLine {
                suppressed,
                overflow: true,
            });
        }
        self.sources.insert(
            source.to_string(),
            Entry {
                logged_ms: now_ms,
                suppressed: 0,
            },
        );
        debug_assert!(self.sources.len() <= SOURCES_MAX);
        Some(LogLine {
            suppressed: 0,
            overflow: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    fn line(suppressed: u64) -> Option<LogLine> {
        Some(LogLine {
            suppressed,
            overflow: false,
        })
    }

    #[test]
    fn one_line_per_source_and_interval_with_the_count_of_the_rest() {
        let mut l = RefusalLog::new(MIN);
        let a = RefusalLog::source("127.0.0.1:40000", "x");
        assert_eq!(l.note(&a, 1_000), line(0), "the first refusal is logged");
        for i in 0..99 {
            // Another port of the same address is the same source.
            let again = RefusalLog::source(&format!("127.0.0.1:{}", 40001 + i), "x");
            assert_eq!(l.note(&again, 1_000 + i), None, "attempt {i} logged");
        }
        // Another source within the interval has its own line.
        let b = RefusalLog::source("127.0.0.2:40000", "x");
        assert_eq!(l.note(&b, 2_000), line(0));
        let nameless = RefusalLog::source("127.0.0.1:40000", "");
        assert_eq!(l.note(&nameless, 2_000), line(0));
        // Just before the interval ends: still quiet.
        assert_eq!(l.note(&a, 1_000 + MIN - 1), None);
        // After it: one line, counting the 100 not logged.
        assert_eq!(l.note(&a, 1_000 + MIN), line(100));
        assert_eq!(l.note(&a, 1_000 + MIN), None);
        assert_eq!(l.note(&a, 1_000 + 2 * MIN), line(1));
    }

    #[test]
    fn a_flood_of_sources_stays_bounded_and_shares_one_line() {
        let mut l = RefusalLog::new(MIN);
        let mut logged = 0;
        for i in 0..SOURCES_MAX * 4 {
            if l.note(&format!("node-{i}"), 5).is_some() {
                logged += 1;
            }
        }
        assert_eq!(
            logged,
            SOURCES_MAX + 1,
            "one line per source, one for the rest"
        );
        assert!(l.sources.len() <= SOURCES_MAX);
        // The overflow line after the interval counts the ones it stood for.
        let next = l.note("node-late", 5 + MIN);
        assert_eq!(
            next,
            Some(LogLine {
                suppressed: 0,
                overflow: false
            }),
            "sources whose interval passed are forgotten, making room"
        );
        assert_eq!(
            l.overflow.map(|e| e.suppressed),
            Some(3 * SOURCES_MAX as u64 - 1)
        );
    }
}
