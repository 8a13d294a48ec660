//! `sluice-replicator`: mirror relationships, transfers, retention and peer
//! networking (see `docs/REPLICATION.md`).
//!
//! - [`session`]: the sans-IO sessions of one transfer, pull and serve.
//! - [`transfer`]: sans-IO transfer state machines (sender item walk with
//!   checkpoints, receiver validation), wire-lba namespace tags, digests.
//! - [`env`]: the clock and the network as inputs (real, or a simulation's).
//! - [`conn`]: blocking framed peer connections and the hello/auth handshake.
//! - [`secure`]: the Noise session that encrypts a connection after the proof.
//! - [`refusals`]: refused peers logged once per source and interval.
//! - [`throttle`]: token buckets (per relationship, per node).
//! - [`types`]: config, specs, status and lock views, persisted records.
//! - [`replicator`]: [`Replicator`], the node-level owner of it all.
//! - [`error`]: [`ReplError`], the crate's one error enum.

pub mod conn;
pub mod env;
pub mod error;
pub mod refusals;
pub mod replicator;
pub mod scrape;
pub mod secure;
pub mod session;
pub mod throttle;
pub mod transfer;
pub mod types;

pub use env::SnapshotUsers;
pub use error::{ReplError, Result};
pub use replicator::Replicator;
pub use sluice_lockproto::LeasePolicy;
pub use transfer::CheckpointPolicy;
pub use types::{
    Checkpoint, Destination, LockAdded, LockView, MirrorKind, MirrorSpec, MirrorStatus, Progress,
    PrunePlan, PruneSkip, Relationship, ReplicatorConfig, RetargetReport, RollbackReport, Served,
    SnapRef, TransferReport, VolDeleteReport, TRANSFERS_MAX,
};

/// The daemon shares one `Arc<Replicator>` between threads.
#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Replicator>();
}
