//! The `sluice` binary: parses the command line and hands over to the
//! library (`sluice::daemon`, `sluice::cli`, the demo). Errors print as one
//! line on stderr and exit non-zero.

mod demo;

use clap::{Parser, Subcommand};
use sluice::cli;
use sluice::config::{ConfigFile, ServeConfig, ServeFlags};
use sluice::control::ControlRequest;
use sluice::units::{fmt_bytes, parse_duration, parse_rate, parse_size};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Snapshot-replication block storage")]
struct Cli {
    /// The node to talk to: its control socket (`/path` or `unix:/path`;
    /// default: the only socket in /run/sluice), or HOST:PORT.
    #[arg(long, global = true, env = "SLUICE_NODE")]
    node: Option<String>,
    /// A token file (`sluice token create`) to present to a TCP control API.
    #[arg(long, global = true, env = "SLUICE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Write a new token NAME to FILE (mode 0600; refused if FILE exists).
    /// Name FILE in the node's `control_tokens`; give it to clients with
    /// `--token-file FILE`.
    Create {
        /// The token's name (who holds it; the node logs it with each request).
        name: String,
        /// The file to write (`NAME:HEX`).
        #[arg(long)]
        out: PathBuf,
        /// Print `{"name","file"}` as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SecretCmd {
    /// Write a new peer secret to FILE (32 random bytes as hex, mode 0600;
    /// refused if FILE exists). Copy it to every node that replicates with
    /// this one and start each with `--peer-secret FILE`.
    Create {
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the demonstration on files in a temporary folder.
    Demo,
    /// Control API credentials for a node's TCP control address.
    #[command(subcommand)]
    Token(TokenCmd),
    /// The peer secret nodes prove to each other (and encrypt with).
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Format a device, or a file (created at --size).
    Init {
        /// The device or file to format.
        path: PathBuf,
        /// Create the file at this size first, e.g. 10G (a file only).
        #[arg(long)]
        size: Option<String>,
        /// Format even if the device already holds a pool (destroys it).
        #[arg(long)]
        force: bool,
        /// Engine shards (threads, each with its own ring and an equal
        /// region of the device); default: one per GiB, at most one per core but one.
        #[arg(long)]
        shards: Option<u32>,
        /// Volumes each shard's region may hold (1..=1048576; default
        /// 16384). Costs no space until volumes exist.
        #[arg(long)]
        volumes_max: Option<u32>,
        /// Print the result as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a node: the engine, the control API and NBD.
    Serve {
        /// The pool: a device or a file made by `sluice init`.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Peers (and /metrics) connect here; never the control API.
        #[arg(long)]
        listen: Option<String>,
        /// The control API's Unix socket (mode 0600); default DATA.sock next
        /// to a pool file, /run/sluice/DEV.sock for a device.
        #[arg(long)]
        control_socket: Option<PathBuf>,
        /// Serve NBD here (HOST:PORT): exports VOL, VOL/QTREE, VOL@SNAP.
        #[arg(long)]
        nbd: Option<String>,
        /// The node's name, stored in the pool at the first start (peers
        /// key their locks by it); default `node-` and 8 random hex digits.
        #[arg(long)]
        name: Option<String>,
        /// A TOML config file; flags given here override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// A file holding the secret peers must prove (HMAC challenge); the
        /// session is then encrypted. Without it (or --insecure-peers) the
        /// node refuses every peer and replicates with none.
        #[arg(long)]
        peer_secret: Option<PathBuf>,
        /// No peer secret: accept any peer and replicate in clear text. Only
        /// on a trusted network.
        #[arg(long)]
        insecure_peers: bool,
        /// Node-wide replication receive rate, bytes per second (e.g. 100M).
        #[arg(long)]
        throttle: Option<String>,
        /// Scheduled (`--every`) transfers running at once, 1..=64 (default 4).
        #[arg(long)]
        max_transfers: Option<usize>,
        /// Demonstration switch: send empty lock sets, so upstreams protect
        /// nothing (shows the broken chains soft locks prevent).
        #[arg(long)]
        no_lock_propagation: bool,
    },
    /// Mirror relationships (this node is the destination).
    Mirror {
        #[command(subcommand)]
        cmd: MirrorCmd,
    },
    /// Soft locks on snapshots.
    Lock {
        #[command(subcommand)]
        cmd: LockCmd,
    },
    /// Volumes.
    Vol {
        #[command(subcommand)]
        cmd: VolCmd,
    },
    /// Qtrees (named block namespaces inside a volume).
    Qtree {
        #[command(subcommand)]
        cmd: QtreeCmd,
    },
    /// Snapshots.
    Snap {
        #[command(subcommand)]
        cmd: SnapCmd,
    },
    /// Delete the oldest snapshots beyond the newest N.
    Prune {
        /// The volume to prune.
        volume: String,
        /// Snapshots to keep: the newest N (and any a soft lock holds).
        #[arg(long)]
        keep: usize,
        /// Say what would be deleted (and what each lock costs); delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the node's JSON result (the prune plan) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// What changed between two snapshots (or since nothing).
    Diff {
        /// The volume.
        volume: String,
        /// The newer snapshot.
        target: String,
        /// The older snapshot (default: nothing, so every mapped block).
        #[arg(long)]
        base: Option<String>,
        /// A qtree of the volume instead of its own space.
        #[arg(long)]
        qtree: Option<String>,
        /// Print the node's JSON result instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The node's state: space, volumes, snapshots, health (exit status 1
    /// when unhealthy).
    Status {
        /// Print the node's JSON result instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VolCmd {
    /// Create a thin volume (a warning when it is larger than the pool).
    Create {
        /// The new volume's name.
        volume: String,
        /// Its size, e.g. 10G, 512M (a multiple of 4 KiB).
        #[arg(long)]
        size: String,
        /// Print the node's JSON result (the volume) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every volume: size (with its qtrees), used bytes (current),
    /// snapshots, retention, read-only state, qtrees.
    List {
        /// Print the node's JSON result instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Retention by count: keep the newest N snapshots of VOL from now on
    /// (older ones are deleted as soon as no soft lock holds them).
    Retain {
        /// The volume.
        volume: String,
        /// Snapshots to keep (at least 1).
        #[arg(long, required_unless_present = "off", conflicts_with = "off")]
        keep: Option<usize>,
        /// End the policy.
        #[arg(long)]
        off: bool,
        /// Print the node's JSON result (the volume) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A writable clone of a snapshot: NEWVOL shares every block with
    /// VOL@SNAP (copy-on-write; created at once, whatever its size). The
    /// snapshot cannot be deleted while the clone exists; `vol delete
    /// NEWVOL` ends the clone and frees what it wrote.
    Clone {
        /// The snapshot to clone, VOL@SNAP.
        #[arg(value_name = "VOL@SNAP")]
        snapshot: String,
        /// The new volume's name.
        #[arg(value_name = "NEWVOL")]
        volume: String,
        /// Print the node's JSON result (the new volume) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Grow VOL to SIZE, or shrink it when nothing (live or in a snapshot)
    /// is mapped past SIZE; refused on a volume mirror's destination (it
    /// follows its source). Open NBD clients see the new size when they
    /// reconnect.
    Resize {
        /// The volume to resize.
        volume: String,
        /// The new size, e.g. 10G, 512M.
        size: String,
        /// Print the node's JSON result (the volume) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Say which peers may pull VOL and lock its snapshots (`--to b,c`, or
    /// `--to '*'` for any authenticated peer); `--off` drops the list.
    Export {
        /// The volume.
        volume: String,
        /// Node names, comma-separated, or `*`.
        #[arg(
            long,
            value_delimiter = ',',
            required_unless_present = "off",
            conflicts_with = "off"
        )]
        to: Vec<String>,
        /// Drop the list: the node's default applies (open, or closed
        /// with exports_required).
        #[arg(long)]
        off: bool,
        /// Print the node's JSON result instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every volume's export list, and what a volume without one allows.
    Exports {
        /// Print the node's JSON result instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete VOL with its qtrees and snapshots (refused while a downstream
    /// pulls it or a lock holds one of its snapshots, naming them).
    Delete {
        /// The volume to delete.
        volume: String,
        /// Delete although downstreams or locks depend on it (each locked
        /// snapshot is a forced delete; its holders are told).
        #[arg(long)]
        force: bool,
        /// Print the node's JSON result (the delete report) instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum MirrorCmd {
    /// Make DSTVOL a mirror of SRCADDR/VOL[/QTREE] and run the baseline.
    Create {
        /// The destination volume (created by the mirror).
        dst: String,
        /// The source, ADDR/VOL (a volume mirror) or ADDR/VOL/QTREE (a
        /// qtree mirror into DST/QTREE).
        #[arg(long)]
        from: String,
        /// Update on a schedule, e.g. 30s, 5m, 1h.
        #[arg(long)]
        every: Option<String>,
        /// Update as soon as the source has a snapshot this node has not
        /// seen (a watch held open on the source; in a cascade every hop
        /// with --follow passes a new snapshot on by itself).
        #[arg(long)]
        follow: bool,
        /// Bytes per second for this relationship, e.g. 50M.
        #[arg(long)]
        throttle: Option<String>,
        /// Retention on DSTVOL: keep its newest N snapshots (see `vol retain`).
        #[arg(long)]
        keep: Option<usize>,
        /// Print the node's JSON result (the baseline's transfer report)
        /// instead of text; no progress bar.
        #[arg(long)]
        json: bool,
    },
    /// One transfer now; waits for it.
    Update {
        /// The destination: VOL, or VOL/QTREE for a qtree mirror.
        dst: String,
        /// Print the node's JSON result (the transfer report) instead of
        /// text; no progress bar.
        #[arg(long)]
        json: bool,
    },
    /// Every relationship this node is the destination of: state, lag,
    /// last transfer, errors.
    Status {
        /// Print the node's JSON result instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The downstreams that pull from this node (it is their source): the
    /// locks each holds here, whether they are stale, its last transfer
    /// from here and its lag.
    Destinations {
        /// Print the node's JSON result instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make the destination writable; updates stop until a resync.
    Break {
        /// The destination: VOL, or VOL/QTREE for a qtree mirror.
        dst: String,
        /// Print the node's JSON result instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Become a mirror again (from the newest common snapshot, or a full copy).
    Resync {
        /// The destination: VOL, or VOL/QTREE for a qtree mirror.
        dst: String,
        /// Discard the snapshots taken here while broken (refused without,
        /// naming them).
        #[arg(long)]
        force: bool,
        /// Print the node's JSON result (the transfer report) instead of
        /// text; no progress bar.
        #[arg(long)]
        json: bool,
    },
    /// End the relationship and release its locks upstream.
    Delete {
        /// The destination: VOL, or VOL/QTREE for a qtree mirror.
        dst: String,
        /// Print the node's JSON result instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Go on from a new source, e.g. the node above a lost middle node
    /// (from the newest snapshot shared with it), then update.
    Retarget {
        /// The destination: VOL, or VOL/QTREE for a qtree mirror.
        dst: String,
        /// The new source, ADDR/VOL[/QTREE].
        #[arg(long)]
        from: String,
        /// Accept a full copy when the destination shares no snapshot with
        /// the new source (refused otherwise, saying its size).
        #[arg(long)]
        allow_full: bool,
        /// Print the node's JSON result (the retarget report) instead of
        /// text; no progress bar.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum LockCmd {
    /// Every soft lock on this node: the snapshot, who holds it, its state.
    List {
        /// Print the node's JSON result instead of text.
        #[arg(long)]
        json: bool,
    },
    /// An application on this node depends on VOL@SNAP.
    Add {
        /// The volume.
        volume: String,
        /// The snapshot to lock.
        snapshot: String,
        /// Who holds the lock (an application's name).
        #[arg(long)]
        owner: String,
        /// Why, shown with the lock wherever it is listed.
        #[arg(long)]
        text: Option<String>,
        /// Print the node's JSON reply (with `delivered`).
        #[arg(long)]
        json: bool,
    },
    /// Release a lock on VOL@SNAP (`lock list` shows each one's holder).
    Release {
        /// The volume.
        volume: String,
        /// The locked snapshot.
        snapshot: String,
        /// The holder to release, as `lock list` shows it.
        #[arg(long)]
        holder: String,
        /// Print the node's JSON result instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum QtreeCmd {
    /// Create a qtree in VOL (exported as VOL/QTREE).
    Create {
        /// The volume to hold it.
        volume: String,
        /// The new qtree's name.
        qtree: String,
        /// Its size, e.g. 1G (a multiple of 4 KiB).
        #[arg(long)]
        size: String,
        /// Print the node's JSON result (the volume) instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SnapCmd {
    /// Snapshot VOL (every namespace in it) now.
    Create {
        /// The volume.
        volume: String,
        /// The new snapshot's name.
        snapshot: String,
        /// Print the node's JSON result (the snapshot) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// VOL's snapshots, oldest first, with their sizes, digests and locks.
    List {
        /// The volume.
        volume: String,
        /// Print the node's JSON result instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (refused while a soft lock names it, naming the
    /// holders).
    Delete {
        /// The volume.
        volume: String,
        /// The snapshot to delete.
        snapshot: String,
        /// Delete although soft locks name it (logged; the affected
        /// downstreams are told).
        #[arg(long)]
        force: bool,
        /// Print the node's JSON result instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make VOL's live image SNAP's again (metadata only, no data copied);
    /// refused on a mirror destination.
    Rollback {
        /// The volume to roll back.
        volume: String,
        /// The snapshot its live image becomes.
        snapshot: String,
        /// Delete the snapshots newer than SNAP (each obeys its soft locks:
        /// a locked one refuses the rollback, naming its holders).
        #[arg(short = 'r')]
        recursive: bool,
        /// Roll back although NBD clients have VOL open for writing (their
        /// caches then no longer match it). Does not override soft locks.
        #[arg(long)]
        force: bool,
        /// Print the node's JSON result (the rollback report) instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Large buffers (a transfer's extents, coalesced reads of up to 1 MiB)
/// come from the heap and are reused there, instead of a fresh mapping
/// each: above glibc's mmap threshold (128 KiB, raised only by such frees)
/// every allocation is mmap'd, page-faulted and zeroed by the kernel, then
/// unmapped again. That churn was about a tenth of the engine threads'
/// samples in a full copy; with these settings a 2 GiB baseline ran at
/// 864-995 MB/s instead of 641-670 (docs/BENCHMARKS.md, 2026-12-07). The
/// cost: up to `TRIM` bytes of freed heap stay with the process.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_ABOVE: libc::c_int = 64 << 20;
        const TRIM: libc::c_int = 128 << 20;
        // SAFETY: mallopt only sets allocator parameters; it is called
        // before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_ABOVE);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM);
        }
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    // The daemon and the demo log at info; one-shot commands only warn, so
    // their output stays what the operator asked for.
    let default_level = match cli.cmd {
        Cmd::Serve { .. } | Cmd::Demo => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The error and those of its causes that its text does not already
/// include, joined on one line.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line.replace('\n', " ")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    use ControlRequest as R;
    // Everything but demo, init and serve talks to a node: sizes, rates and
    // durations are checked here, before connecting.
    let (req, json) = match cli.cmd {
        Cmd::Demo => return demo::run(),
        Cmd::Token(TokenCmd::Create { name, out, json }) => {
            let t = sluice::auth::Token::create(&name, &out)?;
            if json {
                let v = serde_json::json!({ "token": t.name, "path": out, "mode": "0600" });
                sluice::out!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            sluice::out!(
                "token {} written to {} (mode 0600); add it to the node's control_tokens",
                t.name,
                out.display()
            );
            return Ok(());
        }
        Cmd::Secret(SecretCmd::Create { out }) => {
            sluice::auth::create_peer_secret(&out)?;
            println!(
                "peer secret written to {} (mode 0600); give the same file to every node that replicates with this one: serve --peer-secret {}",
                out.display(),
                out.display()
            );
            return Ok(());
        }
        Cmd::Init {
            path,
            size,
            force,
            shards,
            volumes_max,
            json,
        } => {
            let size = size.as_deref().map(parse_size).transpose()?;
            let (bytes, shards) = sluice::daemon::init(&path, size, force, shards, volumes_max)?;
            if json {
                let v = serde_json::json!({ "path": path, "size_bytes": bytes, "shards": shards });
                sluice::out!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            sluice::out!(
                "formatted {} as a sluice pool ({}, shards={shards})",
                path.display(),
                fmt_bytes(bytes)
            );
            return Ok(());
        }
        Cmd::Serve {
            data,
            listen,
            control_socket,
            nbd,
            name,
            config,
            peer_secret,
            insecure_peers,
            throttle,
            max_transfers,
            no_lock_propagation,
        } => {
            let file = match config {
                Some(p) => ConfigFile::load(&p)?,
                None => ConfigFile::default(),
            };
            let flags = ServeFlags {
                data,
                listen,
                control_socket,
                nbd,
                name,
                peer_secret,
                insecure_peers,
                throttle,
                max_transfers,
                no_lock_propagation,
            };
            return Ok(sluice::daemon::serve(ServeConfig::resolve(file, flags)?)?);
        }
        Cmd::Vol {
            cmd: VolCmd::Create { volume, size, json },
        } => (
            R::VolCreate {
                name: volume,
                size_bytes: parse_size(&size)?,
            },
            json,
        ),
        Cmd::Vol {
            cmd: VolCmd::List { json },
        } => (R::VolList, json),
        Cmd::Vol {
            cmd:
                VolCmd::Clone {
                    snapshot,
                    volume,
                    json,
                },
        } => {
            let (origin, snap) = snapshot.split_once('@').ok_or_else(|| {
                anyhow::anyhow!("{snapshot:?}: name the snapshot to clone as VOL@SNAP")
            })?;
            (
                R::VolClone {
                    origin: origin.into(),
                    snapshot: snap.into(),
                    name: volume,
                },
                json,
            )
        }
        Cmd::Vol {
            cmd: VolCmd::Resize { volume, size, json },
        } => (
            R::VolResize {
                name: volume,
                size_bytes: parse_size(&size)?,
            },
            json,
        ),
        Cmd::Vol {
            cmd:
                VolCmd::Delete {
                    volume,
                    force,
                    json,
                },
        } => (
            R::VolDelete {
                name: volume,
                force,
            },
            json,
        ),
        Cmd::Vol {
            cmd:
                VolCmd::Export {
                    volume,
                    to,
                    off,
                    json,
                },
        } => (
            R::VolExport {
                volume,
                peers: if off { None } else { Some(to) },
            },
            json,
        ),
        Cmd::Vol {
            cmd: VolCmd::Exports { json },
        } => (R::VolExports, json),
        Cmd::Vol {
            cmd:
                VolCmd::Retain {
                    volume,
                    keep,
                    off,
                    json,
                },
        } => (
            R::VolRetain {
                volume,
                keep: if off { None } else { keep },
            },
            json,
        ),
        Cmd::Qtree {
            cmd:
                QtreeCmd::Create {
                    volume,
                    qtree,
                    size,
                    json,
                },
        } => (
            R::QtreeCreate {
                volume,
                name: qtree,
                size_bytes: parse_size(&size)?,
            },
            json,
        ),
        Cmd::Snap { cmd } => match cmd {
            SnapCmd::Create {
                volume,
                snapshot,
                json,
            } => (
                R::SnapCreate {
                    volume,
                    name: snapshot,
                },
                json,
            ),
            SnapCmd::List { volume, json } => (R::SnapList { volume }, json),
            SnapCmd::Delete {
                volume,
                snapshot,
                force,
                json,
            } => (
                R::SnapDelete {
                    volume,
                    name: snapshot,
                    force,
                },
                json,
            ),
            SnapCmd::Rollback {
                volume,
                snapshot,
                recursive,
                force,
                json,
            } => (
                R::SnapRollback {
                    volume,
                    name: snapshot,
                    destroy_newer: recursive,
                    force,
                },
                json,
            ),
        },
        Cmd::Prune {
            volume,
            keep,
            dry_run,
            json,
        } => (
            R::Prune {
                volume,
                keep,
                dry_run,
            },
            json,
        ),
        Cmd::Diff {
            volume,
            target,
            base,
            qtree,
            json,
        } => (
            R::Diff {
                volume,
                qtree,
                base,
                target,
            },
            json,
        ),
        Cmd::Status { json } => (R::Status, json),
        Cmd::Mirror { cmd } => match cmd {
            MirrorCmd::Create {
                dst,
                from,
                every,
                follow,
                throttle,
                keep,
                json,
            } => {
                sluice::node::parse_source(&from)?;
                let every_secs = every.as_deref().map(parse_duration).transpose()?;
                (
                    R::MirrorCreate {
                        dst_volume: dst,
                        source: from,
                        dst_qtree: None,
                        every_secs: every_secs.map(|d| d.as_secs().max(1)),
                        follow,
                        throttle_bps: throttle.as_deref().map(parse_rate).transpose()?,
                        keep,
                    },
                    json,
                )
            }
            MirrorCmd::Update { dst, json } => (R::MirrorUpdate { dst }, json),
            MirrorCmd::Status { json } => (R::MirrorStatus, json),
            MirrorCmd::Destinations { json } => (R::MirrorDestinations, json),
            MirrorCmd::Break { dst, json } => (R::MirrorBreak { dst }, json),
            MirrorCmd::Resync { dst, force, json } => (R::MirrorResync { dst, force }, json),
            MirrorCmd::Delete { dst, json } => (R::MirrorDelete { dst }, json),
            MirrorCmd::Retarget {
                dst,
                from,
                allow_full,
                json,
            } => (
                R::MirrorRetarget {
                    dst,
                    source: from,
                    allow_full,
                },
                json,
            ),
        },
        Cmd::Lock { cmd } => match cmd {
            LockCmd::List { json } => (R::LockList, json),
            LockCmd::Add {
                volume,
                snapshot,
                owner,
                text,
                json,
            } => (
                R::LockAdd {
                    volume,
                    snapshot,
                    owner,
                    text,
                },
                json,
            ),
            LockCmd::Release {
                volume,
                snapshot,
                holder,
                json,
            } => (
                R::LockRelease {
                    volume,
                    snapshot,
                    holder,
                },
                json,
            ),
        },
    };
    let node = match cli.node {
        Some(n) => n,
        None => sluice::auth::find_default_socket()?.display().to_string(),
    };
    let token = match &cli.token_file {
        Some(p) => Some(sluice::auth::Token::read_file(p)?),
        None => None,
    };
    Ok(cli::run(&node, token.as_ref(), req, json)?)
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Issue 16: every subcommand and every option or argument says what it
    /// is in `--help` (clap's own `--help` and `--version` aside).
    #[test]
    fn every_subcommand_and_argument_has_a_help_line() {
        let mut missing = Vec::new();
        let mut seen = 0;
        walk(&Cli::command(), "sluice", &mut missing, &mut seen);
        assert!(seen > 50, "walked only {seen} commands and arguments");
        assert!(missing.is_empty(), "without a --help line: {missing:#?}");
    }

    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>, seen: &mut usize) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            *seen += 1;
            if a.get_help().is_none() && a.get_long_help().is_none() {
                missing.push(format!("{path} <{id}>"));
            }
        }
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let p = format!("{path} {}", sub.get_name());
            *seen += 1;
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                missing.push(p.clone());
            }
            walk(sub, &p, missing, seen);
        }
    }
}
