//! The NBD socket shell around [`super::proto`]: threads, sockets and the
//! engine handle.
//!
//! Threads: one accept thread (mio: the listener plus a waker for
//! shutdown); per connection a reader thread (handshake, then parse each
//! request and submit it to the engine with [`EngineHandle::submit`]) and a
//! writer thread (receive engine completions, send each reply as soon as
//! its request is complete, so replies go out of order, matched by handle).
//!
//! Invariants kept:
//! - Every request the reader accepted gets exactly one reply (or the
//!   connection is already broken): the reader registers it in the
//!   connection's table before it submits, the writer removes it when its
//!   last part completes. The writer ends only when the completion channel
//!   closes, i.e. after the reader is gone and every engine submission has
//!   answered, so shutdown never drops an in-flight reply.
//! - Memory per connection is bounded: at most
//!   [`NbdOptions::inflight_max`] requests and
//!   [`NbdOptions::inflight_bytes_max`] bytes of payload in flight (the
//!   reader waits for credit before reading a payload or submitting a
//!   read), plus the socket buffers.
//! - Unaligned writes and write-zeroes edges are read-modify-write: the
//!   reader first waits until the connection has nothing in flight, then
//!   reads, patches and writes synchronously under a server-wide lock, so
//!   sub-block writes to one block from several connections do not lose
//!   each other's bytes.
//! - A client that breaks the protocol, vanishes mid-request or stops
//!   reading replies (for [`NbdOptions::send_timeout`]) loses its
//!   connection with a `tracing::warn!`; nothing else is affected.

use super::metrics::{NbdMetrics, NbdOp};
use super::proto::{self, *};
use crate::error::NodeError;
use crossbeam_channel::{Receiver, Sender};
use sluice_engine::api::{Image, Reply, Request};
use sluice_engine::device::{AlignedBuf, BufPools, BLOCK_SIZE};
use sluice_engine::shard::EngineHandle;
use sluice_engine::Error as EngineError;
use std::collections::HashMap;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest piece of a request sent to the engine in one [`Request`], in
/// blocks (8 MiB, below the engine's read limit of
/// `sluice_engine::pool::READ_BLOCKS_MAX`): a 32 MiB read becomes four
/// engine reads, so other connections' requests interleave with it.
pub const PART_BLOCKS_MAX: u64 = 2048;
const _: () = assert!(PART_BLOCKS_MAX <= sluice_engine::pool::READ_BLOCKS_MAX);

/// Bits of an engine tag that number the parts of one request.
const PART_BITS: u32 = 8;
const _: () = assert!(
    (PAYLOAD_MAX_BYTES as u64 / BLOCK_SIZE as u64 + 2).div_ceil(PART_BLOCKS_MAX) < (1 << PART_BITS)
);

/// Socket buffer size of the writer.
const IO_BUF_BYTES: usize = 256 << 10;
/// Socket buffer size of the reader: large, so one read() takes in many
/// requests, which then reach the engine together (see [`Reader::flush_submits`]).
const READ_BUF_BYTES: usize = 4 << 20;
/// Most engine requests the reader holds back before submitting.
const SUBMIT_BATCH_MAX: usize = 64;

/// Tunables; [`Default`] is what the daemon uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOptions {
    /// Longest a whole handshake may take (however the client paces its
    /// bytes, so a client feeding a byte at a time cannot hold a slot).
    pub handshake_timeout: Duration,
    /// A client that accepts no reply bytes for this long is dropped.
    pub send_timeout: Duration,
    /// Most requests in flight per connection.
    pub inflight_max: usize,
    /// Most payload bytes (write data, read replies) in flight per connection.
    pub inflight_bytes_max: u64,
    /// Most connections at once; more are closed at once with a warning.
    pub connections_max: usize,
    /// Most connections from one IP address at once (one client cannot
    /// take every slot).
    pub connections_per_source_max: usize,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            handshake_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(30),
            inflight_max: 256,
            inflight_bytes_max: 64 << 20,
            connections_max: 256,
            connections_per_source_max: 64,
        }
    }
}

/// A running NBD server. Dropping it does what [`NbdServer::shutdown`]
/// does.
pub struct NbdServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    waker: Arc<mio::Waker>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NbdServer({})", self.addr)
    }
}

struct Conn {
    /// A clone of the socket, to wake the reader at shutdown.
    stream: TcpStream,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    engine: EngineHandle,
    metrics: Arc<NbdMetrics>,
    opts: NbdOptions,
    stopping: AtomicBool,
    /// Live connections, to wake at shutdown.
    conns: Mutex<HashMap<u64, Conn>>,
    /// The bounds: `connections_max`, `connections_per_source_max` per IP.
    slots: crate::slots::Slots,
    /// Serializes read-modify-write cycles across connections.
    rmw: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked holder cannot leave these structures half-updated in a
    // way that matters more than stopping service would.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const LISTENER: mio::Token = mio::Token(0);
const WAKER: mio::Token = mio::Token(1);

impl NbdServer {
    /// Start accepting on `listener` (already bound) in background thread(s).
    pub fn start(
        listener: TcpListener,
        engine: EngineHandle,
        metrics: Arc<NbdMetrics>,
    ) -> std::io::Result<NbdServer> {
        Self::start_with_options(listener, engine, metrics, NbdOptions::default())
    }

