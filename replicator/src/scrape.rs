//! Metrics as plain rows, read at scrape time: a [`Family`] is one metric
//! (name, help, kind) with one value per label set. The replicator and the
//! node's other parts say what to report; the node encodes every family in
//! one place (`src/metrics.rs`, with `prometheus-client`), adding the
//! `node` label to every series.
//!
//! Invariants: names are the exposition names (counters end in `_total`);
//! label names are static; a family's rows all have the same label names.

/// One row's labels: (name, value).
pub type Labels = Vec<(&'static str, String)>;

/// A histogram's state: per bucket (upper bound, count in that bucket, not
/// cumulative; the last bound `f64::MAX` is `+Inf`), sum and count.
#[derive(Debug, Clone, PartialEq)]
pub struct Hist {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

/// A family's rows, by kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, i64)>),
    Histogram(Vec<(Labels, Hist)>),
}

/// One metric family at scrape time.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub rows: Rows,
}

impl Family {
    /// A counter without labels.
    pub fn counter(name: &'static str, help: &'static str, v: u64) -> Family {
        Family {
            name,
            help,
            rows: Rows::Counter(vec![(Vec::new(), v)]),
        }
    }

    /// A gauge without labels.
    pub fn gauge(name: &'static str, help: &'static str, v: i64) -> Family {
        Family {
            name,
            help,
            rows: Rows::Gauge(vec![(Vec::new(), v)]),
        }
    }
}

/// The value of the row of family `name` whose labels are `labels`
/// (counters and gauges; a gauge below zero reads as 0), if there is one.
pub fn value(families: &[Family], name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    let same = |l: &Labels| {
        l.len() == labels.len()
            && l.iter()
                .zip(labels)
                .all(|((k, v), (k2, v2))| k == k2 && v == v2)
    };
    let f = families.iter().find(|f| f.name == name)?;
    match &f.rows {
        Rows::Counter(rows) => rows.iter().find(|(l, _)| same(l)).map(|(_, v)| *v),
        Rows::Gauge(rows) => rows
            .iter()
            .find(|(l, _)| same(l))
            .map(|(_, v)| u64::try_from(*v).unwrap_or(0)),
        Rows::Histogram(_) => None,
    }
}

/// A u64 as a gauge value (saturating: a gauge of bytes never wraps).
pub fn g(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
