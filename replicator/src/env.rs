//! What the replicator takes from the world, as inputs: the clock and the
//! network. [`RealEnv`] is the machine's clock and TCP; a simulation gives
//! its own ([`Env`]) so that a whole cascade runs in one process on
//! simulated time and a simulated network, and replays from its seed.
//!
//! Owns: the [`PeerStream`] trait (a byte stream to a peer: TCP, or a
//! simulated connection), the [`Env`] trait, and [`SnapshotUsers`] (who
//! else reads snapshots: the node's NBD clients).
//!
//! Invariants kept: every lease, renewal, schedule and timestamp the
//! replicator decides on comes from [`Env::wall_ms`] / [`Env::mono_ms`];
//! every outgoing peer connection comes from [`Env::connect`]. Socket
//! timeouts and throttle pacing stay on the machine's clock: they bound
//! how long a shell waits, they decide nothing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A connected byte stream to a peer.
pub trait PeerStream: Read + Write + Send {
    /// A second handle on the same stream (reader and writer halves).
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn PeerStream>>;
    /// Bound every later read; `None` waits for ever.
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    /// Bound every later write.
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    /// End the stream both ways (wakes a reader on another handle).
    fn shutdown_both(&self);
    /// The far end, for messages.
    fn peer_label(&self) -> String;
}

impl PeerStream for TcpStream {
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn PeerStream>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_write_timeout(self, t)
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn peer_label(&self) -> String {
        self.peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "unknown peer".into())
    }
}

/// The clock and the network a replicator runs on.
pub trait Env: Send + Sync + std::fmt::Debug {
    /// Wall-clock time, ms since the Unix epoch (leases, timestamps).
    fn wall_ms(&self) -> u64;
    /// Monotonic time in ms from an arbitrary origin (schedules).
    fn mono_ms(&self) -> u64;
    /// Open a stream to `addr` (host:port for TCP), within `timeout`.
    fn connect(&self, addr: &str, timeout: Duration) -> std::io::Result<Box<dyn PeerStream>>;
    /// A random value that need not be secret (request ids, ping nonces,
    /// names of temporary snapshots): a simulation derives it from its seed
    /// so that a run replays exactly. Secrets never come from here.
    fn random_u64(&self) -> u64 {
        rand::random()
    }
    /// The id of a snapshot this node takes (see [`Env::random_u64`]).
    fn new_snapshot_id(&self) -> uuid::Uuid {
        uuid::Uuid::new_v4()
    }
}

/// The machine's clock and TCP.
#[derive(Debug)]
pub struct RealEnv {
    origin: std::time::Instant,
}

impl Default for RealEnv {
    fn default() -> Self {
        RealEnv {
            origin: std::time::Instant::now(),
        }
    }
}

impl Env for RealEnv {
    fn wall_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn mono_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn connect(&self, addr: &str, timeout: Duration) -> std::io::Result<Box<dyn PeerStream>> {
        use std::net::ToSocketAddrs;
        let sa = addr.to_socket_addrs()?.next().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("address {addr:?} resolves to nothing"),
            )
        })?;
        let s = TcpStream::connect_timeout(&sa, timeout)?;
        let _ = s.set_nodelay(true);
        Ok(Box::new(s))
    }
}

/// Readers of snapshots outside the replicator: the node's NBD server, whose
/// clients may have a snapshot's export open. A snapshot with readers is in
/// use, as one a transfer reads: prune, retention and a volume mirror's
/// follow-up keep it; `snap delete` (forced or not), `snap rollback -r`
/// and `vol delete` refuse it, naming the readers, until they disconnect.
pub trait SnapshotUsers: Send + Sync {
    /// Open readers of snapshot `snapshot` of `volume` (any of its
    /// namespaces).
    fn readers(&self, volume: &str, snapshot: &str) -> u64;
}