    /// [`NbdServer::start`] with explicit tunables.
    pub fn start_with_options(
        listener: TcpListener,
        engine: EngineHandle,
        metrics: Arc<NbdMetrics>,
        opts: NbdOptions,
    ) -> std::io::Result<NbdServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let mut listener = mio::net::TcpListener::from_std(listener);
        let poll = mio::Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, mio::Interest::READABLE)?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER)?);
        let shared = Arc::new(Shared {
            engine,
            metrics,
            opts: opts.clone(),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            slots: crate::slots::Slots::new(opts.connections_max, opts.connections_per_source_max),
            rmw: Mutex::new(()),
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("sluice-nbd-accept".to_string())
            .spawn(move || accept_loop(poll, listener, s))?;
        tracing::info!(%addr, "NBD server listening");
        Ok(NbdServer {
            addr,
            shared,
            waker,
            acceptor: Some(acceptor),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Graceful stop: stop accepting, stop reading new requests, let every
    /// in-flight request complete and its reply be sent, close connections,
    /// join all threads. Returns after that (the daemon then takes the final CP).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.acceptor.is_none() {
            return;
        }
        {
            // Under the lock: the acceptor registers connections under it
            // and checks the flag first, so none slips past.
            let conns = lock(&self.shared.conns);
            self.shared.stopping.store(true, Ordering::SeqCst);
            drop(conns);
        }
        if let Err(e) = self.waker.wake() {
            tracing::error!(error = %e, "cannot wake the NBD accept thread");
        }
        if let Some(t) = self.acceptor.take() {
            if t.join().is_err() {
                tracing::error!("the NBD accept thread panicked");
            }
        }
        let conns: Vec<Conn> = lock(&self.shared.conns).drain().map(|(_, c)| c).collect();
        for c in &conns {
            // Wakes a reader blocked in read(); it sees `stopping` and ends.
            let _ = c.stream.shutdown(Shutdown::Read);
        }
        for mut c in conns {
            if let Some(t) = c.thread.take() {
                if t.join().is_err() {
                    tracing::error!("an NBD connection thread panicked");
                }
            }
        }
        tracing::info!(addr = %self.addr, "NBD server stopped");
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(mut poll: mio::Poll, listener: mio::net::TcpListener, shared: Arc<Shared>) {
    let mut events = mio::Events::with_capacity(16);
    let mut next_id = 0u64;
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "NBD accept poll failed; no new connections");
            return;
        }
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        loop {
            let (stream, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "NBD accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            };
            let stream = TcpStream::from(stream);
            next_id += 1;
            admit(&shared, stream, peer, next_id);
        }
    }
}

/// Register and start one connection, or refuse it.
fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr, id: u64) {
    let mut conns = lock(&shared.conns);
    if shared.stopping.load(Ordering::SeqCst) {
        return;
    }
    // Reap finished connections.
    conns.retain(|_, c| !c.thread.as_ref().is_some_and(|t| t.is_finished()));
    let slot = match shared.slots.take(&peer.ip().to_string()) {
        Ok(s) => s,
        Err(full) => {
            tracing::warn!(%peer, "NBD connection refused: {full}");
            return;
        }
    };
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.try_clone());
    let wake = match setup {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot set up an NBD connection");
            return;
        }
    };
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("sluice-nbd-{id}"))
        .spawn(move || {
            connection(s, stream, peer);
            drop(slot);
        });
    match thread {
        Ok(t) => {
            conns.insert(
                id,
                Conn {
                    stream: wake,
                    thread: Some(t),
                },
            );
        }
        Err(e) => tracing::warn!(%peer, error = %e, "cannot spawn an NBD connection thread"),
    }
}

/// Why a connection ended early.
enum End {
    /// The client broke the protocol (counted, warned).
    Protocol(NodeError),
    /// The socket failed (reset, timeout).
    Io(&'static str, std::io::Error),
}

impl From<NodeError> for End {
    fn from(e: NodeError) -> Self {
        End::Protocol(e)
    }
}

fn connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    shared.metrics.connection_opened();
    let r = match handshake(&shared, &stream) {
        Ok(Some(export)) => {
            tracing::debug!(%peer, export = %export.name, "NBD transmission starts");
            // Counted while it lasts, so `snap rollback` can refuse to
            // change a live image under a client that may write it.
            let writer = (!export.read_only).then(|| export.image.ns.volume.clone());
            if let Some(v) = &writer {
                shared.metrics.writer_opened(v);
            }
            // And a snapshot export's reader, so the snapshot is kept from
            // prune, retention and `snap delete` while the client reads.
            let reader = export
                .image
                .snapshot
                .clone()
                .map(|s| (export.image.ns.volume.clone(), s));
            if let Some((v, s)) = &reader {
                shared.metrics.snapshot_reader_opened(v, s);
            }
            let r = transmission(&shared, &stream, export, peer);
            if let Some(v) = &writer {
                shared.metrics.writer_closed(v);
            }
            if let Some((v, s)) = &reader {
                shared.metrics.snapshot_reader_closed(v, s);
            }
            r
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    // The registry holds a clone of the socket (to wake the reader at
    // shutdown): dropping ours alone would not close the connection.
    let _ = stream.shutdown(Shutdown::Both);
    match r {
        Ok(()) => tracing::debug!(%peer, "NBD connection closed"),
        Err(End::Protocol(e)) => {
            shared.metrics.protocol_error();
            tracing::warn!(%peer, "closing NBD connection: {e}");
        }
        Err(End::Io(during, e)) => {
            if !shared.stopping.load(Ordering::SeqCst) {
                tracing::warn!(%peer, error = %e, "closing NBD connection: socket error {during}");
            }
        }
    }
    shared.metrics.connection_closed();
}

/// Read exactly `buf`; `Ok(false)` on a clean EOF before the first byte.
fn read_full(r: &mut impl Read, buf: &mut [u8], during: &'static str) -> Result<bool, End> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) if at == 0 => return Ok(false),
            Ok(0) => return Err(NodeError::NbdDisconnected { during }.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(End::Io(during, e)),
        }
    }
    Ok(true)
}

fn read_all(r: &mut impl Read, buf: &mut [u8], during: &'static str) -> Result<(), End> {
    if buf.is_empty() || read_full(r, buf, during)? {
        Ok(())
    } else {
        Err(NodeError::NbdDisconnected { during }.into())
    }
}

/// Reads that all end by one deadline: each sets the socket's timeout to
/// what is left of it.
struct ByDeadline<'a> {
    s: &'a TcpStream,
    deadline: std::time::Instant,
}

