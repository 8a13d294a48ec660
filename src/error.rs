//! The node's one error enum: what the daemon, the control API and the CLI
//! report. Each message names the thing that was wrong (a size string, a
//! node address, an op) so an operator can act on one line.

use thiserror::Error;

pub type Result<T, E = NodeError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum NodeError {
    /// `status` found problems (listed in its output): monitoring reads
    /// the exit status.
    #[error("the node is not healthy: {problems} problem(s), listed above")]
    Unhealthy { problems: usize },
    #[error(transparent)]
    Engine(#[from] sluice_engine::error::Error),
    /// The request ran, but what it changed could not be made durable: a
    /// crash may take it back.
    #[error("{op} ran but is not durable (the flush failed: {source}); see `sluice status` and the node's log")]
    NotDurable {
        op: &'static str,
        #[source]
        source: sluice_engine::error::Error,
    },
    #[error(transparent)]
    Repl(#[from] sluice_replicator::ReplError),
    #[error("{path}: {source}")]
    Pool {
        path: String,
        #[source]
        source: sluice_engine::error::Error,
    },
    #[error("bad size {text:?}: {reason}")]
    BadSize { text: String, reason: String },
    #[error("cannot reach node {addr}: {source}")]
    Unreachable {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("node {addr} closed the connection without answering")]
    NoAnswer { addr: String },
    #[error("node {addr} answered something that is not a control response: {reason}")]
    BadAnswer { addr: String, reason: String },
    /// The node answered with an error; the text is the node's own.
    #[error("{0}")]
    Remote(String),
    #[error("bad control request: {0}")]
    BadRequest(String),
    #[error("config file {path}: {reason}")]
    Config { path: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("volume {volume} is open for writing by {writers} NBD client(s); disconnect them first, or use --force (a client's cache then no longer matches the volume)")]
    OpenForWriting { volume: String, writers: u64 },
    // --- NBD protocol violations: each ends that client's connection ---
    #[error("client flags {flags:#x} set unknown bits or lack FIXED_NEWSTYLE (old client?)")]
    NbdBadClientFlags { flags: u32 },
    #[error("bad option magic {magic:#018x} (not an NBD client, or out of sync)")]
    NbdBadOptionMagic { magic: u64 },
    #[error("option {option} carries {len} bytes of data; at most {max} accepted")]
    NbdOptionTooLong { option: u32, len: u32, max: u32 },
    #[error("bad request magic {magic:#010x} (garbage or out of sync)")]
    NbdBadRequestMagic { magic: u32 },
    #[error("command {command} asks for {len} bytes of payload; at most {max}")]
    NbdPayloadTooLong { command: u16, len: u32, max: u32 },
    #[error("unknown command type {command}")]
    NbdUnknownCommand { command: u16 },
    #[error("export {name:?} not found (NBD_OPT_EXPORT_NAME cannot report errors)")]
    NbdExportNameUnknown { name: String },
    #[error("client disconnected in the middle of {during}")]
    NbdDisconnected { during: &'static str },
    #[error("client sent more than {max} options without choosing an export")]
    NbdTooManyOptions { max: usize },
}

impl NodeError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
        let what = what.into();
        move |source| NodeError::Io { what, source }
    }
}
