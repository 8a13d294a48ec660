//! The operator commands that talk to a running node (`sluice --node ADDR
//! ...`): build a [`ControlRequest`], send it, print the result as text or,
//! with `--json`, as the node's JSON result verbatim.

use crate::control::{Client, ControlRequest};
use crate::error::{NodeError, Result};
use crate::node::{DiffView, SnapshotView, StatusView, VolumeView};
use crate::units::{fmt_bytes, fmt_unix_ms};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn parse<T: DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| NodeError::BadAnswer {
        addr: "node".into(),
        reason: e.to_string(),
    })
}

/// Send `req` to the node at `node` (presenting `token` on TCP) and print
/// the result to stdout.
pub fn run(
    node: &str,
    token: Option<&crate::auth::Token>,
    req: ControlRequest,
    json: bool,
) -> Result<()> {
    let mut client = Client::connect_as(node, token)?;
    let bar = progress_bar(&req, json);
    let result = client.call_with_progress(&req, &mut |p| {
        if let Some((b, unit)) = &bar {
            let (done, total) = match unit {
                BarUnit::Bytes => ("done_bytes", "total_bytes"),
                BarUnit::Snapshots => ("done_items", "total_items"),
            };
            b.set_length(p[total].as_u64().unwrap_or(0).max(1));
            b.set_position(p[done].as_u64().unwrap_or(0));
        }
    });
    let bar = bar.map(|(b, _)| b);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let result = result?;
    let unhealthy = matches!(req, ControlRequest::Status) && result["healthy"] == false;
    let problems = result_problems(&result);
    if json {
        crate::out!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_else(|_| result.to_string())
        );
    } else {
        print_text(req, result)?;
    }
    if unhealthy {
        return Err(NodeError::Unhealthy { problems });
    }
    Ok(())
}

fn result_problems(result: &Value) -> usize {
    result["problems"].as_array().map_or(0, Vec::len)
}

