//! The engine's one error enum. Every variant carries what an operator needs
//! to act: which device, which block, which volume or snapshot.

use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    #[error("I/O error on {device}: {op} at block {pba}: {source}")]
    Io {
        device: String,
        op: &'static str,
        pba: u64,
        #[source]
        source: std::io::Error,
    },
    // --- Devices and the shard thread (device/uring.rs, shard.rs) ---
    #[error("device {path} is busy: another process (a second sluice daemon?) holds it exclusively; stop it or pick another device")]
    DeviceBusy { path: std::path::PathBuf },
    #[error("cannot open device {path}: {op}: {source}")]
    DeviceOpen {
        path: std::path::PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("device {path}: size {size_bytes} bytes is not a positive multiple of 4096")]
    DeviceSize { path: std::path::PathBuf, size_bytes: u64 },
    #[error("the engine thread has shut down; restart the engine to serve requests")]
    ShutDown,
    // --- end devices block ---
}
