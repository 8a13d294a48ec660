//! NBD counters for Prometheus: per operation (read, write, flush, trim,
//! write_zeroes) the requests, bytes, errors and a latency histogram;
//! connections open, accepted, and closed for protocol errors.
//!
//! Invariants: every counter is a relaxed atomic, written by the server
//! threads and read by [`NbdMetrics::families`] without locks; a histogram
//! keeps one count per bucket (not cumulative) and the encoder sums them, so
//! one request touches exactly one bucket. Latency runs from the request
//! header read to its reply written.

use sluice_replicator::scrape::{g, Family, Hist, Rows};
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
    writers: Counts<String>,
    /// Open connections per snapshot export: (volume, snapshot) -> count.
    snapshot_readers: Counts<(String, String)>,
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

/// Open connections per key (a volume's writers, a snapshot's readers).
type Counts<K> = std::sync::Mutex<std::collections::BTreeMap<K, u64>>;

/// One more connection under `key`.
fn count_up<K: Ord>(counts: &Counts<K>, key: K) {
    let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
    *c.entry(key).or_default() += 1;
}

/// One fewer; a key whose count reaches 0 goes.
fn count_down<K: Ord>(counts: &Counts<K>, key: K) {
    let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = c.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            c.remove(&key);
        }
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
        count_up(&self.writers, volume.to_string());
    }

    /// That connection ended.
    pub(crate) fn writer_closed(&self, volume: &str) {
        count_down(&self.writers, volume.to_string());
    }

    /// A connection opened an export of snapshot `snapshot` of `volume`
    /// (the volume's own space or a qtree's).
    pub(crate) fn snapshot_reader_opened(&self, volume: &str, snapshot: &str) {
        count_up(
            &self.snapshot_readers,
            (volume.to_string(), snapshot.to_string()),
        );
    }

    /// That connection ended.
    pub(crate) fn snapshot_reader_closed(&self, volume: &str, snapshot: &str) {
        count_down(
            &self.snapshot_readers,
            (volume.to_string(), snapshot.to_string()),
        );
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

    /// Every `sluice_nbd_*` family, read now (the node encodes them).
    pub fn families(&self) -> Vec<Family> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let op = |o: NbdOp| vec![("op", o.name().to_string())];
        let per_op = |name, help, f: &dyn Fn(&OpCounters) -> u64| Family {
            name,
            help,
            rows: Rows::Counter(
                NbdOp::ALL
                    .iter()
                    .map(|&o| (op(o), f(&self.ops[o.index()])))
                    .collect(),
            ),
        };
        let hist = NbdOp::ALL
            .iter()
            .map(|&o| {
                let c = &self.ops[o.index()];
                let buckets: Vec<(f64, u64)> = c
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(i, b)| {
                        let le = BUCKETS_US.get(i).map_or(f64::MAX, |&us| us as f64 / 1e6);
                        (le, load(b))
                    })
                    .collect();
                let count = buckets.iter().map(|(_, n)| n).sum();
                let h = Hist {
                    buckets,
                    sum: load(&c.latency_sum_us) as f64 / 1e6,
                    count,
                };
                (op(o), h)
            })
            .collect();
        vec![
            per_op(
                "sluice_nbd_requests_total",
                "NBD requests answered, by operation",
                &|c| load(&c.requests),
            ),
            per_op(
                "sluice_nbd_bytes_total",
                "Bytes read or written by successful NBD requests (trim and write_zeroes: bytes covered)",
                &|c| load(&c.bytes),
            ),
            per_op(
                "sluice_nbd_errors_total",
                "NBD requests answered with an error",
                &|c| load(&c.errors),
            ),
            Family {
                name: "sluice_nbd_request_duration_seconds",
                help: "NBD request latency, header read to reply sent",
                rows: Rows::Histogram(hist),
            },
            Family::gauge(
                "sluice_nbd_connections_open",
                "NBD connections open now",
                g(load(&self.connections_open)),
            ),
            Family::counter(
                "sluice_nbd_connections_total",
                "NBD connections accepted",
                load(&self.connections_total),
            ),
            Family::counter(
                "sluice_nbd_connections_protocol_errors_total",
                "NBD connections closed because the client broke the protocol",
                load(&self.connections_protocol_errors),
            ),
        ]
    }
}

/// The replicator keeps a snapshot that NBD clients read from every delete.
impl sluice_replicator::SnapshotUsers for NbdMetrics {
    fn readers(&self, volume: &str, snapshot: &str) -> u64 {
        let r = self
            .snapshot_readers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        r.get(&(volume.to_string(), snapshot.to_string()))
            .copied()
            .unwrap_or(0)
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
        let s = crate::metrics::encode("n", m.families());
        for line in [
            "sluice_nbd_requests_total{node=\"n\",op=\"read\"} 2",
            "sluice_nbd_bytes_total{node=\"n\",op=\"read\"} 4096",
            "sluice_nbd_errors_total{node=\"n\",op=\"read\"} 1",
            "sluice_nbd_requests_total{node=\"n\",op=\"write_zeroes\"} 0",
            "sluice_nbd_request_duration_seconds_bucket{node=\"n\",le=\"0.00005\",op=\"read\"} 0",
            "sluice_nbd_request_duration_seconds_bucket{node=\"n\",le=\"0.0001\",op=\"read\"} 1",
            "sluice_nbd_request_duration_seconds_bucket{node=\"n\",le=\"1.0\",op=\"read\"} 1",
            "sluice_nbd_request_duration_seconds_bucket{node=\"n\",le=\"+Inf\",op=\"read\"} 2",
            "sluice_nbd_request_duration_seconds_count{node=\"n\",op=\"read\"} 2",
            "sluice_nbd_request_duration_seconds_bucket{node=\"n\",le=\"0.00005\",op=\"flush\"} 1",
            "sluice_nbd_connections_open{node=\"n\"} 1",
            "sluice_nbd_connections_total{node=\"n\"} 2",
            "sluice_nbd_connections_protocol_errors_total{node=\"n\"} 1",
            "# TYPE sluice_nbd_request_duration_seconds histogram",
            "# EOF",
        ] {
            assert!(s.lines().any(|l| l == line), "missing {line:?} in\n{s}");
        }
        // Every sample line belongs to a family declared with # TYPE
        // (OpenMetrics: a counter's family has no `_total`).
        for l in s.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
                .trim_end_matches("_total");
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
