//! NBD counters for Prometheus: per operation (read, write, flush, trim,
//! write_zeroes) the requests, bytes, errors and a latency histogram;
//! connections open, accepted, and closed for protocol errors.
//!
//! Invariants: every counter is a relaxed atomic, written by the server
//! threads and read by [`NbdMetrics::render`] without locks; a histogram
//! keeps one count per bucket (not cumulative) and `render` sums them, so
//! one request touches exactly one bucket. Latency runs from the request
//! header read to its reply written.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The operations counted, in render order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdOp {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

impl NbdOp {
    const ALL: [NbdOp; 5] = [
        NbdOp::Read,
        NbdOp::Write,
        NbdOp::Flush,
        NbdOp::Trim,
        NbdOp::WriteZeroes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NbdOp::Read => "read",
            NbdOp::Write => "write",
            NbdOp::Flush => "flush",
            NbdOp::Trim => "trim",
            NbdOp::WriteZeroes => "write_zeroes",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds of the latency buckets, in microseconds (+Inf is implied).
const BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

#[derive(Default)]
struct OpCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    /// One per bucket of [`BUCKETS_US`] plus +Inf.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
}

/// The NBD server's metrics; share one through an `Arc`.
#[derive(Default)]
pub struct NbdMetrics {
    ops: [OpCounters; 5],
    connections_open: AtomicU64,
    connections_total: AtomicU64,
    connections_protocol_errors: AtomicU64,
    /// Connections with a writable export, per volume (a live image, not a
    /// snapshot, of a volume or qtree that is not read-only): what `snap
    /// rollback` asks before it changes a live image under a client.
    writers: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl std::fmt::Debug for NbdMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdMetrics")
            .field(
                "connections_open",
                &self.connections_open.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl NbdMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// One request finished: `bytes` moved (0 for flush), `ok` or not.
    pub fn record(&self, op: NbdOp, bytes: u64, ok: bool, latency: Duration) {
        let c = &self.ops[op.index()];
        c.requests.fetch_add(1, Ordering::Relaxed);
        if ok {
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BUCKETS_US.len());
        if let Some(b) = c.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        c.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        // Saturating: a gauge never wraps below zero.
        let _ = self
            .connections_open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// A connection opened a writable export of `volume`.
    pub(crate) fn writer_opened(&self, volume: &str) {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        *w.entry(volume.to_string()).or_default() += 1;
    }

    /// That connection ended.
    pub(crate) fn writer_closed(&self, volume: &str) {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = w.get_mut(volume) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                w.remove(volume);
            }
        }
    }

    /// NBD connections that have a writable export of `volume` (its own
    /// space or a qtree) open now.
    pub fn writers_of(&self, volume: &str) -> u64 {
        let w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        w.get(volume).copied().unwrap_or(0)
    }