impl Read for ByDeadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the handshake took longer than its timeout",
            ));
        }
        self.s.set_read_timeout(Some(left))?;
        let mut s = self.s;
        s.read(buf)
    }
}

/// The fixed-newstyle negotiation, within `handshake_timeout` in all.
/// `Ok(None)`: the client left (ABORT, EOF) without choosing an export.
fn handshake(shared: &Shared, stream: &TcpStream) -> Result<Option<Export>, End> {
    let io = |during| move |e| End::Io(during, e);
    stream
        .set_write_timeout(Some(shared.opts.send_timeout))
        .map_err(io("setting the send timeout"))?;
    let mut s = stream;
    let mut r = ByDeadline {
        s: stream,
        deadline: std::time::Instant::now() + shared.opts.handshake_timeout,
    };
    s.write_all(&greeting())
        .map_err(io("sending the greeting"))?;
    let mut cf = [0u8; 4];
    if !read_full(&mut r, &mut cf, "the client flags")? {
        return Ok(None);
    }
    let flags = parse_client_flags(cf)?;
    let mut catalog = EngineCatalog {
        engine: &shared.engine,
    };
    for _ in 0..OPTIONS_MAX {
        let mut hb = [0u8; OPTION_HEADER_BYTES];
        if !read_full(&mut r, &mut hb, "an option header")? {
            return Ok(None);
        }
        let h = parse_option_header(&hb)?;
        let mut data = vec![0u8; h.len as usize];
        read_all(&mut r, &mut data, "option data")?;
        let mut out = Vec::new();
        let step = if shared.stopping.load(Ordering::SeqCst) && h.option != OPT_ABORT {
            encode_option_error(
                &mut out,
                h.option,
                REP_ERR_SHUTDOWN,
                "the server is shutting down",
            );
            Step::Close
        } else {
            negotiate(
                &parse_option(h.option, &data),
                flags,
                &mut catalog,
                &mut out,
            )?
        };
        s.write_all(&out).map_err(io("sending an option reply"))?;
        match step {
            Step::Continue => {}
            Step::Close => return Ok(None),
            Step::Transmit(e) => {
                stream
                    .set_read_timeout(None)
                    .map_err(io("clearing the handshake timeout"))?;
                return Ok(Some(e));
            }
        }
    }
    Err(NodeError::NbdTooManyOptions { max: OPTIONS_MAX }.into())
}

/// Exports resolved through the engine: `ListVolumes`, `ListSnapshots`.
struct EngineCatalog<'a> {
    engine: &'a EngineHandle,
}

fn refusal_of(e: EngineError) -> OptionRefusal {
    let code = match e {
        EngineError::ShutDown => REP_ERR_SHUTDOWN,
        _ => REP_ERR_UNKNOWN,
    };
    OptionRefusal {
        code,
        message: e.to_string(),
    }
}

fn unknown(message: String) -> OptionRefusal {
    OptionRefusal {
        code: REP_ERR_UNKNOWN,
        message,
    }
}

impl EngineCatalog<'_> {
    fn volumes(&self) -> Result<Vec<sluice_engine::api::VolumeInfo>, OptionRefusal> {
        match self.engine.call(Request::ListVolumes) {
            Ok(Reply::Volumes(v)) => Ok(v),
            Ok(other) => Err(unknown(format!("engine answered {other:?} to ListVolumes"))),
            Err(e) => Err(refusal_of(e)),
        }
    }

    fn snapshots(&self, volume: &str) -> Result<Vec<String>, OptionRefusal> {
        match self.engine.call(Request::ListSnapshots {
            volume: volume.to_string(),
        }) {
            Ok(Reply::Snapshots(s)) => Ok(s.into_iter().map(|s| s.name).collect()),
            Ok(other) => Err(unknown(format!(
                "engine answered {other:?} to ListSnapshots"
            ))),
            Err(e) => Err(refusal_of(e)),
        }
    }
}

impl Catalog for EngineCatalog<'_> {
    fn lookup(&mut self, name: &str) -> Result<Export, OptionRefusal> {
        let image = parse_export_name(name).map_err(unknown)?;
        let vols = self.volumes()?;
        let vol = vols
            .iter()
            .find(|v| v.name == image.ns.volume)
            .ok_or_else(|| unknown(format!("no volume named {}", image.ns.volume)))?;
        // A read-only volume (a volume mirror's destination) covers its
        // qtrees; a qtree can be read-only alone (a qtree mirror's).
        let (size_bytes, ns_read_only) = match &image.ns.qtree {
            None => (vol.size_bytes, vol.read_only),
            Some(q) => {
                let qt = vol.qtrees.iter().find(|x| &x.name == q).ok_or_else(|| {
                    unknown(format!("volume {} has no qtree named {q}", vol.name))
                })?;
                (qt.size_bytes, vol.read_only || qt.read_only)
            }
        };
        if let Some(snap) = &image.snapshot {
            if !self.snapshots(&vol.name)?.iter().any(|s| s == snap) {
                return Err(unknown(format!(
                    "volume {} has no snapshot named {snap}",
                    vol.name
                )));
            }
        }
        Ok(Export {
            name: name.to_string(),
            read_only: image.snapshot.is_some() || ns_read_only,
            image,
            size_bytes,
        })
    }

    fn list(&mut self) -> Result<Vec<String>, OptionRefusal> {
        let mut out = Vec::new();
        for v in self.volumes()? {
            let snaps = self.snapshots(&v.name)?;
            let mut paths = vec![v.name.clone()];
            paths.extend(v.qtrees.iter().map(|q| format!("{}/{}", v.name, q.name)));
            for p in paths {
                out.extend(snaps.iter().map(|s| format!("{p}@{s}")));
                out.push(p);
            }
        }
        Ok(out)
    }
}

// ------------------------------------------------------------------------
// Transmission
// ------------------------------------------------------------------------

