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
pub mod slots;
pub mod units;

pub use error::{NodeError, Result};

/// Print one line on stdout, as `println!` does, but a reader that went away
/// (`sluice vol list | head`) ends the command quietly (status 0) instead of
/// a panic; any other write error ends it with a one-line error.
#[macro_export]
macro_rules! out {
    () => {
        $crate::print_line(format_args!(""))
    };
    ($($t:tt)*) => {
        $crate::print_line(format_args!($($t)*))
    };
}

/// The body of [`out!`].
pub fn print_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|()| o.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}
