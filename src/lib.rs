//! The `sluice` node as a library: the binary (`src/main.rs`) is a thin
//! command-line shell over these modules.
//!
//! - [`daemon`]: `sluice serve` (process lifecycle, connection routing, HTTP)
//!   and `sluice init`.
//! - [`node`]: a running node's state and the meaning of every control op.
//! - [`control`]: the control API's bytes (JSON lines) and its client.
//! - [`cli`]: operator commands against a node, text or `--json` output.
//! - [`config`]: `serve` settings from flags and TOML.
//! - [`metrics`]: Prometheus text for `GET /metrics`.
//! - [`nbd`]: the NBD server (exports of volumes, qtrees and snapshots).
//! - [`nbd_client`]: a minimal NBD client (the demo's and the soak's workload).
//! - [`units`]: sizes and times as operators write and read them.
//! - [`error`]: [`NodeError`], the crate's one error enum.

pub mod auth;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod error;
pub mod metrics;
pub mod nbd;
pub mod nbd_client;
pub mod node;
pub mod units;

pub use error::{NodeError, Result};