/// One request between the reader and the writer.
struct Pending {
    handle: u64,
    op: Option<NbdOp>,
    start: Instant,
    /// Parts (engine requests) not yet completed.
    parts_left: u32,
    /// Read only: the data parts in order, and which bytes of their
    /// concatenation the client asked for.
    data: Vec<Option<AlignedBuf>>,
    head_bytes: usize,
    len_bytes: u64,
    /// First error of any part (0 = none).
    errno: u32,
    /// Credit taken from the flow control, given back at the reply.
    credit_bytes: u64,
}

#[derive(Default)]
struct Flow {
    count: usize,
    bytes: u64,
}

/// What the reader and the writer of one connection share.
struct ConnState {
    table: Mutex<HashMap<u64, Pending>>,
    flow: Mutex<Flow>,
    flow_cv: Condvar,
    /// The writer lost the socket: the reader stops.
    broken: AtomicBool,
    next_id: AtomicU64,
}

impl ConnState {
    /// Take room for one more request of `bytes` if there is some now.
    fn try_acquire(&self, opts: &NbdOptions, bytes: u64) -> bool {
        let mut f = lock(&self.flow);
        let room = f.count < opts.inflight_max
            && (f.count == 0 || f.bytes + bytes <= opts.inflight_bytes_max);
        if room {
            f.count += 1;
            f.bytes += bytes;
        }
        room
    }

    /// Wait for room for one more request of `bytes`; false if the
    /// connection broke meanwhile.
    fn acquire(&self, opts: &NbdOptions, bytes: u64) -> bool {
        let mut f = lock(&self.flow);
        loop {
            if self.broken.load(Ordering::SeqCst) {
                return false;
            }
            let room = f.count < opts.inflight_max
                && (f.count == 0 || f.bytes + bytes <= opts.inflight_bytes_max);
            if room {
                f.count += 1;
                f.bytes += bytes;
                return true;
            }
            f = self.flow_cv.wait(f).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn release(&self, bytes: u64) {
        let mut f = lock(&self.flow);
        f.count = f.count.saturating_sub(1);
        f.bytes = f.bytes.saturating_sub(bytes);
        drop(f);
        self.flow_cv.notify_all();
    }

    /// Wait until nothing is in flight; false if the connection broke.
    fn drain(&self) -> bool {
        let mut f = lock(&self.flow);
        loop {
            if self.broken.load(Ordering::SeqCst) {
                return false;
            }
            if f.count == 0 {
                return true;
            }
            f = self.flow_cv.wait(f).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn set_broken(&self) {
        self.broken.store(true, Ordering::SeqCst);
        let _f = lock(&self.flow);
        self.flow_cv.notify_all();
    }

    /// Register a request of `parts` engine requests; returns its id.
    fn register(&self, p: Pending) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.table).insert(id, p);
        id
    }
}

fn tag(id: u64, part: usize) -> u64 {
    (id << PART_BITS) | part as u64
}

fn op_of(command: u16) -> Option<NbdOp> {
    match command {
        CMD_READ => Some(NbdOp::Read),
        CMD_WRITE => Some(NbdOp::Write),
        CMD_FLUSH => Some(NbdOp::Flush),
        CMD_TRIM => Some(NbdOp::Trim),
        CMD_WRITE_ZEROES => Some(NbdOp::WriteZeroes),
        _ => None,
    }
}

fn transmission(
    shared: &Arc<Shared>,
    stream: &TcpStream,
    export: Export,
    peer: SocketAddr,
) -> Result<(), End> {
    let io = |during| move |e| End::Io(during, e);
    let wstream = stream.try_clone().map_err(io("cloning the socket"))?;
    wstream
        .set_write_timeout(Some(shared.opts.send_timeout))
        .map_err(io("setting the send timeout"))?;
    let state = Arc::new(ConnState {
        table: Mutex::new(HashMap::new()),
        flow: Mutex::new(Flow::default()),
        flow_cv: Condvar::new(),
        broken: AtomicBool::new(false),
        next_id: AtomicU64::new(1),
    });
    let (done_tx, done_rx) = crossbeam_channel::unbounded();
    let writer = {
        let state = state.clone();
        let metrics = shared.metrics.clone();
        std::thread::Builder::new()
            .name("sluice-nbd-tx".to_string())
            .spawn(move || writer(wstream, done_rx, state, metrics, peer))
            .map_err(io("spawning the writer thread"))?
    };
    let mut reader = Reader {
        shared,
        state: &state,
        export: &export,
        done: done_tx,
        rd: BufReader::with_capacity(READ_BUF_BYTES, stream),
        queued: Vec::with_capacity(SUBMIT_BATCH_MAX),
        bufs: BufPools::new(
            PAYLOAD_SIZES_MAX,
            PAYLOAD_SPARE_BYTES,
            shared.opts.inflight_max,
        ),
    };
    let r = reader.run();
    // Requests accepted but held back are submitted (and answered) too.
    reader.flush_submits();
    // Closing the completion channel (with the engine's clones, once every
    // submission answered) lets the writer finish.
    drop(reader);
    if writer.join().is_err() {
        tracing::error!(%peer, "the NBD writer thread panicked");
    }
    r
}

struct Reader<'a> {
    shared: &'a Arc<Shared>,
    state: &'a Arc<ConnState>,
    export: &'a Export,
    done: Sender<(u64, sluice_engine::Result<Reply>)>,
    rd: BufReader<&'a TcpStream>,
    /// Engine requests parsed but not yet submitted, in order.
    queued: Vec<(Request, u64)>,
    /// Recycled write payload buffers.
    bufs: BufPools,
}

/// Most buffer sizes a connection recycles: a client writes in few sizes
/// (its block size, its maximum request, the split parts of that).
const PAYLOAD_SIZES_MAX: usize = 4;

/// Most bytes of spare buffers one size keeps per connection (32 of
/// 128 KiB: a queue depth of 32 at that size recycles them all). So an
/// aligned write neither allocates nor zeroes its buffer (the payload
/// overwrites it whole), which at 128 KiB per write was a memset per
/// request. Buffers come back when the engine drops them, from its thread.
const PAYLOAD_SPARE_BYTES: usize = 4 << 20;

impl Reader<'_> {
    /// Queue an engine request. Requests are held back while more whole
    /// requests sit in the read buffer, then submitted back to back, so the
    /// engine finds them together in its queue and batches them into one
    /// device submission (the client's queue depth reaches the device).
    fn submit(&mut self, req: Request, tag: u64) {
        self.queued.push((req, tag));
        if self.queued.len() >= SUBMIT_BATCH_MAX {
            self.flush_submits();
        }
    }

