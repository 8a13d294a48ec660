//! Prometheus text exposition for `GET /metrics` on the `--listen` address:
//! space, volumes, snapshots and control requests from the node, the NBD
//! server's I/O counts and latency histograms, and the replicator's
//! transfers and locks (`sluice_repl_*`).
//!
//! Gauges are read from the engine at scrape time, so a scrape costs two
//! engine calls per volume; nothing is cached that could go stale.

use crate::node::Node;
use std::fmt::Write;
use std::sync::atomic::Ordering;

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} {kind}");
}

/// Escape a label value (`\`, `"` and newlines).
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(node: &Node) -> String {
    let mut out = String::new();
    help(&mut out, "sluice_up", "gauge", "1 while the node serves.");
    let _ = writeln!(out, "sluice_up{{node=\"{}\"}} 1", label(&node.info.name));
    help(
        &mut out,
        "sluice_control_requests_total",
        "counter",
        "Control API requests, and those that failed.",
    );
    let _ = writeln!(
        out,
        "sluice_control_requests_total{{result=\"ok\"}} {}\nsluice_control_requests_total{{result=\"error\"}} {}",
        node.control_requests.load(Ordering::Relaxed) - node.control_errors.load(Ordering::Relaxed).min(node.control_requests.load(Ordering::Relaxed)),
        node.control_errors.load(Ordering::Relaxed)
    );
    help(
        &mut out,
        "sluice_destructive_ops_total",
        "counter",
        "Destructive control operations (deletes, breaks, lock releases, forced resyncs, retargets), audited in the log.",
    );
    for ((op, ok), n) in node
        .destructive
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let result = if *ok { "ok" } else { "error" };
        let _ = writeln!(
            out,
            "sluice_destructive_ops_total{{op=\"{op}\",result=\"{result}\"}} {n}"
        );
    }
    match node.space() {
        Ok(s) => {
            help(
                &mut out,
                "sluice_pool_bytes",
                "gauge",
                "Pool space by state.",
            );
            for (state, v) in [
                ("total", s.total_bytes),
                ("used", s.used_bytes),
                ("free", s.free_bytes),
                ("pending_free", s.pending_free_bytes),
            ] {
                let _ = writeln!(out, "sluice_pool_bytes{{state=\"{state}\"}} {v}");
            }
            help(
                &mut out,
                "sluice_pool_poisoned_shards",
                "gauge",
                "Engine shards refusing writes after a device error (until restart).",
            );
            let _ = writeln!(out, "sluice_pool_poisoned_shards {}", s.poisoned_shards);
        }
        Err(e) => {
            let _ = writeln!(out, "# space unavailable: {}", label(&e.to_string()));
        }
    }
    if let Ok(vols) = node.volumes() {
        help(
            &mut out,
            "sluice_volume_size_bytes",
            "gauge",
            "Provisioned size per volume.",
        );
        for v in &vols {
            let _ = writeln!(
                out,
                "sluice_volume_size_bytes{{volume=\"{}\"}} {}",
                label(&v.name),
                v.size_bytes
            );
        }
        help(
            &mut out,
            "sluice_volume_used_bytes",
            "gauge",
            "Blocks held by the live image, in bytes.",
        );
        for v in &vols {
            let _ = writeln!(
                out,
                "sluice_volume_used_bytes{{volume=\"{}\"}} {}",
                label(&v.name),
                v.used_blocks * sluice_engine::device::BLOCK_SIZE as u64
            );
        }
        help(
            &mut out,
            "sluice_volume_snapshots",
            "gauge",
            "Snapshots per volume.",
        );
        for v in &vols {
            let _ = writeln!(
                out,
                "sluice_volume_snapshots{{volume=\"{}\"}} {}",
                label(&v.name),
                v.snapshot_count
            );
        }
    }
    node.nbd_metrics.render(&mut out);
    node.repl.render_metrics(&mut out);
    out
}
