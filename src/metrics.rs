//! `GET /metrics` on the `--listen` address, in the OpenMetrics text
//! format, encoded by `prometheus-client`: space, volumes, snapshots and
//! control requests from the node, the NBD server's I/O counts and latency
//! histograms (`sluice_nbd_*`), and the replicator's transfers, locks, lock
//! sets, lag and throttles (`sluice_repl_*`). Every series carries the
//! `node` label (the node's name).
//!
//! Every part reports [`Family`] rows read at scrape time (gauges from the
//! engine, counters from relaxed atomics); this module is the one place
//! they are encoded. A scrape costs one engine call for the space and one
//! for the volumes; nothing is cached that could go stale.

use crate::node::Node;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use sluice_replicator::scrape::{g, Family, Rows};
use std::borrow::Cow;
use std::sync::atomic::Ordering;

/// The Content-Type of what [`render`] returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One family's rows as `prometheus-client` encodes them.
#[derive(Debug)]
struct Encoded(Rows);

impl EncodeMetric for Encoded {
    fn encode(&self, mut e: MetricEncoder) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Rows::Counter(rows) => {
                for (labels, v) in rows {
                    e.encode_family(labels)?
                        .encode_counter::<NoLabelSet, u64, u64>(v, None)?;
                }
            }
            Rows::Gauge(rows) => {
                for (labels, v) in rows {
                    e.encode_family(labels)?.encode_gauge(v)?;
                }
            }
            Rows::Histogram(rows) => {
                for (labels, h) in rows {
                    e.encode_family(labels)?
                        .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
                }
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        match self.0 {
            Rows::Counter(_) => MetricType::Counter,
            Rows::Gauge(_) => MetricType::Gauge,
            Rows::Histogram(_) => MetricType::Histogram,
        }
    }
}

/// Encode `families` with the `node` label on every series.
pub fn encode(node: &str, families: Vec<Family>) -> String {
    let mut reg = Registry::with_labels(std::iter::once((
        Cow::Borrowed("node"),
        Cow::Owned(node.to_string()),
    )));
    for f in families {
        // The registry appends `_total` to counters and a full stop to help.
        let name = match f.rows {
            Rows::Counter(_) => f.name.strip_suffix("_total").unwrap_or(f.name),
            _ => f.name,
        };
        reg.register(name, f.help.trim_end_matches('.'), Encoded(f.rows));
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        out = format!("# encoding failed: {e}\n# EOF\n");
    }
    out
}

/// The whole scrape of `node`.
pub fn render(node: &Node) -> String {
    encode(&node.info.name, families(node))
}

/// The node's own families, then the NBD server's and the replicator's.
fn families(node: &Node) -> Vec<Family> {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let requests = load(&node.control_requests);
    let errors = load(&node.control_errors).min(requests);
    let result = |ok: bool| vec![("result", if ok { "ok" } else { "error" }.to_string())];
    let destructive = node
        .destructive
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|((op, ok), n)| {
            let mut l = vec![("op", op.to_string())];
            l.extend(result(*ok));
            (l, *n)
        })
        .collect();
    let mut out = vec![
        Family::gauge("sluice_up", "1 while the node serves", 1),
        Family {
            name: "sluice_control_requests_total",
            help: "Control API requests, and those that failed",
            rows: Rows::Counter(vec![(result(true), requests - errors), (result(false), errors)]),
        },
        Family {
            name: "sluice_destructive_ops_total",
            help: "Destructive control operations (deletes, breaks, lock releases, forced resyncs, retargets), audited in the log",
            rows: Rows::Counter(destructive),
        },
    ];
    if let Ok(s) = node.space() {
        let state = |v: &str| vec![("state", v.to_string())];
        out.push(Family {
            name: "sluice_pool_bytes",
            help: "Pool space by state",
            rows: Rows::Gauge(vec![
                (state("total"), g(s.total_bytes)),
                (state("used"), g(s.used_bytes)),
                (state("free"), g(s.free_bytes)),
                (state("pending_free"), g(s.pending_free_bytes)),
            ]),
        });
        out.push(Family::gauge(
            "sluice_pool_poisoned_shards",
            "Engine shards refusing writes after a device error (until restart)",
            i64::from(s.poisoned_shards),
        ));
    }
    if let Ok(vols) = node.volumes() {
        let per_vol = |name, help, f: &dyn Fn(&sluice_engine::api::VolumeInfo) -> u64| Family {
            name,
            help,
            rows: Rows::Gauge(
                vols.iter()
                    .map(|v| (vec![("volume", v.name.clone())], g(f(v))))
                    .collect(),
            ),
        };
        out.push(per_vol(
            "sluice_volume_size_bytes",
            "Provisioned size per volume",
            &|v| v.size_bytes,
        ));
        out.push(per_vol(
            "sluice_volume_used_bytes",
            "Blocks held by the live image, in bytes",
            &|v| v.used_blocks * sluice_engine::device::BLOCK_SIZE as u64,
        ));
        out.push(per_vol(
            "sluice_volume_snapshots",
            "Snapshots per volume",
            &|v| v.snapshot_count as u64,
        ));
    }
    out.extend(node.nbd_metrics.families());
    out.extend(node.repl.metrics());
    out
}