/// The text form of `req`'s result.
fn print_text(req: ControlRequest, result: Value) -> Result<()> {
    match req {
        ControlRequest::VolCreate { .. } => {
            let v: VolumeView = parse(result)?;
            crate::out!("created volume {} ({})", v.name, fmt_bytes(v.size_bytes));
            for w in &v.warnings {
                eprintln!("warning: {w}");
            }
        }
        ControlRequest::VolClone {
            origin, snapshot, ..
        } => {
            let v: VolumeView = parse(result)?;
            crate::out!(
                "created volume {} ({}), a clone of {origin}@{snapshot}",
                v.name,
                fmt_bytes(v.size_bytes)
            );
            crate::out!(
                "  it shares every block with {origin}@{snapshot}, which is kept while {} exists; `vol delete {}` ends the clone",
                v.name,
                v.name
            );
        }
        ControlRequest::VolResize { .. } => {
            let v: VolumeView = parse(result)?;
            crate::out!("resized volume {} to {}", v.name, fmt_bytes(v.size_bytes));
            for w in &v.warnings {
                eprintln!("warning: {w}");
            }
        }
        ControlRequest::SnapRollback { volume, name, .. } => {
            crate::out!("rolled back {volume} to {volume}@{name}");
            for d in result["deleted_snapshots"].as_array().into_iter().flatten() {
                crate::out!("  deleted newer snapshot {volume}@{}", s(d));
            }
            let writers = result["nbd_writers"].as_u64().unwrap_or(0);
            if writers > 0 {
                eprintln!("warning: {writers} NBD client(s) had {volume} open for writing (forced): their caches no longer match it; reconnect them");
            }
        }
        ControlRequest::QtreeCreate { volume, name, .. } => {
            let v: VolumeView = parse(result)?;
            let size = v
                .qtrees
                .iter()
                .find(|q| q.name == name)
                .map(|q| q.size_bytes)
                .unwrap_or(0);
            crate::out!("created qtree {volume}/{name} ({})", fmt_bytes(size));
        }
        ControlRequest::VolRetain { volume, keep } => match keep {
            Some(k) => crate::out!("volume {volume}: keeping the newest {k} snapshots (and any a soft lock holds)"),
            None => crate::out!("volume {volume}: no retention policy; snapshots are kept until deleted"),
        },
        ControlRequest::VolDelete { name, .. } => {
            let n = result["deleted_snapshots"].as_array().map_or(0, Vec::len);
            crate::out!("deleted volume {name} with its {n} snapshots");
            for l in result["forced_locks"].as_array().into_iter().flatten() {
                crate::out!("  forced: {}", s(l));
            }
            for d in result["ended_downstreams"].as_array().into_iter().flatten() {
                crate::out!("  ended downstream: {} (it needs a new source or a new baseline)", s(d));
            }
        }
        ControlRequest::VolExport { volume, .. } => match result["peers"].as_array() {
            Some(p) => {
                let names: Vec<String> = p.iter().map(s).collect();
                crate::out!("volume {volume}: exported to {}", names.join(", "));
            }
            None => crate::out!("volume {volume}: no export list (the node's default applies)"),
        },
        ControlRequest::VolExports => {
            let closed = result["exports_required"].as_bool().unwrap_or(false);
            crate::out!(
                "volumes without a list: {}",
                if closed {
                    "closed to every peer (exports_required)"
                } else {
                    "open to every authenticated peer"
                }
            );
            let mut t = Table::new(&["VOLUME", "PEERS"]);
            if let Some(m) = result["exports"].as_object() {
                for (v, p) in m {
                    let names: Vec<String> =
                        p.as_array().into_iter().flatten().map(s).collect();
                    t.row(vec![v.clone(), names.join(", ")]);
                }
            }
            t.print();
        }
        ControlRequest::VolList => {
            let vols: Vec<VolumeView> = parse(result)?;
            let mut t = Table::new(&[
                "VOLUME",
                ">SIZE",
                ">USED",
                ">SNAPSHOTS",
                ">KEEP",
                "RO",
                "ORIGIN",
                "QTREES",
            ]);
            for v in vols {
                let q: Vec<String> = v
                    .qtrees
                    .iter()
                    .map(|q| {
                        let ro = if q.read_only { ", read-only" } else { "" };
                        format!("{} ({}{ro})", q.name, fmt_bytes(q.size_bytes))
                    })
                    .collect();
                let ro = match v.access.as_str() {
                    "read-only" => "yes",
                    "partly read-only" => "partly",
                    _ if v.read_only => "yes",
                    _ => "no",
                };
                t.row(vec![
                    v.name,
                    fmt_bytes(v.total_size_bytes.max(v.size_bytes)),
                    fmt_bytes(v.used_bytes),
                    v.snapshots.to_string(),
                    v.keep.map_or("-".into(), |k| k.to_string()),
                    ro.into(),
                    v.origin.unwrap_or_else(|| "-".into()),
                    if q.is_empty() {
                        "-".into()
                    } else {
                        q.join(", ")
                    },
                ]);
            }
            t.print();
        }
        ControlRequest::SnapCreate { volume, .. } => {
            let s: SnapshotView = parse(result)?;
            crate::out!("created snapshot {volume}@{} (id {})", s.name, s.id);
            for (ns, hex) in &s.digests {
                crate::out!("  digest {}: {hex}", ns_label(&volume, ns));
            }
        }
        ControlRequest::SnapList { volume } => {
            let snaps: Vec<SnapshotView> = parse(result)?;
            let mut t = Table::new(&["SNAPSHOT", "ID", "CREATED", ">REFERENCED", ">UNIQUE", "LOCKS"]);
            for s in snaps {
                t.row(vec![
                    s.name,
                    s.id.to_string(),
                    s.created,
                    fmt_bytes(s.referenced_bytes),
                    fmt_bytes(s.unique_bytes),
                    s.locks.len().to_string(),
                ]);
                // Whole (32 hex digits, 128 bits): a digest cut short
                // cannot be compared with another node's.
                for (ns, hex) in &s.digests {
                    t.note(format!("  digest {}: {hex}", ns_label(&volume, ns)));
                }
                if !s.clones.is_empty() {
                    t.note(format!("  clones (held while they exist): {}", s.clones.join(", ")));
                }
            }
            t.print();
        }
        ControlRequest::MirrorCreate { .. } | ControlRequest::MirrorUpdate { .. } | ControlRequest::MirrorResync { .. } => {
            print_transfer(&result)
        }
        ControlRequest::MirrorStatus => print_mirrors(&result),
        ControlRequest::MirrorDestinations => print_destinations(&result),
        ControlRequest::MirrorRetarget { .. } => print_retarget(&result),
        ControlRequest::MirrorBreak { dst } => crate::out!("mirror {dst} broken: the destination is writable; `mirror resync {dst}` makes it a read-only mirror again"),
        ControlRequest::MirrorDelete { dst } => {
            if result["released_upstream"].as_bool() == Some(false) {
                crate::out!("mirror {dst} deleted; the upstream could not be reached, so its locks there were not released: they go stale when their lease runs out (or `lock release` there)");
            } else {
                crate::out!("mirror {dst} deleted; its locks upstream are released");
            }
        }
        ControlRequest::LockList => print_locks(&result),
        ControlRequest::LockAdd { volume, snapshot, .. } => {
            crate::out!("locked {volume}@{snapshot} (holder {})", s(&result["holder"]));
            if result["delivered"].as_bool() == Some(false) {
                let ups: Vec<String> = result["undelivered_upstreams"]
                    .as_array()
                    .map(|a| a.iter().map(s).collect())
                    .unwrap_or_default();
                eprintln!(
                    "warning: held on this node only for now: upstream {} could not be reached; the lock is sent again every tick, and until it arrives the snapshot is not protected there or above",
                    ups.join(", ")
                );
            }
        }
        ControlRequest::LockRelease { volume, snapshot, holder } => crate::out!("released {holder}'s lock on {volume}@{snapshot}"),
        ControlRequest::SnapDelete { volume, name, .. } => crate::out!("deleted snapshot {volume}@{name}"),
        ControlRequest::Prune { .. } => print_prune(&result),
        ControlRequest::Diff { .. } => {
            let d: DiffView = parse(result)?;
            crate::out!(
                "{}{} {}..{}: {} extents, {} of data, {} trimmed",
                d.volume,
                d.qtree.map(|q| format!("/{q}")).unwrap_or_default(),
                d.base.as_deref().unwrap_or("(nothing)"),
                d.target,
                d.extents,
                fmt_bytes(d.data_bytes),
                fmt_bytes(d.trim_bytes)
            );
        }
        ControlRequest::Status => {
            let s: StatusView = parse(result)?;
            crate::out!("node        {} (sluice {})", s.node, s.version);
            crate::out!("data        {}", s.data);
            crate::out!("listen      {}", s.listen);
            crate::out!("nbd         {}", s.nbd.as_deref().unwrap_or("-"));
            crate::out!("uptime      {} s", s.uptime_s);
            crate::out!("shards      {}", s.shards);
            crate::out!(
                "space       {} used, {} free of {} ({} waiting for the next checkpoint)",
                fmt_bytes(s.space.used_bytes),
                fmt_bytes(s.space.free_bytes),
                fmt_bytes(s.space.total_bytes),
                fmt_bytes(s.space.pending_free_bytes)
            );
            crate::out!("volumes     {}", s.volumes);
            crate::out!("snapshots   {}", s.snapshots);
            if s.healthy {
                crate::out!("health      ok");
            } else {
                crate::out!("health      {} problem(s)", s.problems.len());
                for p in &s.problems {
                    crate::out!("  {p}");
                }
            }
        }
    }
    Ok(())
}