    /// Submit everything held back. Called before anything that may block
    /// (a socket read, waiting for credit or for a drain), so a held-back
    /// request never waits on itself.
    fn flush_submits(&mut self) {
        for (req, tag) in self.queued.drain(..) {
            self.shared.engine.submit(req, tag, self.done.clone());
        }
    }

    /// Flush held-back requests unless `bytes` more are already buffered.
    fn before_reading(&mut self, bytes: usize) {
        if self.rd.buffer().len() < bytes {
            self.flush_submits();
        }
    }

    fn acquire(&mut self, bytes: u64) -> bool {
        if !self.state.try_acquire(&self.shared.opts, bytes) {
            self.flush_submits();
            return self.state.acquire(&self.shared.opts, bytes);
        }
        true
    }

    fn drain(&mut self) -> bool {
        self.flush_submits();
        self.state.drain()
    }

    fn run(&mut self) -> Result<(), End> {
        loop {
            if self.shared.stopping.load(Ordering::SeqCst)
                || self.state.broken.load(Ordering::SeqCst)
            {
                return Ok(());
            }
            self.before_reading(REQUEST_HEADER_BYTES);
            let mut hb = [0u8; REQUEST_HEADER_BYTES];
            match read_full(&mut self.rd, &mut hb, "a request header") {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(_) if self.stopping_or_broken() => return Ok(()),
                Err(e) => return Err(e),
            }
            let start = Instant::now();
            let h = parse_request_header(&hb)?;
            let r = match validate(&h, self.export) {
                Err(errno) => self.refuse(&h, errno, start),
                Ok(Command::Disc) => return Ok(()),
                Ok(Command::Read { offset, len }) => self.read(&h, offset, len, start),
                Ok(Command::Write { offset, len, fua }) => self.write(&h, offset, len, fua, start),
                Ok(Command::Flush) => self.submit_parts(&h, start, 0, 0, vec![Request::Flush]),
                Ok(Command::Trim { offset, len, fua }) => self.trim(&h, offset, len, fua, start),
                Ok(Command::WriteZeroes { offset, len, fua }) => {
                    self.write_zeroes(&h, offset, len, fua, start)
                }
            };
            match r {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(_) if self.stopping_or_broken() => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn stopping_or_broken(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst) || self.state.broken.load(Ordering::SeqCst)
    }

    /// Reply `errno` now (through the writer, to keep replies serialized),
    /// after consuming a write's payload. `Ok(false)`: connection broke.
    fn refuse(&mut self, h: &RequestHeader, errno: u32, start: Instant) -> Result<bool, End> {
        let payload = h.payload_bytes() as u64;
        if payload > 0 {
            self.before_reading(payload as usize);
            let n = std::io::copy(&mut (&mut self.rd).take(payload), &mut std::io::sink())
                .map_err(|e| End::Io("a write payload", e))?;
            if n < payload {
                return Err(NodeError::NbdDisconnected {
                    during: "a write payload",
                }
                .into());
            }
        }
        self.reply_now(h, errno, start, 0)
    }

    /// Queue a finished reply for the writer.
    fn reply_now(
        &mut self,
        h: &RequestHeader,
        errno: u32,
        start: Instant,
        len_bytes: u64,
    ) -> Result<bool, End> {
        if !self.acquire(0) {
            return Ok(false);
        }
        self.finish_now(h, errno, start, len_bytes, 0);
        Ok(true)
    }

    /// Like `reply_now` for a request whose credit is already held.
    fn finish_now(&mut self, h: &RequestHeader, errno: u32, start: Instant, len: u64, credit: u64) {
        let id = self.state.register(Pending {
            handle: h.handle,
            op: op_of(h.command),
            start,
            parts_left: 1,
            data: Vec::new(),
            head_bytes: 0,
            len_bytes: len,
            errno,
            credit_bytes: credit,
        });
        let _ = self.done.send((tag(id, 0), Ok(Reply::Done)));
    }

    /// Register and submit a request made of `reqs` engine requests.
    fn submit_parts(
        &mut self,
        h: &RequestHeader,
        start: Instant,
        len_bytes: u64,
        credit: u64,
        reqs: Vec<Request>,
    ) -> Result<bool, End> {
        if credit == 0 && !self.acquire(0) {
            return Ok(false);
        }
        let id = self.state.register(Pending {
            handle: h.handle,
            op: op_of(h.command),
            start,
            parts_left: reqs.len() as u32,
            data: Vec::new(),
            head_bytes: 0,
            len_bytes,
            errno: 0,
            credit_bytes: credit,
        });
        for (i, r) in reqs.into_iter().enumerate() {
            self.submit(r, tag(id, i));
        }
        Ok(true)
    }

    fn read(
        &mut self,
        h: &RequestHeader,
        offset: u64,
        len: u32,
        start: Instant,
    ) -> Result<bool, End> {
        if len == 0 {
            return self.reply_now(h, 0, start, 0);
        }
        let span = Span::covering(offset, len as u64);
        let credit = span.len_blocks * BLOCK_SIZE as u64;
        if !self.acquire(credit) {
            return Ok(false);
        }
        let parts = split(span.lba, span.len_blocks, PART_BLOCKS_MAX);
        let id = self.state.register(Pending {
            handle: h.handle,
            op: Some(NbdOp::Read),
            start,
            parts_left: parts.len() as u32,
            data: (0..parts.len()).map(|_| None).collect(),
            head_bytes: span.head_bytes,
            len_bytes: len as u64,
            errno: 0,
            credit_bytes: credit,
        });
        for (i, (lba, n)) in parts.into_iter().enumerate() {
            let req = Request::Read {
                image: self.export.image.clone(),
                lba,
                len_blocks: n as u32,
            };
            self.submit(req, tag(id, i));
        }
        Ok(true)
    }

    fn write(
        &mut self,
        h: &RequestHeader,
        offset: u64,
        len: u32,
        fua: bool,
        start: Instant,
    ) -> Result<bool, End> {
        if len == 0 {
            return self.reply_now(h, 0, start, 0);
        }
        let len64 = len as u64;
        if Span::aligned(offset, len64) {
            if !self.acquire(len64) {
                return Ok(false);
            }
            let mut reqs = Vec::new();
            let lba0 = offset / BLOCK_SIZE as u64;
            for (lba, n) in split(lba0, len64 / BLOCK_SIZE as u64, PART_BLOCKS_MAX) {
                let mut buf = self.bufs.take(n as usize);
                self.before_reading(buf.len_bytes());
                read_all(&mut self.rd, buf.as_mut_slice(), "a write payload")?;
                reqs.push(Request::Write {
                    ns: self.export.image.ns.clone(),
                    lba,
                    data: buf,
                    fua,
                    replica: false,
                });
            }
            return self.submit_parts(h, start, len64, len64, reqs);
        }
        // Unaligned: everything earlier on this connection first, then a
        // synchronous read-modify-write.
        if !self.drain() || !self.acquire(len64) {
            return Ok(false);
        }
        let mut data = vec![0u8; len as usize];
        read_all(&mut self.rd, &mut data, "a write payload")?;
        let errno = match rmw(self.shared, self.export, offset, &data, fua) {
            Ok(()) => 0,
            Err(e) => log_engine_error(self.export, "write", offset, len64, &e),
        };
        self.finish_now(h, errno, start, len64, len64);
        Ok(true)
    }

    fn trim(
        &mut self,
        h: &RequestHeader,
        offset: u64,
        len: u32,
        fua: bool,
        start: Instant,
    ) -> Result<bool, End> {
        // Trim is a hint: only the whole blocks inside the range go.
        let mut reqs = Vec::new();
        if let Some((lba, n)) = ZeroPlan::new(offset, len as u64).middle {
            reqs.push(Request::Trim {
                ns: self.export.image.ns.clone(),
                lba,
                len_blocks: n,
                replica: false,
            });
        }
        if fua && !reqs.is_empty() {
            reqs.push(Request::Flush);
        }
        if reqs.is_empty() {
            return self.reply_now(h, 0, start, len as u64);
        }
        self.submit_parts(h, start, len as u64, 0, reqs)
    }

    fn write_zeroes(
        &mut self,
        h: &RequestHeader,
        offset: u64,
        len: u32,
        fua: bool,
        start: Instant,
    ) -> Result<bool, End> {
        let plan = ZeroPlan::new(offset, len as u64);
        let trim = plan.middle.map(|(lba, n)| Request::Trim {
            ns: self.export.image.ns.clone(),
            lba,
            len_blocks: n,
            replica: false,
        });
        if plan.head.is_none() && plan.tail.is_none() {
            let mut reqs: Vec<Request> = trim.into_iter().collect();
            if reqs.is_empty() {
                return self.reply_now(h, 0, start, 0);
            }
            if fua {
                reqs.push(Request::Flush);
            }
            return self.submit_parts(h, start, len as u64, 0, reqs);
        }
        // Partial blocks at the edges: synchronous, after a drain.
        if !self.drain() || !self.acquire(0) {
            return Ok(false);
        }
        let bs = BLOCK_SIZE as u64;
        let mut result = Ok(());
        for (lba, from, to) in [plan.head, plan.tail].into_iter().flatten() {
            if result.is_ok() {
                let zeros = vec![0u8; to - from];
                result = rmw(
                    self.shared,
                    self.export,
                    lba * bs + from as u64,
                    &zeros,
                    false,
                );
            }
        }
        if let (Ok(()), Some(t)) = (&result, trim) {
            result = self.shared.engine.call(t).map(|_| ());
        }
        if let (Ok(()), true) = (&result, fua) {
            result = self.shared.engine.call(Request::Flush).map(|_| ());
        }
        let errno = match result {
            Ok(()) => 0,
            Err(e) => log_engine_error(self.export, "write_zeroes", offset, len as u64, &e),
        };
        self.finish_now(h, errno, start, len as u64, 0);
        Ok(true)
    }
}

/// Read-modify-write `data` at byte `offset` of the export's live image:
/// read the partial edge blocks, patch, write the covering blocks.
fn rmw(
    shared: &Shared,
    export: &Export,
    offset: u64,
    data: &[u8],
    fua: bool,
) -> Result<(), EngineError> {
    let span = Span::covering(offset, data.len() as u64);
    let bs = BLOCK_SIZE as u64;
    let end = offset + data.len() as u64;
    let last = span.lba + span.len_blocks - 1;
    let live = Image {
        ns: export.image.ns.clone(),
        snapshot: None,
    };
    let _serial = lock(&shared.rmw);
    let mut buf = AlignedBuf::zeroed(span.len_blocks as usize);
    let read_block = |lba: u64| -> Result<AlignedBuf, EngineError> {
        match shared.engine.call(Request::Read {
            image: live.clone(),
            lba,
            len_blocks: 1,
        })? {
            Reply::Data(b) if b.len_bytes() == BLOCK_SIZE => Ok(b),
            other => Err(EngineError::Invalid(format!(
                "engine answered {other:?} to a one-block read"
            ))),
        }
    };
    if span.head_bytes != 0 {
        buf.block_mut(0)
            .copy_from_slice(read_block(span.lba)?.as_slice());
    }
    // The tail block, unless it is the head block already read.
    let tail_read = last == span.lba && span.head_bytes != 0;
    if !end.is_multiple_of(bs) && !tail_read {
        let i = span.len_blocks as usize - 1;
        buf.block_mut(i)
            .copy_from_slice(read_block(last)?.as_slice());
    }
    buf.as_mut_slice()[span.head_bytes..span.head_bytes + data.len()].copy_from_slice(data);
    for (lba, n) in split(span.lba, span.len_blocks, PART_BLOCKS_MAX) {
        let from = ((lba - span.lba) * bs) as usize;
        let piece = AlignedBuf::from_slice(&buf.as_slice()[from..from + (n * bs) as usize]);
        shared.engine.call(Request::Write {
            ns: export.image.ns.clone(),
            lba,
            data: piece,
            fua,
            replica: false,
        })?;
    }
    Ok(())
}

/// The errno for an engine error, logged where an operator should see it.
fn log_engine_error(export: &Export, op: &str, offset: u64, len: u64, e: &EngineError) -> u32 {
    let errno = proto::errno_for(e);
    if errno == EIO {
        tracing::warn!(export = %export.name, op, offset, len, error = %e, "NBD request failed");
    } else {
        tracing::debug!(export = %export.name, op, offset, len, error = %e, "NBD request refused");
    }
    errno
}

/// The writer thread: completions in, replies out, until the channel
/// closes (reader gone, every engine submission answered).
fn writer(
    stream: TcpStream,
    done: Receiver<(u64, sluice_engine::Result<Reply>)>,
    state: Arc<ConnState>,
    metrics: Arc<NbdMetrics>,
    peer: SocketAddr,
) {
    let mut w = BufWriter::with_capacity(IO_BUF_BYTES, &stream);
    let mut ok = true;
    while let Ok(first) = done.recv() {
        let mut next = Some(first);
        while let Some((t, r)) = next.take() {
            if let Some(p) = complete(&state, t, r) {
                if ok {
                    if let Err(e) = send_reply(&mut w, &p) {
                        ok = false;
                        broken(&stream, &state, peer, &e);
                    }
                }
                if let Some(op) = p.op {
                    let bytes = if op == NbdOp::Flush { 0 } else { p.len_bytes };
                    metrics.record(op, bytes, p.errno == 0, p.start.elapsed());
                }
                state.release(p.credit_bytes);
            }
            next = done.try_recv().ok();
        }
        if ok {
            if let Err(e) = w.flush() {
                ok = false;
                broken(&stream, &state, peer, &e);
            }
        }
    }
}

fn broken(stream: &TcpStream, state: &ConnState, peer: SocketAddr, e: &std::io::Error) {
    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
        tracing::warn!(%peer, "closing NBD connection: the client does not read its replies");
    } else {
        tracing::debug!(%peer, error = %e, "NBD client gone while sending a reply");
    }
    state.set_broken();
    let _ = stream.shutdown(Shutdown::Both);
}

/// Account one engine completion; the request if it is now complete.
fn complete(state: &ConnState, t: u64, r: sluice_engine::Result<Reply>) -> Option<Pending> {
    let id = t >> PART_BITS;
    let part = (t & ((1 << PART_BITS) - 1)) as usize;
    let mut table = lock(&state.table);
    let Some(p) = table.get_mut(&id) else {
        tracing::error!(tag = t, "NBD completion for no pending request");
        return None;
    };
    match r {
        Ok(Reply::Data(b)) => {
            if let Some(slot) = p.data.get_mut(part) {
                *slot = Some(b);
            }
        }
        Ok(_) => {}
        Err(e) => {
            if p.errno == 0 {
                p.errno = proto::errno_for(&e);
                let level_warn = p.errno == EIO;
                if level_warn {
                    tracing::warn!(handle = p.handle, error = %e, "NBD request failed");
                } else {
                    tracing::debug!(handle = p.handle, error = %e, "NBD request refused");
                }
            }
        }
    }
    p.parts_left = p.parts_left.saturating_sub(1);
    if p.parts_left == 0 {
        table.remove(&id)
    } else {
        None
    }
}

fn send_reply(w: &mut impl Write, p: &Pending) -> std::io::Result<()> {
    let is_read = p.op == Some(NbdOp::Read) && !p.data.is_empty();
    let mut errno = p.errno;
    if is_read && errno == 0 {
        // Every part present and long enough for the bytes asked.
        let total: usize = p.data.iter().flatten().map(AlignedBuf::len_bytes).sum();
        if p.data.iter().any(Option::is_none) || total < p.head_bytes + p.len_bytes as usize {
            tracing::error!(handle = p.handle, "NBD read completed without all its data");
            errno = EIO;
        }
    }
    w.write_all(&encode_simple_reply(errno, p.handle))?;
    if is_read && errno == 0 {
        let mut skip = p.head_bytes;
        let mut left = p.len_bytes as usize;
        for b in p.data.iter().flatten() {
            let s = b.as_slice();
            if skip >= s.len() {
                skip -= s.len();
                continue;
            }
            let n = (s.len() - skip).min(left);
            w.write_all(&s[skip..skip + n])?;
            left -= n;
            skip = 0;
            if left == 0 {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The shell against a real engine on a temp file, driven by a raw
    //! client: the things qemu cannot be made to do (never reading replies,
    //! shutdown with requests in flight).

    use super::*;
    use sluice_engine::device::uring::{UringDevice, UringOptions};
    use sluice_engine::pool::{FormatOptions, Pool};
    use sluice_engine::shard::{Engine, EngineOptions};

    fn engine(dir: &std::path::Path) -> EngineHandle {
        let dev = UringDevice::create(&dir.join("pool.img"), 256 << 20, UringOptions::default())
            .expect("pool file");
        let pool = Pool::format(dev, FormatOptions::default()).expect("format");
        let e = Engine::start(pool, EngineOptions::default());
        e.call(Request::CreateVolume {
            name: "v".into(),
            size_bytes: 64 << 20,
        })
        .expect("volume");
        e
    }

    fn connect(addr: SocketAddr, export: &str) -> TcpStream {
        let mut s = TcpStream::connect(addr).expect("connect");
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        s.write_all(&3u32.to_be_bytes()).expect("flags");
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let mut o = IHAVEOPT.to_be_bytes().to_vec();
        o.extend_from_slice(&OPT_GO.to_be_bytes());
        o.extend_from_slice(&(d.len() as u32).to_be_bytes());
        o.extend_from_slice(&d);
        s.write_all(&o).expect("go");
        loop {
            let mut rh = [0u8; 20];
            s.read_exact(&mut rh).expect("option reply");
            let typ = u32::from_be_bytes(rh[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(rh[16..20].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).expect("reply data");
            assert!(typ == REP_ACK || typ == REP_INFO, "reply type {typ:#x}");
            if typ == REP_ACK {
                return s;
            }
        }
    }

    fn request(cmd: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn a_client_that_never_reads_is_dropped_and_others_carry_on() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let metrics = Arc::new(NbdMetrics::new());
        let opts = NbdOptions {
            send_timeout: Duration::from_millis(500),
            ..NbdOptions::default()
        };
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let srv = NbdServer::start_with_options(l, e.clone(), metrics.clone(), opts).unwrap();
        let mut bad = connect(srv.local_addr(), "v");
        bad.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // Ask for far more reply bytes than socket buffers hold, read none.
        let mut sent = 0;
        for i in 0..4096u64 {
            if bad.write_all(&request(CMD_READ, i, 0, 1 << 20)).is_err() {
                break;
            }
            sent += 1;
        }
        assert!(sent > 0);
        // Another client works meanwhile.
        let mut good = connect(srv.local_addr(), "v");
        good.write_all(&request(CMD_READ, 7, 0, 4096)).unwrap();
        let mut rep = [0u8; 16 + 4096];
        good.read_exact(&mut rep).unwrap();
        assert_eq!(&rep[4..16], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        // The stuck one is cut off (only the good one stays open), then
        // reading it reaches the end.
        while metrics.connections_open() > 1 {
            std::thread::sleep(Duration::from_millis(20));
        }
        bad.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        loop {
            match bad.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        drop(good);
        srv.shutdown();
        assert_eq!(metrics.connections_open(), 0);
        e.shutdown().unwrap();
    }

    /// One address holds at most `connections_per_source_max` connections:
    /// the next from it is closed at once.
    #[test]
    fn one_source_cannot_take_every_slot() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let metrics = Arc::new(NbdMetrics::new());
        let opts = NbdOptions {
            connections_per_source_max: 2,
            ..NbdOptions::default()
        };
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let srv = NbdServer::start_with_options(l, e.clone(), metrics, opts).unwrap();
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(srv.local_addr()).unwrap();
            let mut g = [0u8; 18];
            s.read_exact(&mut g).unwrap();
            held.push(s);
        }
        let mut third = TcpStream::connect(srv.local_addr()).unwrap();
        third
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut g = [0u8; 18];
        let closed = match third.read(&mut g) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
        };
        assert!(closed, "a third connection from one address was served");
        drop(held);
        srv.shutdown();
        e.shutdown().unwrap();
    }

    /// A client feeding its handshake a byte at a time, each byte well
    /// within the timeout, is cut when the whole handshake's time is up
    /// (it used to be kept as long as bytes kept coming).
    #[test]
    fn a_dripping_handshake_is_cut_at_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let metrics = Arc::new(NbdMetrics::new());
        let opts = NbdOptions {
            handshake_timeout: Duration::from_millis(1000),
            ..NbdOptions::default()
        };
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let srv = NbdServer::start_with_options(l, e.clone(), metrics, opts).unwrap();
        let mut s = TcpStream::connect(srv.local_addr()).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        // An option header is 16 bytes: drip them 250 ms apart.
        let header = IHAVEOPT.to_be_bytes();
        let mut dripped = 0;
        let mut cut = false;
        s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        for b in header.iter().cycle().take(16) {
            std::thread::sleep(Duration::from_millis(250));
            let mut x = [0u8; 64];
            let closed = match s.read(&mut x) {
                Ok(n) => n == 0,
                Err(e) => e.kind() == ErrorKind::ConnectionReset,
            };
            if closed || s.write_all(&[*b]).is_err() {
                cut = true;
                break;
            }
            dripped += 1;
        }
        assert!(
            cut,
            "a handshake fed a byte per 250 ms was kept for {dripped} bytes past a 1 s timeout"
        );
        srv.shutdown();
        e.shutdown().unwrap();
    }

    #[test]
    fn shutdown_answers_every_request_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let metrics = Arc::new(NbdMetrics::new());
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let srv = NbdServer::start(l, e.clone(), metrics.clone()).unwrap();
        let mut c = connect(srv.local_addr(), "v");
        let n = 64u64;
        let mut burst = Vec::new();
        for i in 0..n {
            burst.extend_from_slice(&request(CMD_WRITE, i, i * 4096, 4096));
            burst.extend_from_slice(&[i as u8; 4096]);
        }
        c.write_all(&burst).unwrap();
        let reader = {
            let mut c = c.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut got = std::collections::HashSet::new();
                let mut rep = [0u8; 16];
                while c.read_exact(&mut rep).is_ok() {
                    assert_eq!(&rep[4..8], &[0, 0, 0, 0], "write failed");
                    assert!(got.insert(u64::from_be_bytes(rep[8..16].try_into().unwrap())));
                }
                got
            })
        };
        // Shut down with the burst anywhere between unread and answered:
        // whatever the server took in is answered before it closes.
        srv.shutdown();
        let got = reader.join().unwrap();
        assert_eq!(got.len() as u64, metrics.requests(NbdOp::Write));
        assert!(got.iter().all(|h| *h < n));
        e.shutdown().unwrap();
    }
}
