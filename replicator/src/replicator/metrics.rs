//! The replicator's metrics (`sluice_repl_*`) as scrape-time rows
//! ([`crate::scrape::Family`]); the node encodes them.
//!
//! Owns the metric names, help texts and labels; reads state, changes
//! nothing.

use super::*;
use crate::scrape::{g, Family, Rows};

impl Replicator {
    /// Every `sluice_repl_*` family, read now.
    pub fn metrics(&self) -> Vec<Family> {
        let st = self.mirror_status();
        let locks = self.lock_list();
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = vec![
            Family::counter(
                "sluice_repl_bytes_sent_total",
                "Extent payload bytes sent to downstreams",
                c(&self.n.bytes_sent),
            ),
            Family::counter(
                "sluice_repl_bytes_received_total",
                "Extent payload bytes received from upstreams",
                c(&self.n.bytes_received),
            ),
            Family::counter(
                "sluice_repl_transfers_served_total",
                "Transfers served to downstreams",
                c(&self.n.transfers_served),
            ),
            Family::counter(
                "sluice_repl_transfer_failures_total",
                "Pulls that failed",
                c(&self.n.transfer_failures),
            ),
            Family::counter(
                "sluice_repl_deletes_refused_total",
                "Snapshot deletes refused by soft locks",
                c(&self.n.deletes_refused),
            ),
            Family::counter(
                "sluice_repl_forced_deletes_total",
                "Forced deletes of locked snapshots",
                c(&self.n.forced_deletes),
            ),
            Family::counter(
                "sluice_repl_auth_failures_total",
                "Peer connections refused by authentication",
                c(&self.n.auth_failures),
            ),
            Family::counter(
                "sluice_repl_peers_refused_total",
                "Incoming peer connections refused: a missing or wrong proof of the peer secret, or this node has no secret and accepts no peers (logged once per source and minute)",
                c(&self.n.peers_refused),
            ),
            Family::counter(
                "sluice_repl_lock_sets_sent_total",
                "Lock sets sent to upstreams (whole sets, however many frames)",
                c(&self.n.lock_sets_sent),
            ),
            Family::counter(
                "sluice_repl_lock_sets_received_total",
                "Lock sets received from downstreams",
                c(&self.n.lock_sets_received),
            ),
            Family::counter(
                "sluice_repl_lock_sets_refused_total",
                "Lock sets from downstreams refused (not exported, unknown volume, past the bound, wrong sender)",
                c(&self.n.lock_sets_refused),
            ),
        ];
        let mut transfers = Vec::new();
        let mut resumed = Vec::new();
        let mut lag = Vec::new();
        let mut last_ok = Vec::new();
        let mut broken = Vec::new();
        let mut throttle = vec![(
            vec![("scope", "node".to_string()), ("dst", String::new())],
            g(self.cfg.node_throttle_bps.unwrap_or(0)),
        )];
        for s in &st {
            let dst = || vec![("dst", s.dst.clone())];
            for (kind, n) in [
                ("full", s.full_transfers),
                ("incremental", s.incremental_transfers),
            ] {
                transfers.push((vec![("dst", s.dst.clone()), ("kind", kind.to_string())], n));
            }
            resumed.push((dst(), s.resumed_transfers));
            if let Some(l) = s.lag_ms {
                lag.push((dst(), g(l / 1000)));
            }
            if let Some(t) = &s.last_transfer {
                last_ok.push((dst(), g(t.finished_unix_ms / 1000)));
            }
            broken.push((dst(), i64::from(s.state == "broken")));
            if let Some(bps) = s.throttle_bps {
                throttle.push((
                    vec![
                        ("scope", "relationship".to_string()),
                        ("dst", s.dst.clone()),
                    ],
                    g(bps),
                ));
            }
        }
        let active = locks.iter().filter(|l| l.state == "active").count() as u64;
        let stale = locks.len() as u64 - active;
        let sd = lock(&self.st).locks().stale_downstreams().len() as u64;
        let pending = lock(&self.st).pending_sets.len() as u64;
        out.extend([
            Family {
                name: "sluice_repl_transfers_total",
                help: "Completed transfers per relationship and kind",
                rows: Rows::Counter(transfers),
            },
            Family {
                name: "sluice_repl_transfers_resumed_total",
                help: "Transfers that resumed an interrupted one from its checkpoint, per relationship",
                rows: Rows::Counter(resumed),
            },
            Family {
                name: "sluice_repl_lag_seconds",
                help: "Age of the newest common snapshot",
                rows: Rows::Gauge(lag),
            },
            Family {
                name: "sluice_repl_last_success_timestamp_seconds",
                help: "When the last successful transfer of the relationship ended (Unix time)",
                rows: Rows::Gauge(last_ok),
            },
            Family {
                name: "sluice_repl_broken",
                help: "1 if the relationship is broken",
                rows: Rows::Gauge(broken),
            },
            Family {
                name: "sluice_repl_throttle_bytes_per_second",
                help: "Replication receive rate limits: the node's (0: none) and each throttled relationship's",
                rows: Rows::Gauge(throttle),
            },
            Family {
                name: "sluice_repl_locks",
                help: "Soft locks effective on this node",
                rows: Rows::Gauge(vec![
                    (vec![("state", "active".to_string())], g(active)),
                    (vec![("state", "stale".to_string())], g(stale)),
                ]),
            },
            Family::gauge(
                "sluice_repl_stale_downstreams",
                "Downstreams whose lock set lease ran out",
                g(sd),
            ),
            Family::gauge(
                "sluice_repl_undelivered_lock_sets",
                "Upstreams whose latest lock set is not delivered yet",
                g(pending),
            ),
        ]);
        out
    }
}