/// A namespace as an operator names it: `VOL` for the volume's own space
/// (`""` in a snapshot's `digests`), `VOL/QTREE` for a qtree.
fn ns_label(volume: &str, ns: &str) -> String {
    if ns.is_empty() {
        volume.to_string()
    } else {
        format!("{volume}/{ns}")
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// What a progress bar counts: a transfer's data bytes, or the snapshots
/// a prune has settled.
enum BarUnit {
    Bytes,
    Snapshots,
}

/// A bar on stderr for a long operation (a transfer: bytes, rate and time
/// left; a prune: snapshots), fed by the node's progress lines. None with
/// `--json`, when stderr is not a terminal, or for a quick request.
fn progress_bar(req: &ControlRequest, json: bool) -> Option<(indicatif::ProgressBar, BarUnit)> {
    use std::io::IsTerminal;
    let (unit, template) = match req {
        ControlRequest::MirrorCreate { .. }
        | ControlRequest::MirrorUpdate { .. }
        | ControlRequest::MirrorResync { .. }
        | ControlRequest::MirrorRetarget { .. } => (
            BarUnit::Bytes,
            "{spinner} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ),
        ControlRequest::Prune { .. } => (
            BarUnit::Snapshots,
            "{spinner} [{bar:40}] {pos}/{len} snapshots {per_sec} eta {eta}",
        ),
        _ => return None,
    };
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(1);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        b.set_style(style.progress_chars("=> "));
    }
    Some((b, unit))
}

fn snap_ref(v: &Value) -> String {
    if v.is_null() {
        return "-".into();
    }
    format!("{} ({})", s(&v["name"]), s(&v["id"]))
}

fn print_transfer(r: &Value) {
    let kind = s(&r["kind"]);
    if kind == "none" {
        crate::out!(
            "{}: already up to date at {}",
            s(&r["dst"]),
            snap_ref(&r["target"])
        );
        return;
    }
    crate::out!(
        "{}: {kind} transfer to {} from base {}: {} in {} extents, {} trims, {} ms",
        s(&r["dst"]),
        snap_ref(&r["target"]),
        snap_ref(&r["base"]),
        fmt_bytes(r["bytes"].as_u64().unwrap_or(0)),
        r["extents"].as_u64().unwrap_or(0),
        r["trims"].as_u64().unwrap_or(0),
        r["duration_ms"].as_u64().unwrap_or(0),
    );
    if r["resumed_from"].as_u64().unwrap_or(0) > 0 {
        crate::out!(
            "  resumed from item {} of {}",
            r["resumed_from"],
            r["total_items"]
        );
    }
    if let Some(why) = r["full_reason"].as_str().filter(|_| kind == "full") {
        crate::out!("  full because: {why}");
    }
    for d in r["deleted_snapshots"].as_array().into_iter().flatten() {
        crate::out!("  deleted {} (gone at the source)", s(d));
    }
    for k in r["kept_locked"].as_array().into_iter().flatten() {
        crate::out!("  kept {} (gone at the source, but locked here)", s(k));
    }
}

fn print_retarget(r: &Value) {
    crate::out!(
        "{}: source {} (node {}) -> {} (node {})",
        s(&r["dst"]),
        s(&r["old_source"]),
        s(&r["old_source_node"]),
        s(&r["new_source"]),
        s(&r["new_source_node"]),
    );
    match r["full_copy_bytes"].as_u64() {
        Some(b) => crate::out!("  no snapshot in common: a full copy of {}", fmt_bytes(b)),
        None => crate::out!("  goes on from {}", snap_ref(&r["base"])),
    }
    if r["released_old_upstream"].as_bool() == Some(false) {
        crate::out!("  the former source was not reached: its locks for this mirror go stale there under their lease (or `lock release` there)");
    }
    if !r["transfer"].is_null() {
        print_transfer(&r["transfer"]);
    }
    if let Some(e) = r["transfer_error"].as_str() {
        crate::out!(
            "  the update after the switch failed: {e}; `mirror update {}` tries again",
            s(&r["dst"])
        );
    }
}

fn print_mirrors(v: &Value) {
    let mut t = Table::new(&[
        "DESTINATION",
        "SOURCE",
        "KIND",
        "STATE",
        "UPDATES",
        "COMMON",
        ">LAG",
        ">FULL",
        ">INCR",
        "LAST",
    ]);
    for m in v.as_array().into_iter().flatten() {
        let lag = secs_cell(&m["lag_ms"]);
        let last = &m["last_transfer"];
        let last = if last.is_null() {
            "-".to_string()
        } else {
            format!(
                "{} {}",
                s(&last["kind"]),
                fmt_bytes(last["bytes"].as_u64().unwrap_or(0))
            )
        };
        let mut when = Vec::new();
        if m["follow"].as_bool() == Some(true) {
            when.push("follow".to_string());
        }
        if let Some(e) = m["every_secs"].as_u64() {
            when.push(format!("every {e}s"));
        }
        let when = if when.is_empty() {
            "manual".to_string()
        } else {
            when.join(", ")
        };
        t.row(vec![
            s(&m["dst"]),
            s(&m["source"]),
            s(&m["kind"]),
            s(&m["state"]),
            when,
            s(&m["newest_common_snapshot"]["name"]),
            lag,
            m["full_transfers"].as_u64().unwrap_or(0).to_string(),
            m["incremental_transfers"].as_u64().unwrap_or(0).to_string(),
            last,
        ]);
        if !m["notice"].is_null() {
            t.note(format!("  notice: {}", s(&m["notice"])));
        }
        if !m["last_error"].is_null() {
            t.note(format!("  last error: {}", s(&m["last_error"])));
        }
        if let Some(n) = m["next_update"]
            .as_str()
            .filter(|n| !n.starts_with("incremental"))
        {
            t.note(format!("  next update: {n}"));
        }
    }
    t.print();
}

/// A duration in ms as a table cell in whole seconds (`-` when absent).
fn secs_cell(ms: &Value) -> String {
    ms.as_u64().map_or("-".into(), |l| format!("{}s", l / 1000))
}

fn print_destinations(v: &Value) {
    let mut t = Table::new(&[
        "DOWNSTREAM",
        "VOLUME",
        "STATE",
        ">LOCKS",
        ">LAG",
        "LAST",
        "HOLDS",
    ]);
    for d in v.as_array().into_iter().flatten() {
        let last = &d["last_served"];
        let last = if last.is_null() {
            "- (none since start)".to_string()
        } else {
            format!(
                "{} {} of {}, {}",
                s(&last["kind"]),
                fmt_bytes(last["bytes"].as_u64().unwrap_or(0)),
                s(&last["snapshot"]),
                fmt_unix_ms(last["unix_ms"].as_u64().unwrap_or(0))
            )
        };
        let held: Vec<String> = d["locked_snapshots"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        t.row(vec![
            format!("{}:{}", s(&d["node"]), s(&d["relationship"])),
            s(&d["volume"]),
            if d["stale"] == true {
                "stale"
            } else {
                "active"
            }
            .into(),
            d["locks"].as_u64().unwrap_or(0).to_string(),
            secs_cell(&d["lag_ms"]),
            last,
            if held.is_empty() {
                "-".into()
            } else {
                held.join(", ")
            },
        ]);
    }
    t.print();
}

fn print_locks(v: &Value) {
    let mut t = Table::new(&[
        "SNAPSHOT", "TYPE", "STRING", "ORIGIN", "STATE", "RENEWED", "HOPS",
    ]);
    for l in v.as_array().into_iter().flatten() {
        let snap = match (l["volume"].as_str(), l["snapshot"].as_str()) {
            (Some(v), Some(n)) => format!("{v}@{n}"),
            _ => s(&l["snapshot_id"]),
        };
        let hops: Vec<String> = l["hop_path"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        t.row(vec![
            snap,
            s(&l["kind"]),
            s(&l["text"]),
            s(&l["origin_node"]),
            s(&l["state"]),
            fmt_unix_ms(l["renewed_unix_ms"].as_u64().unwrap_or(0)),
            hops.join(" > "),
        ]);
    }
    t.print();
}

/// A text table whose columns are as wide as their longest cell (a long
/// name widens its column instead of shifting the rest of its row). A
/// header starting with `>` is right-aligned; the last column is not
/// padded. Notes are lines printed under the row before them.
struct Table {
    heads: Vec<(String, bool)>,
    rows: Vec<(Vec<String>, Vec<String>)>,
}

impl Table {
    fn new(heads: &[&str]) -> Table {
        Table {
            heads: heads
                .iter()
                .map(|h| match h.strip_prefix('>') {
                    Some(h) => (h.to_string(), true),
                    None => (h.to_string(), false),
                })
                .collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push((cells, Vec::new()));
    }

    fn note(&mut self, line: String) {
        if let Some((_, notes)) = self.rows.last_mut() {
            notes.push(line);
        }
    }

    fn print(&self) {
        let width = |i: usize| {
            self.rows
                .iter()
                .filter_map(|(r, _)| r.get(i))
                .map(|c| c.chars().count())
                .chain([self.heads[i].0.chars().count()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.heads.len()).map(width).collect();
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, c) in cells.iter().enumerate() {
                let (w, right) = (
                    widths.get(i).copied().unwrap_or(0),
                    self.heads.get(i).is_some_and(|h| h.1),
                );
                if i > 0 {
                    out.push(' ');
                }
                if i + 1 == cells.len() && !right {
                    out.push_str(c);
                } else if right {
                    out.push_str(&format!("{c:>w$}"));
                } else {
                    out.push_str(&format!("{c:<w$}"));
                }
            }
            out
        };
        let heads: Vec<String> = self.heads.iter().map(|h| h.0.clone()).collect();
        crate::out!("{}", line(&heads));
        for (r, notes) in &self.rows {
            crate::out!("{}", line(r));
            for n in notes {
                crate::out!("{n}");
            }
        }
    }
}

fn print_prune(p: &Value) {
    let vol = s(&p["volume"]);
    let dry = p["dry_run"].as_bool().unwrap_or(false);
    let verb = if dry { "would delete" } else { "deleted" };
    let deleted = p["deleted"].as_array().cloned().unwrap_or_default();
    if deleted.is_empty() {
        crate::out!("{vol}: nothing to delete (keep {})", p["keep"]);
    }
    for d in &deleted {
        crate::out!("{verb} {vol}@{}: older than the newest {}", s(d), p["keep"]);
    }
    for k in p["kept_recent"].as_array().into_iter().flatten() {
        crate::out!("keep {vol}@{}: one of the newest {}", s(k), p["keep"]);
    }
    for k in p["skipped"].as_array().into_iter().flatten() {
        let holders: Vec<String> = k["holders"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                format!(
                    "{} {:?} from {}",
                    s(&h["kind"]),
                    s(&h["text"]),
                    s(&h["origin_node"])
                )
            })
            .collect();
        let effects: Vec<String> = k["effects"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        if effects.is_empty() {
            crate::out!(
                "keep {vol}@{}: {}{}",
                s(&k["snapshot"]),
                s(&k["reason"]),
                if holders.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", holders.join("; "))
                }
            );
        } else {
            crate::out!("keep {vol}@{}: locked", s(&k["snapshot"]));
            for e in effects {
                crate::out!("  {e}");
            }
        }
    }
}
