//! The run's tally and its report: counts (writes, flushes, snapshots,
//! transfers, each fault kind, each check), every violation with the seed
//! and the time, rendered as JSON or markdown (by the file's extension).
//!
//! Invariants: a violation is never dropped; the exit status is non-zero
//! iff the list is not empty (`main` checks [`Tally::violations`]).

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    pub t_secs: f64,
    pub seed: u64,
    pub check: String,
    pub what: String,
}

/// Shared by every thread of the run.
pub struct Tally {
    pub seed: u64,
    pub t0: Instant,
    counts: Mutex<BTreeMap<String, u64>>,
    violations: Mutex<Vec<Violation>>,
    events: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tally {
    pub fn new(seed: u64) -> Tally {
        Tally {
            seed,
            t0: Instant::now(),
            counts: Mutex::new(BTreeMap::new()),
            violations: Mutex::new(Vec::new()),
            events: Mutex::new(Vec::new()),
        }
    }

    pub fn secs(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    pub fn add(&self, key: &str, n: u64) {
        *lock(&self.counts).entry(key.to_string()).or_default() += n;
    }

    pub fn set(&self, key: &str, n: u64) {
        lock(&self.counts).insert(key.to_string(), n);
    }

    /// A line of the run's story, printed and kept (the fault log).
    pub fn event(&self, what: String) {
        let line = format!("[{:8.1}s] {what}", self.secs());
        eprintln!("soak: {line}");
        lock(&self.events).push(line);
    }

    pub fn violation(&self, check: &str, what: String) {
        let v = Violation {
            t_secs: (self.secs() * 10.0).round() / 10.0,
            seed: self.seed,
            check: check.to_string(),
            what,
        };
        eprintln!(
            "soak: VIOLATION [{:.1}s] seed {} {}: {}",
            v.t_secs, v.seed, v.check, v.what
        );
        lock(&self.violations).push(v);
    }

    pub fn violations(&self) -> Vec<Violation> {
        lock(&self.violations).clone()
    }

    pub fn counts(&self) -> BTreeMap<String, u64> {
        lock(&self.counts).clone()
    }

    pub fn events(&self) -> Vec<String> {
        lock(&self.events).clone()
    }
}

#[derive(Serialize)]
pub struct Report {
    pub seed: u64,
    pub command: String,
    pub minutes_asked: f64,
    pub duration_secs: f64,
    pub nodes: Vec<NodeReport>,
    pub topology: Vec<String>,
    pub counts: BTreeMap<String, u64>,
    pub not_injected: Vec<String>,
    pub violations: Vec<Violation>,
    pub events: Vec<String>,
}

#[derive(Serialize)]
pub struct NodeReport {
    pub name: String,
    pub device: String,
    pub starts: u64,
    pub final_state: String,
    pub rss_max_kib: u64,
}

impl Report {
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "# Soak report\n\n- command: `{}`\n- seed: {}\n- duration: {:.0} s (asked {} min)\n- violations: {}\n\n",
            self.command,
            self.seed,
            self.duration_secs,
            self.minutes_asked,
            self.violations.len()
        ));
        s.push_str("## Topology\n\n");
        for t in &self.topology {
            s.push_str(&format!("- {t}\n"));
        }
        s.push_str("\n## Nodes\n\n| node | device | starts | final state | max RSS (MiB) |\n| --- | --- | --- | --- | --- |\n");
        for n in &self.nodes {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:.1} |\n",
                n.name,
                n.device,
                n.starts,
                n.final_state,
                n.rss_max_kib as f64 / 1024.0
            ));
        }
        s.push_str("\n## Counts\n\n| what | count |\n| --- | --- |\n");
        for (k, v) in &self.counts {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
        s.push_str("\n## Not injected on this machine\n\n");
        for n in &self.not_injected {
            s.push_str(&format!("- {n}\n"));
        }
        s.push_str("\n## Violations\n\n");
        if self.violations.is_empty() {
            s.push_str("none\n");
        }
        for v in &self.violations {
            s.push_str(&format!(
                "- [{:.1} s] seed {} {}: {}\n",
                v.t_secs, v.seed, v.check, v.what
            ));
        }
        s.push_str("\n## Events\n\n```\n");
        for e in &self.events {
            s.push_str(e);
            s.push('\n');
        }
        s.push_str("```\n");
        s
    }
}
