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
}
