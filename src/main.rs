//! The `sluice` binary. Today: `sluice demo` (the engine on a file-backed
//! pool). The daemon, CLI and NBD server come with the node issue.

mod demo;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sluice", version, about = "Snapshot-replication block storage")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the demonstration on files in a temporary folder.
    Demo,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Demo => demo::run(),
    }
}
