//! sluice-engine: block devices, the on-disk format, copy-on-write volumes,
//! qtrees, snapshots, diffs and consistency points.
//!
//! The map of the whole is `docs/ARCHITECTURE.md`; byte tables are in
//! `docs/FORMAT.md`.

pub mod api;
mod catalog;
pub mod device;
pub mod error;
pub mod format;
pub mod pool;
pub mod shard;
pub mod sharded;
pub mod tree;

pub use error::{Error, Result};
pub use pool::{FormatOptions, Pool, PoolStats};