    pub(crate) fn protocol_error(&self) {
        self.connections_protocol_errors
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Requests of `op` counted so far (for tests and status lines).
    pub fn requests(&self, op: NbdOp) -> u64 {
        self.ops[op.index()].requests.load(Ordering::Relaxed)
    }

    /// Connections closed because the client broke the protocol.
    pub fn protocol_errors(&self) -> u64 {
        self.connections_protocol_errors.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn connections_open(&self) -> u64 {
        self.connections_open.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition (# HELP/# TYPE lines, sluice_nbd_* names).
    pub fn render(&self, out: &mut String) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let per_op = |out: &mut String, name: &str, help: &str, f: &dyn Fn(&OpCounters) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for op in NbdOp::ALL {
                let _ = writeln!(
                    out,
                    "{name}{{op=\"{}\"}} {}",
                    op.name(),
                    f(&self.ops[op.index()])
                );
            }
        };
        per_op(
            out,
            "sluice_nbd_requests_total",
            "NBD requests answered, by operation.",
            &|c| load(&c.requests),
        );
        per_op(
            out,
            "sluice_nbd_bytes_total",
            "Bytes read or written by successful NBD requests (trim and write_zeroes: bytes covered).",
            &|c| load(&c.bytes),
        );
        per_op(
            out,
            "sluice_nbd_errors_total",
            "NBD requests answered with an error.",
            &|c| load(&c.errors),
        );
        let h = "sluice_nbd_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {h} NBD request latency, header read to reply sent."
        );
        let _ = writeln!(out, "# TYPE {h} histogram");
        for op in NbdOp::ALL {
            let c = &self.ops[op.index()];
            let mut cumulative = 0u64;
            for (i, b) in c.buckets.iter().enumerate() {
                cumulative += load(b);
                let le = match BUCKETS_US.get(i) {
                    Some(us) => format!("{}", *us as f64 / 1e6),
                    None => "+Inf".to_string(),
                };
                let _ = writeln!(
                    out,
                    "{h}_bucket{{op=\"{}\",le=\"{le}\"}} {cumulative}",
                    op.name()
                );
            }
            let _ = writeln!(
                out,
                "{h}_sum{{op=\"{}\"}} {}",
                op.name(),
                load(&c.latency_sum_us) as f64 / 1e6
            );
            let _ = writeln!(out, "{h}_count{{op=\"{}\"}} {cumulative}", op.name());
        }
        let gauge = |out: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {v}");
        };
        gauge(
            out,
            "sluice_nbd_connections_open",
            "gauge",
            "NBD connections open now.",
            load(&self.connections_open),
        );
        gauge(
            out,
            "sluice_nbd_connections_total",
            "counter",
            "NBD connections accepted.",
            load(&self.connections_total),
        );
        gauge(
            out,
            "sluice_nbd_connections_protocol_errors_total",
            "counter",
            "NBD connections closed because the client broke the protocol.",
            load(&self.connections_protocol_errors),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text() {
        let m = NbdMetrics::new();
        m.record(NbdOp::Read, 4096, true, Duration::from_micros(70));
        m.record(NbdOp::Read, 4096, false, Duration::from_secs(5));
        m.record(NbdOp::Flush, 0, true, Duration::from_micros(10));
        m.connection_opened();
        m.connection_opened();
        m.connection_closed();
        m.protocol_error();
        let mut s = String::new();
        m.render(&mut s);
        for line in [
            "sluice_nbd_requests_total{op=\"read\"} 2",
            "sluice_nbd_bytes_total{op=\"read\"} 4096",
            "sluice_nbd_errors_total{op=\"read\"} 1",
            "sluice_nbd_requests_total{op=\"write_zeroes\"} 0",
            "sluice_nbd_request_duration_seconds_bucket{op=\"read\",le=\"0.00005\"} 0",
            "sluice_nbd_request_duration_seconds_bucket{op=\"read\",le=\"0.0001\"} 1",
            "sluice_nbd_request_duration_seconds_bucket{op=\"read\",le=\"1\"} 1",
            "sluice_nbd_request_duration_seconds_bucket{op=\"read\",le=\"+Inf\"} 2",
            "sluice_nbd_request_duration_seconds_count{op=\"read\"} 2",
            "sluice_nbd_request_duration_seconds_bucket{op=\"flush\",le=\"0.00005\"} 1",
            "sluice_nbd_connections_open 1",
            "sluice_nbd_connections_total 2",
            "sluice_nbd_connections_protocol_errors_total 1",
            "# TYPE sluice_nbd_request_duration_seconds histogram",
        ] {
            assert!(s.lines().any(|l| l == line), "missing {line:?} in\n{s}");
        }
        // Every sample line belongs to a family declared with # TYPE.
        for l in s.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                s.contains(&format!("# TYPE {family} ")),
                "no TYPE for {name}"
            );
        }
        m.connection_closed();
        m.connection_closed();
        assert_eq!(m.connections_open(), 0);
    }
}
