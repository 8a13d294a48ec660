//! Prometheus text for the replicator (`sluice_repl_*`).
//!
//! Owns the metric names and labels; reads state, changes nothing.

use super::*;

impl Replicator {
    /// Prometheus text: `sluice_repl_*`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let st = self.mirror_status();
        let locks = self.lock_list();
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut w = |name: &str, help: &str, kind: &str, lines: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        w(
            "sluice_repl_bytes_sent_total",
            "Extent payload bytes sent to downstreams.",
            "counter",
            vec![(String::new(), c(&self.n.bytes_sent))],
        );
        w(
            "sluice_repl_bytes_received_total",
            "Extent payload bytes received from upstreams.",
            "counter",
            vec![(String::new(), c(&self.n.bytes_received))],
        );
        w(
            "sluice_repl_transfers_served_total",
            "Transfers served to downstreams.",
            "counter",
            vec![(String::new(), c(&self.n.transfers_served))],
        );
        w(
            "sluice_repl_transfer_failures_total",
            "Pulls that failed.",
            "counter",
            vec![(String::new(), c(&self.n.transfer_failures))],
        );
        w(
            "sluice_repl_deletes_refused_total",
            "Snapshot deletes refused by soft locks.",
            "counter",
            vec![(String::new(), c(&self.n.deletes_refused))],
        );
        w(
            "sluice_repl_forced_deletes_total",
            "Forced deletes of locked snapshots.",
            "counter",
            vec![(String::new(), c(&self.n.forced_deletes))],
        );
        w(
            "sluice_repl_auth_failures_total",
            "Peer connections refused by authentication.",
            "counter",
            vec![(String::new(), c(&self.n.auth_failures))],
        );
        w(
            "sluice_repl_peers_refused_total",
            "Incoming peer connections refused: a missing or wrong proof of the peer secret, or this node has no secret and accepts no peers (logged once per source and minute).",
            "counter",
            vec![(String::new(), c(&self.n.peers_refused))],
        );
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let mut transfers = Vec::new();
        let mut lag = Vec::new();
        let mut broken = Vec::new();
        for s in &st {
            let d = esc(&s.dst);
            transfers.push((format!("{{dst=\"{d}\",kind=\"full\"}}"), s.full_transfers));
            transfers.push((
                format!("{{dst=\"{d}\",kind=\"incremental\"}}"),
                s.incremental_transfers,
            ));
            if let Some(l) = s.lag_ms {
                lag.push((format!("{{dst=\"{d}\"}}"), l / 1000));
            }
            broken.push((format!("{{dst=\"{d}\"}}"), u64::from(s.state == "broken")));
        }
        w(
            "sluice_repl_transfers_total",
            "Completed transfers per relationship and kind.",
            "counter",
            transfers,
        );
        w(
            "sluice_repl_lag_seconds",
            "Age of the newest common snapshot.",
            "gauge",
            lag,
        );
        w(
            "sluice_repl_broken",
            "1 if the relationship is broken.",
            "gauge",
            broken,
        );
        let active = locks.iter().filter(|l| l.state == "active").count() as u64;
        let stale = locks.len() as u64 - active;
        w(
            "sluice_repl_locks",
            "Soft locks effective on this node.",
            "gauge",
            vec![
                ("{state=\"active\"}".into(), active),
                ("{state=\"stale\"}".into(), stale),
            ],
        );
        let sd = lock(&self.st).locks().stale_downstreams().len() as u64;
        w(
            "sluice_repl_stale_downstreams",
            "Downstreams whose lock set lease ran out.",
            "gauge",
            vec![(String::new(), sd)],
        );
        let pending = lock(&self.st).pending_sets.len() as u64;
        w(
            "sluice_repl_undelivered_lock_sets",
            "Upstreams whose latest lock set is not delivered yet.",
            "gauge",
            vec![(String::new(), pending)],
        );
    }
}
