//! The operator commands that talk to a running node (`sluice --node ADDR
//! ...`): build a [`ControlRequest`], send it, print the result as text or,
//! with `--json`, as the node's JSON result verbatim.

use crate::control::{Client, ControlRequest};
use crate::error::{NodeError, Result};
use crate::node::{DiffView, PrunePlan, SnapshotView, StatusView, VolumeView};
use crate::units::{fmt_bytes, parse_size};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// A client command, already parsed from the command line.
#[derive(Debug, Clone)]
pub enum Command {
    VolCreate {
        name: String,
        size: String,
    },
    VolList,
    QtreeCreate {
        volume: String,
        name: String,
        size: String,
    },
    SnapCreate {
        volume: String,
        name: String,
    },
    SnapList {
        volume: String,
    },
    SnapDelete {
        volume: String,
        name: String,
        force: bool,
    },
    Prune {
        volume: String,
        keep: usize,
        dry_run: bool,
    },
    Diff {
        volume: String,
        qtree: Option<String>,
        base: Option<String>,
        target: String,
    },
    Status,
}

impl Command {
    fn request(&self) -> Result<ControlRequest> {
        Ok(match self.clone() {
            Command::VolCreate { name, size } => ControlRequest::VolCreate {
                name,
                size_bytes: parse_size(&size)?,
            },
            Command::VolList => ControlRequest::VolList,
            Command::QtreeCreate { volume, name, size } => ControlRequest::QtreeCreate {
                volume,
                name,
                size_bytes: parse_size(&size)?,
            },
            Command::SnapCreate { volume, name } => ControlRequest::SnapCreate { volume, name },
            Command::SnapList { volume } => ControlRequest::SnapList { volume },
            Command::SnapDelete {
                volume,
                name,
                force,
            } => ControlRequest::SnapDelete {
                volume,
                name,
                force,
            },
            Command::Prune {
                volume,
                keep,
                dry_run,
            } => ControlRequest::Prune {
                volume,
                keep,
                dry_run,
            },
            Command::Diff {
                volume,
                qtree,
                base,
                target,
            } => ControlRequest::Diff {
                volume,
                qtree,
                base,
                target,
            },
            Command::Status => ControlRequest::Status,
        })
    }
}

fn parse<T: DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| NodeError::BadAnswer {
        addr: "node".into(),
        reason: e.to_string(),
    })
}

/// Run `cmd` against the node at `node`, printing to stdout.
pub fn run(node: &str, cmd: Command, json: bool) -> Result<()> {
    let req = cmd.request()?; // local validation (sizes) before connecting
    let mut client = Client::connect(node)?;
    let result = client.call(&req)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_else(|_| result.to_string())
        );
        return Ok(());
    }
    match cmd {
        Command::VolCreate { .. } => {
            let v: VolumeView = parse(result)?;
            println!("created volume {} ({})", v.name, fmt_bytes(v.size_bytes));
        }
        Command::QtreeCreate { volume, name, .. } => {
            let v: VolumeView = parse(result)?;
            let size = v
                .qtrees
                .iter()
                .find(|q| q.name == name)
                .map(|q| q.size_bytes)
                .unwrap_or(0);
            println!("created qtree {volume}/{name} ({})", fmt_bytes(size));
        }
        Command::VolList => {
            let vols: Vec<VolumeView> = parse(result)?;
            println!(
                "{:<20} {:>10} {:>10} {:>9} {:<3} QTREES",
                "VOLUME", "SIZE", "USED", "SNAPSHOTS", "RO"
            );
            for v in vols {
                let q: Vec<String> = v
                    .qtrees
                    .iter()
                    .map(|q| format!("{} ({})", q.name, fmt_bytes(q.size_bytes)))
                    .collect();
                println!(
                    "{:<20} {:>10} {:>10} {:>9} {:<3} {}",
                    v.name,
                    fmt_bytes(v.size_bytes),
                    fmt_bytes(v.used_bytes),
                    v.snapshots,
                    if v.read_only { "yes" } else { "no" },
                    if q.is_empty() {
                        "-".into()
                    } else {
                        q.join(", ")
                    }
                );
            }
        }
        Command::SnapCreate { volume, .. } => {
            let s: SnapshotView = parse(result)?;
            println!("created snapshot {volume}@{} (id {})", s.name, s.id);
        }
        Command::SnapList { .. } => {
            let snaps: Vec<SnapshotView> = parse(result)?;
            println!(
                "{:<20} {:<36} {:<20} {:>10} {:>10} LOCKS",
                "SNAPSHOT", "ID", "CREATED", "REFERENCED", "UNIQUE"
            );
            for s in snaps {
                println!(
                    "{:<20} {:<36} {:<20} {:>10} {:>10} {}",
                    s.name,
                    s.id,
                    s.created,
                    fmt_bytes(s.referenced_bytes),
                    fmt_bytes(s.unique_bytes),
                    s.locks.len()
                );
            }
        }
        Command::SnapDelete { volume, name, .. } => println!("deleted snapshot {volume}@{name}"),
        Command::Prune { .. } => {
            let p: PrunePlan = parse(result)?;
            let verb = if p.dry_run { "would delete" } else { "deleted" };
            if p.delete.is_empty() {
                println!(
                    "{}: nothing to prune ({} snapshots, keep {})",
                    p.volume,
                    p.kept.len(),
                    p.keep
                );
            }
            for d in &p.delete {
                println!(
                    "{verb} {}@{} ({}): {}",
                    p.volume, d.name, d.created, d.reason
                );
            }
            for k in &p.kept {
                println!("keep {}@{} ({}): {}", p.volume, k.name, k.created, k.reason);
            }
            if !p.delete.is_empty() {
                println!("frees at least {}", fmt_bytes(p.frees_bytes_at_least));
            }
        }
        Command::Diff { .. } => {
            let d: DiffView = parse(result)?;
            println!(
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
        Command::Status => {
            let s: StatusView = parse(result)?;
            println!("node        {} (sluice {})", s.node, s.version);
            println!("data        {}", s.data);
            println!("listen      {}", s.listen);
            println!("nbd         {}", s.nbd.as_deref().unwrap_or("-"));
            println!("uptime      {} s", s.uptime_s);
            println!(
                "space       {} used, {} free of {} ({} waiting for the next checkpoint)",
                fmt_bytes(s.space.used_bytes),
                fmt_bytes(s.space.free_bytes),
                fmt_bytes(s.space.total_bytes),
                fmt_bytes(s.space.pending_free_bytes)
            );
            println!("volumes     {}", s.volumes);
            println!("snapshots   {}", s.snapshots);
        }
    }
    Ok(())
}
