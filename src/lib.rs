//! The `sluice` node as a library: the binary (`src/main.rs`) is a thin
//! command-line shell over these modules.
//!
//! - [`nbd`]: the NBD server (exports of volumes, qtrees and snapshots).

pub mod nbd;
