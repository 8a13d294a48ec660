//! Result rows, the human table and the JSON report.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Measured {
    pub iops: f64,
    pub mb_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub case: String,
    /// `fio`, `device` (UringDevice alone) or `engine`; with `--shards N`
    /// also `engine x1shard` and `engine xNshard` (multi-volume cases).
    pub tool: String,
    #[serde(flatten)]
    pub m: Measured,
    /// IOPS of this row divided by fio's for the same case.
    pub ratio_to_fio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapRow {
    pub volume_size: String,
    pub snapshot_create_us_p50: f64,
    pub snapshot_create_us_max: f64,
    pub changed_blocks: u64,
    pub diff_us: f64,
    pub diff_extents: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub device: String,
    pub runtime_s: u64,
    pub rows: Vec<Row>,
    pub snapshots: Vec<SnapRow>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn fill_ratios(&mut self) {
        let fio: Vec<(String, f64)> = self
            .rows
            .iter()
            .filter(|r| r.tool == "fio")
            .map(|r| (r.case.clone(), r.m.iops))
            .collect();
        for r in self.rows.iter_mut().filter(|r| r.tool != "fio") {
            // The snapshot case compares with plain fio random writes.
            let base_case = r.case.trim_end_matches(" + snapshot/s").to_string();
            r.ratio_to_fio = fio
                .iter()
                .find(|(c, _)| *c == base_case)
                .filter(|(_, i)| *i > 0.0)
                .map(|(_, i)| r.m.iops / i);
        }
    }

    pub fn print_table(&self) {
        println!(
            "device: {}   runtime per case: {} s",
            self.device, self.runtime_s
        );
        println!();
        // The tool column widens for longer names (`engine x2shard`).
        let tw = self.rows.iter().map(|r| r.tool.len()).fold(6, usize::max);
        println!(
            "| {:<34} | {:<tw$} | {:>9} | {:>8} | {:>9} | {:>9} | {:>10} | {:>7} |",
            "case", "tool", "IOPS", "MB/s", "p50 us", "p99 us", "p99.9 us", "vs fio"
        );
        println!(
            "|{:-<36}|{:-<w$}|{:->11}|{:->10}|{:->11}|{:->11}|{:->12}|{:->9}|",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            w = tw + 2
        );
        for r in &self.rows {
            let ratio = r.ratio_to_fio.map_or("".to_string(), |x| format!("{x:.2}"));
            println!(
                "| {:<34} | {:<tw$} | {:>9.0} | {:>8.1} | {:>9.1} | {:>9.1} | {:>10.1} | {:>7} |",
                r.case, r.tool, r.m.iops, r.m.mb_s, r.m.p50_us, r.m.p99_us, r.m.p999_us, ratio
            );
        }
        if !self.snapshots.is_empty() {
            println!();
            println!(
                "| {:<12} | {:>18} | {:>18} | {:>15} | {:>10} | {:>12} |",
                "volume",
                "snap create p50 us",
                "snap create max us",
                "changed blocks",
                "diff us",
                "diff extents"
            );
            println!(
                "|{:-<14}|{:->20}|{:->20}|{:->17}|{:->12}|{:->14}|",
                "", "", "", "", "", ""
            );
            for s in &self.snapshots {
                println!(
                    "| {:<12} | {:>18.0} | {:>18.0} | {:>15} | {:>10.0} | {:>12} |",
                    s.volume_size,
                    s.snapshot_create_us_p50,
                    s.snapshot_create_us_max,
                    s.changed_blocks,
                    s.diff_us,
                    s.diff_extents
                );
            }
        }
        for n in &self.notes {
            println!("note: {n}");
        }
    }
}
