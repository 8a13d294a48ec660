//! `sluice serve`: the node process.
//!
//! Owns the process lifecycle: open the pool exclusively (a second daemon
//! on the same device is refused by the device layer), start one engine
//! shard per region of the pool (each with its own io_uring ring),
//! bind the control socket (Unix, root-only, [`crate::auth`]), the
//! `--listen` address (peers, HTTP `/metrics`) and the optional NBD
//! address, print one `ready` line on stdout, then wait for SIGTERM/SIGINT.
//! Shutdown order: stop accepting, let the NBD server finish in-flight
//! requests, take the final consistency point, remove the control socket,
//! exit 0.
//!
//! Every accepted `--listen` connection gets its own thread, which looks at
//! the first bytes without consuming them (`peek`): `GET ` is HTTP, the
//! lockproto magic `SLCE` is a peer, and `{` (a control request sent to the
//! wrong place) gets one error line and is closed: no control operation
//! ever runs on the peer port. Control socket connections are served on
//! their own threads. Each listener's threads are bounded ([`CONN_MAX`]).

use crate::config::ServeConfig;
use crate::control::{parse_request, progress_line, read_line, response_line};
use crate::error::{NodeError, Result};
use crate::node::{Node, NodeInfo};
use sluice_engine::device::uring::{UringDevice, UringOptions};
use sluice_engine::device::BlockDevice;
use sluice_engine::shard::{Engine, EngineOptions};
use sluice_engine::sharded;
use sluice_replicator::{Replicator, ReplicatorConfig};
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Most `--listen` connections served at once; more are closed at accept.
pub const CONN_MAX: usize = 256;
/// Most connections one source (an IP address, or a local uid) has on one
/// listener at once: one source cannot take every slot.
pub const CONN_PER_SOURCE_MAX: usize = 64;
/// How long a new connection may take to send its first bytes.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
const HTTP_HEAD_MAX: usize = 16 << 10;

/// How long `serve` waits for a device that is busy. A daemon that was
/// just killed releases its device lock only when the kernel tears down its
/// io_uring, which happens asynchronously after the process is gone.
const BUSY_WAIT: Duration = Duration::from_secs(3);

fn open_device(cfg: &ServeConfig, opts: &UringOptions) -> Result<UringDevice> {
    let deadline = std::time::Instant::now() + BUSY_WAIT;
    loop {
        match UringDevice::open(&cfg.data, opts.clone()) {
            Err(sluice_engine::error::Error::DeviceBusy { .. })
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return Ok(r?),
        }
    }
}

pub fn serve(cfg: ServeConfig) -> Result<()> {
    let opts = UringOptions {
        direct_io: cfg.direct_io,
        ..UringOptions::default()
    };
    let dev = open_device(&cfg, &opts)?;
    let pool_err = |source| NodeError::Pool {
        path: cfg.data.display().to_string(),
        source,
    };
    // One region pool per shard, each with its own ring on the one locked
    // device; the shard count is the pool's (region 0's superblock).
    let pools = sharded::open_uring(dev, &opts).map_err(pool_err)?;
    let shards = pools.len();
    tracing::info!(
        data = %cfg.data.display(),
        shards,
        generation = pools.first().map_or(0, |p| p.generation()),
        "pool opened"
    );
    let engine = Engine::start_sharded(
        pools,
        EngineOptions {
            cp_interval: cfg.checkpoint_interval,
            pin_threads: cfg.pin_shards,
            ..EngineOptions::default()
        },
    )
    .map_err(pool_err)?;
    let result = run(&cfg, engine.clone());
    let shut = engine.shutdown();
    match (&result, shut) {
        (_, Err(e)) => {
            tracing::error!(error = %e, "final consistency point failed");
            result.and(Err(e.into()))
        }
        (Ok(()), Ok(())) => {
            tracing::info!("final consistency point taken; stopped");
            result
        }
        (Err(_), Ok(())) => result,
    }
}

fn bind(addr: &str, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).map_err(NodeError::io(format!("cannot listen for {what} on {addr}")))
}

/// Listen for `what` on `addr`; returns the listener and its bound address.
fn bind_addr(addr: &str, what: &str) -> Result<(TcpListener, std::net::SocketAddr)> {
    let l = bind(addr, what)?;
    let a = l
        .local_addr()
        .map_err(NodeError::io(format!("address of the {what} listener")))?;
    Ok((l, a))
}

/// [`bind_addr`] when `addr` is configured.
fn bind_opt(addr: Option<&str>, what: &str) -> Result<Option<(TcpListener, std::net::SocketAddr)>> {
    addr.map(|a| bind_addr(a, what)).transpose()
}

fn run(cfg: &ServeConfig, engine: sluice_engine::shard::EngineHandle) -> Result<()> {
    let control_sock = crate::auth::bind_control_socket(&cfg.control_socket)?;
    let tokens = cfg
        .control_tokens
        .iter()
        .map(|p| crate::auth::Token::read_file(p))
        .collect::<Result<Vec<_>>>()?;
    let tcp_control = bind_opt(
        cfg.control_listen.as_deref(),
        "the control API (TCP, with tokens)",
    )?;
    let tcp_control_addr = tcp_control.as_ref().map(|(_, a)| *a);
    let (peers, peers_addr) = bind_addr(&cfg.listen, "peers")?;
    let nbd_listener = bind_opt(cfg.nbd.as_deref(), "NBD")?;
    let nbd_addr = nbd_listener.as_ref().map(|(_, a)| *a);
    let name = node_name(&engine, cfg.name.as_deref())?;
    let mut rcfg = ReplicatorConfig::new(name.clone());
    rcfg.peer_secret = match &cfg.peer_secret {
        Some(p) => Some(read_secret(p)?),
        None => None,
    };
    for (peer, p) in &cfg.peer_secrets {
        rcfg.peer_secrets.insert(peer.clone(), read_secret(p)?);
    }
    if let Some(n) = cfg.max_locks_per_peer {
        rcfg.max_locks_per_peer = n;
    }
    rcfg.exports_required = cfg.exports_required;
    rcfg.insecure_peers = cfg.insecure_peers;
    rcfg.node_throttle_bps = cfg.throttle_bps;
    rcfg.peer_timeout = cfg.peer_timeout;
    if let Some(ms) = cfg.lease_ms {
        rcfg.lease_ms = ms;
        rcfg.renew_every_ms = (ms / 3).max(1);
    }
    rcfg.lease_policy = cfg.lease_policy;
    rcfg.checkpoint = cfg.checkpoint;
    rcfg.max_transfers = cfg.max_transfers;
    rcfg.propagate_locks = cfg.propagate_locks;
    if !cfg.propagate_locks {
        tracing::warn!("soft-lock propagation is OFF (demonstration switch): upstreams will not protect this node's bases");
    }
    let repl = Replicator::start(engine.clone(), rcfg)?;
    let node = Arc::new(Node::new(
        engine.clone(),
        repl.clone(),
        NodeInfo {
            name: name.clone(),
            data: cfg.data.display().to_string(),
            listen: peers_addr.to_string(),
            nbd: nbd_addr.map(|a| a.to_string()),
        },
    ));
    let vols = node.volumes()?;
    for (volume, keep) in &cfg.retention {
        if !vols.iter().any(|v| &v.name == volume) {
            tracing::warn!(volume = %volume, keep, "retention set for a volume that does not exist (yet)");
        }
        repl.store_retention(volume, Some(*keep))?;
    }

    // Signals first, so a TERM that arrives while starting is not lost.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(NodeError::io("installing signal handlers"))?;

    let nbd = match nbd_listener {
        Some((l, _)) => Some(
            crate::nbd::NbdServer::start(l, engine.clone(), node.nbd_metrics.clone())
                .map_err(NodeError::io("starting the NBD server"))?,
        ),
        None => None,
    };

    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let node = node.clone();
        let stop = stop.clone();
        let control_timeout = cfg.control_timeout;
        std::thread::Builder::new()
            .name("sluice-accept".into())
            .spawn(move || accept_loop(peers, node, stop, control_timeout))
            .map_err(NodeError::io("spawning the accept thread"))?
    };
    let unix_acceptor = {
        let node = node.clone();
        let stop = stop.clone();
        let control_timeout = cfg.control_timeout;
        std::thread::Builder::new()
            .name("sluice-accept-ctl".into())
            .spawn(move || {
                control_accept_loop(
                    || control_sock.accept().map(|(s, _)| s),
                    crate::auth::unix_peer,
                    None,
                    node,
                    stop,
                    control_timeout,
                )
            })
            .map_err(NodeError::io("spawning the control accept thread"))?
    };
    let tcp_acceptor = match tcp_control {
        Some((l, _)) => {
            let node = node.clone();
            let stop = stop.clone();
            let control_timeout = cfg.control_timeout;
            let tokens = Arc::new(tokens);
            Some(
                std::thread::Builder::new()
                    .name("sluice-accept-tcpctl".into())
                    .spawn(move || {
                        control_accept_loop(
                            || l.accept().map(|(s, _)| s),
                            |s: &TcpStream| {
                                s.peer_addr()
                                    .map(|a| format!("addr={a}"))
                                    .unwrap_or_else(|_| "addr=?".into())
                            },
                            Some(tokens),
                            node,
                            stop,
                            control_timeout,
                        )
                    })
                    .map_err(NodeError::io("spawning the TCP control accept thread"))?,
            )
        }
        None => None,
    };

    tracing::info!(
        node = %name,
        control = %cfg.control_socket.display(),
        control_tcp = ?tcp_control_addr,
        listen = %peers_addr,
        nbd = ?nbd_addr,
        shards = engine.shard_count(),
        "serving"
    );
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "ready control={} listen={peers_addr} control_tcp={} nbd={}",
        cfg.control_socket.display(),
        tcp_control_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into()),
        nbd_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into())
    );
    let _ = out.flush();
    notify_service_manager("READY=1");

    let sig = signals.forever().next();
    tracing::info!(signal = ?sig, "stopping: no new connections, finishing in-flight I/O");
    notify_service_manager("STOPPING=1");
    stop.store(true, Ordering::SeqCst);
    wake(peers_addr);
    let _ = acceptor.join();
    let _ = UnixStream::connect(&cfg.control_socket);
    let _ = unix_acceptor.join();
    if let (Some(a), Some(t)) = (tcp_control_addr, tcp_acceptor) {
        wake(a);
        let _ = t.join();
    }
    let _ = std::fs::remove_file(&cfg.control_socket);
    repl.shutdown();
    if let Some(nbd) = nbd {
        nbd.shutdown();
        tracing::info!("NBD server stopped; every in-flight request answered");
    }
    Ok(())
}

/// Tell the service manager (systemd's `Type=notify`) how the node is:
/// one datagram of `state` (and `MAINPID`) to the socket `NOTIFY_SOCKET`
/// names (a path, or `@name` in the abstract namespace). Nothing without
/// the variable; a failure is logged, never fatal.
fn notify_service_manager(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let addr = {
        use std::os::unix::ffi::OsStrExt;
        let b = path.as_bytes();
        match b.strip_prefix(b"@") {
            Some(name) => UnixAddr::from_abstract_name(name),
            None => UnixAddr::from_pathname(&path),
        }
    };
    let msg = format!("{state}\nMAINPID={}\n", std::process::id());
    let sent = addr.and_then(|a| {
        let s = UnixDatagram::unbound()?;
        s.send_to_addr(msg.as_bytes(), &a)
    });
    match sent {
        Ok(_) => tracing::debug!(%state, "told the service manager"),
        Err(e) => {
            tracing::warn!(%state, socket = ?path, error = %e, "could not notify the service manager (NOTIFY_SOCKET)")
        }
    }
}

/// Unblock a thread sitting in `accept` on `addr`.
fn wake(addr: SocketAddr) {
    let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
}

/// The peer port: one thread per connection, at most [`CONN_MAX`].
fn accept_loop(
    listener: TcpListener,
    node: Arc<Node>,
    stop: Arc<AtomicBool>,
    control_timeout: Duration,
) {
    serve_connections(
        "",
        || listener.accept().map(|(s, _)| s),
        |s: &TcpStream| {
            s.peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into())
        },
        &stop,
        move |stream, peer| {
            if let Err(e) = dispatch(stream, &node, control_timeout) {
                tracing::warn!(%peer, error = %e, "connection closed");
            }
        },
    );
}

/// Serve a control listener (the Unix socket, or TCP with `tokens`): one
/// thread per connection, at most [`CONN_MAX`]; `who` names the client
/// for the audit log (SO_PEERCRED, or the address and then the token).
fn control_accept_loop<S: CtlStream + 'static>(
    accept: impl FnMut() -> std::io::Result<S>,
    who: impl Fn(&S) -> String,
    tokens: Option<Arc<Vec<crate::auth::Token>>>,
    node: Arc<Node>,
    stop: Arc<AtomicBool>,
    control_timeout: Duration,
) {
    serve_connections("control ", accept, who, &stop, move |stream, who| {
        let tokens = tokens.as_deref().map(Vec::as_slice);
        if let Err(e) = control_conn(stream, &node, control_timeout, who, tokens) {
            tracing::warn!(client = %who, error = %e, "control connection closed");
        }
    });
}

/// Accept until `stop`, each connection on a thread of its own running
/// `handle(stream, who)`, at most [`CONN_MAX`] at once (more are closed at
/// accept). `what` prefixes the log lines ("control " or nothing).
fn serve_connections<S: Send + 'static>(
    what: &'static str,
    mut accept: impl FnMut() -> std::io::Result<S>,
    who: impl Fn(&S) -> String,
    stop: &AtomicBool,
    handle: impl Fn(S, &str) + Send + Sync + 'static,
) {
    let handle = Arc::new(handle);
    let slots = crate::slots::Slots::new(CONN_MAX, CONN_PER_SOURCE_MAX);
    loop {
        let conn = accept();
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "{what}accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let who = who(&stream);
        let source = source_of(&who);
        let slot = match slots.take(&source) {
            Ok(s) => s,
            Err(full) => {
                tracing::warn!(client = %who, "{what}connection closed: {full}");
                continue;
            }
        };
        let handle = handle.clone();
        let spawned = std::thread::Builder::new()
            .name(
                if what.is_empty() {
                    "sluice-conn"
                } else {
                    "sluice-ctl"
                }
                .into(),
            )
            .spawn(move || {
                handle(stream, &who);
                drop(slot);
            });
        if let Err(e) = spawned {
            // The closure, and the slot in it, dropped with the error.
            tracing::error!(error = %e, "cannot spawn a {what}connection thread");
        }
    }
}

/// The source a connection counts against (see [`CONN_PER_SOURCE_MAX`]):
/// the IP address of a TCP client (`1.2.3.4:5678`, `addr=[::1]:5678`), the
/// uid of a Unix-socket one (`uid=0 pid=42`).
fn source_of(who: &str) -> String {
    if let Some(uid) = who.split_whitespace().find(|w| w.starts_with("uid=")) {
        return uid.to_string();
    }
    let addr = who.strip_prefix("addr=").unwrap_or(who);
    match addr.rsplit_once(':') {
        Some((ip, port)) if port.chars().all(|c| c.is_ascii_digit()) => ip.to_string(),
        _ => addr.to_string(),
    }
}

/// Peek at the first bytes of `stream` until `first` is full (or starts
/// with `{`), within [`FIRST_BYTES_TIMEOUT`] in all. A client that sent a
/// few bytes and closed, or sends nothing more, is dropped at once or at
/// the deadline: peeking returns the buffered bytes without waiting, so
/// the wait between peeks backs off and the peer's close is checked.
fn peek_first(stream: &TcpStream, first: &mut [u8; 4]) -> std::io::Result<usize> {
    use std::os::fd::AsFd;
    let deadline = std::time::Instant::now() + FIRST_BYTES_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "only {} bytes in {} s: not a client",
                    stream.peek(first).unwrap_or(0),
                    FIRST_BYTES_TIMEOUT.as_secs()
                ),
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.peek(first)?;
        if n == 0 || n == first.len() || first[0] == b'{' {
            return Ok(n);
        }
        // Some bytes, not enough: has the peer closed (no more will come)?
        let hup =
            nix::poll::PollFlags::from_bits_retain(libc::POLLRDHUP) | nix::poll::PollFlags::POLLHUP;
        let mut fds = [nix::poll::PollFd::new(stream.as_fd(), hup)];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok()
            && fds[0].revents().is_some_and(|r| r.intersects(hup))
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {n} bytes"),
            ));
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Route a connection on its first bytes.
fn dispatch(stream: TcpStream, node: &Arc<Node>, control_timeout: Duration) -> std::io::Result<()> {
    let mut first = [0u8; 4];
    if peek_first(&stream, &mut first)? == 0 {
        return Ok(()); // closed before saying anything
    }
    if first[0] == b'{' {
        refuse_control(stream, control_timeout)
    } else if &first == b"GET " {
        http_conn(stream, node)
    } else if first[..] == sluice_lockproto::wire::MAGIC.to_le_bytes() {
        stream.set_read_timeout(None)?;
        node.repl.handle_peer(stream);
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unrecognised first bytes {first:02x?} (not control JSON, HTTP or a peer)"),
        ))
    }
}

/// Pool attribute holding the node's name.
const NAME_ATTR: &str = "node.name";

/// The node's name is part of its pool: peers key their soft locks by it,
/// so it must not change across restarts. The first `serve` stores it (the
/// `--name` given, or `node-` and 8 random hex digits); later starts reuse
/// it, and a different `--name` is refused rather than silently orphaning
/// every lock that names the old one.
fn node_name(engine: &sluice_engine::shard::EngineHandle, wanted: Option<&str>) -> Result<String> {
    use sluice_engine::api::{Reply, Request};
    let stored = match engine.call(Request::GetAttr {
        key: NAME_ATTR.into(),
    })? {
        Reply::Attr(v) => v.map(|b| String::from_utf8_lossy(&b).into_owned()),
        _ => None,
    };
    match (stored, wanted) {
        (Some(s), None) => Ok(s),
        (Some(s), Some(w)) if s == w => Ok(s),
        (Some(s), Some(w)) => Err(NodeError::Invalid(format!(
            "this pool belongs to node {s:?}, not {w:?}: peers know it by that name; drop --name or use --name {s}"
        ))),
        (None, w) => {
            let name = match w {
                Some(w) => w.to_string(),
                None => format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            };
            if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(NodeError::Invalid(format!(
                    "bad node name {name:?}: 1 to 64 bytes, no spaces or control characters"
                )));
            }
            engine.call(Request::SetAttr {
                key: NAME_ATTR.into(),
                value: Some(name.clone().into_bytes()),
            })?;
            engine.call(Request::Flush)?;
            Ok(name)
        }
    }
}

/// Read a peer secret file: its bytes, without a trailing newline; at
/// least 16 bytes, so a typo'd empty file is not a secret.
fn read_secret(path: &std::path::Path) -> Result<Vec<u8>> {
    let mut b = std::fs::read(path).map_err(NodeError::io(format!(
        "reading peer secret {}",
        path.display()
    )))?;
    while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
        b.pop();
    }
    if b.len() < 16 {
        return Err(NodeError::Invalid(format!(
            "peer secret {} has {} bytes; use at least 16 (e.g. head -c 32 /dev/urandom | base64 > FILE)",
            path.display(),
            b.len()
        )));
    }
    Ok(b)
}

/// A socket whose reads all end by one deadline (the control API sets it
/// per request line): a client that sends part of a line, or nothing,
/// cannot hold its connection slot past it, however it paces its bytes.
struct Timed<S> {
    s: S,
    deadline: std::time::Instant,
}

impl<S: CtlStream> Read for Timed<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "deadline passed before the client finished sending; connection closed",
            ));
        }
        self.s.set_deadline(left)?;
        self.s.read(buf)
    }
}

/// A control request on the peer port: one error line, then close. The
/// first line is read (bounded, by the deadline) so the reply is not lost
/// to a reset for unread bytes.
fn refuse_control(stream: TcpStream, timeout: Duration) -> std::io::Result<()> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(Timed {
        s: stream,
        deadline: std::time::Instant::now() + timeout.min(FIRST_BYTES_TIMEOUT),
    });
    let _ = read_line(&mut reader);
    node_refusal(&peer);
    let resp = response_line(&Err(NodeError::BadRequest(
        "the control API is not served on the peer port: use the node's control socket (sluice --node /path/to/DATA.sock)".into(),
    )));
    writer.write_all(resp.as_bytes())
}

fn node_refusal(peer: &str) {
    tracing::warn!(target: "audit", client = %peer, "control request on the peer port refused");
}

/// A stream the control API can run on: TCP or a Unix socket.
trait CtlStream: Read + Write + Send + Sized {
    fn clone_stream(&self) -> std::io::Result<Self>;
    fn set_deadline(&self, left: Duration) -> std::io::Result<()>;
}

impl CtlStream for TcpStream {
    fn clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn set_deadline(&self, left: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(left))
    }
}

impl CtlStream for UnixStream {
    fn clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn set_deadline(&self, left: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(left))
    }
}

/// The first line of a TCP control connection: `{"token":"NAME:HEX"}`.
/// Returns the token's name, or answers with an error (and the caller
/// closes the connection).
fn authenticate(
    reader: &mut impl std::io::BufRead,
    writer: &std::sync::Mutex<impl Write>,
    tokens: &[crate::auth::Token],
    client: &str,
) -> std::io::Result<String> {
    let refuse = |why: &str| -> std::io::Result<String> {
        tracing::warn!(target: "audit", client = %client, reason = why, "control connection refused: no valid token");
        let resp = response_line(&Err(NodeError::BadRequest(format!(
            "{why}: this TCP control API needs a token first (a line {{\"token\":\"NAME:HEX\"}}; sluice --token-file FILE); no operation ran"
        ))));
        let _ = lock(writer).write_all(resp.as_bytes());
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            why.to_string(),
        ))
    };
    let line = match read_line(reader) {
        Ok(Some(l)) => l,
        Ok(None) => return refuse("closed before presenting a token"),
        Err(e) => return refuse(&format!("no token line ({e})")),
    };
    let presented = serde_json::from_str::<serde_json::Value>(&line)
        .ok()
        .and_then(|v| v.get("token").and_then(|t| t.as_str()).map(str::to_string));
    let Some(presented) = presented else {
        return refuse("the first line is not a token");
    };
    match crate::auth::check_token(tokens, &presented) {
        Some(name) => {
            let ok = response_line(&Ok(serde_json::json!({ "token": name })));
            lock(writer).write_all(ok.as_bytes())?;
            Ok(name.to_string())
        }
        None => refuse("token not accepted"),
    }
}

fn control_conn<S: CtlStream>(
    stream: S,
    node: &Node,
    timeout: Duration,
    client: &str,
    tokens: Option<&[crate::auth::Token]>,
) -> std::io::Result<()> {
    let writer = std::sync::Mutex::new(stream.clone_stream()?);
    let mut reader = BufReader::new(Timed {
        s: stream,
        deadline: std::time::Instant::now() + timeout,
    });
    let named;
    let client = match tokens {
        Some(tokens) => {
            let name = authenticate(&mut reader, &writer, tokens, client)?;
            named = format!("token={name} {client}");
            named.as_str()
        }
        None => client,
    };
    loop {
        reader.get_mut().deadline = std::time::Instant::now() + timeout;
        let line = match read_line(&mut reader) {
            Ok(Some(l)) => l,
            Ok(None) => return Ok(()),
            Err(e) => {
                let resp = response_line(&Err(NodeError::BadRequest(e.to_string())));
                let _ = lock(&writer).write_all(resp.as_bytes());
                return Err(e);
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let parsed = parse_request(&line);
        if parsed.is_err() {
            node.note_bad_request();
        }
        let result = parsed.and_then(|req| {
            let op = req.op();
            let progress = |p: serde_json::Value| {
                // A client that went away only loses its progress lines.
                let _ = lock(&writer).write_all(progress_line(&p).as_bytes());
            };
            let audited = req.destructive().then(|| req.clone());
            let r = node.execute(req, &progress);
            if let Some(req) = &audited {
                node.audit(req, client, &r);
            }
            match &r {
                Ok(_) => tracing::debug!(op, "control request done"),
                Err(e) => tracing::info!(op, error = %e, "control request failed"),
            }
            r
        });
        lock(&writer).write_all(response_line(&result).as_bytes())?;
    }
}

fn http_conn(mut stream: TcpStream, node: &Node) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    // The whole head within the first-bytes timeout, however it is paced.
    let mut timed = Timed {
        s: stream.try_clone()?,
        deadline: std::time::Instant::now() + FIRST_BYTES_TIMEOUT,
    };
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = timed.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > HTTP_HEAD_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "HTTP request head too large",
            ));
        }
    }
    let text = String::from_utf8_lossy(&head);
    let path = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("");
    let (status, kind, body) = if path == "/metrics" {
        (
            "200 OK",
            crate::metrics::CONTENT_TYPE,
            crate::metrics::render(node),
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            format!("no such path {path:?}; try /metrics\n"),
        )
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes())
}

/// Bytes of device per shard that `init` picks by default.
pub const BYTES_PER_DEFAULT_SHARD: u64 = 1 << 30;

/// The shard count `init` picks when none is given: one per GiB of device,
/// at most one per available core but one (that core is left to NBD
/// clients, peers and the control API: on 2 shared cores two pinned shards
/// measured ~40 % fewer random-write IOPS than one, docs/BENCHMARKS.md),
/// at least one (so small pools, like the tests', stay at one shard).
pub fn default_shards(size_bytes: u64) -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as u64;
    let by_size = (size_bytes / BYTES_PER_DEFAULT_SHARD).max(1);
    cores
        .saturating_sub(1)
        .min(by_size)
        .clamp(1, sharded::SHARDS_MAX as u64) as u32
}

/// Most volumes `sluice init --volumes-max` takes per region.
pub const VOLUMES_MAX_LIMIT: u32 = 1 << 20;

/// `sluice init`: format `path` as a pool of `shards` shards (default:
/// [`default_shards`]). A missing file is created at `size`; an existing
/// file grows to `size` if given. A device or file that already holds a
/// pool is refused unless `force`. `volumes_max`: volumes per region
/// (default [`sluice_engine::pool::VOLUMES_MAX_DEFAULT`]). Returns the
/// pool's bytes and shards.
pub fn init(
    path: &std::path::Path,
    size: Option<u64>,
    force: bool,
    shards: Option<u32>,
    volumes_max: Option<u32>,
) -> Result<(u64, u32)> {
    let opts = UringOptions::default();
    let format = sluice_engine::FormatOptions {
        volumes_max: volumes_max.unwrap_or(sluice_engine::pool::VOLUMES_MAX_DEFAULT),
    };
    if !(1..=VOLUMES_MAX_LIMIT).contains(&format.volumes_max) {
        return Err(NodeError::Invalid(format!(
            "--volumes-max {} is out of range 1..={VOLUMES_MAX_LIMIT}",
            format.volumes_max
        )));
    }
    let exists = path.exists();
    if !exists && size.is_none() {
        return Err(NodeError::Invalid(format!(
            "{} does not exist; give --size to create it as a file",
            path.display()
        )));
    }
    if exists && !force {
        let dev = UringDevice::open(path, opts.clone())?;
        // Any valid superblock at the start (region 0) is a pool, however
        // many shards it has.
        if sharded::read_layout(dev).is_ok() {
            return Err(NodeError::Invalid(format!(
                "{} already holds a sluice pool; use --force to format it anyway (destroys its data)",
                path.display()
            )));
        }
    }
    let dev = match size {
        Some(s) => UringDevice::create(path, s, opts.clone())?,
        None => UringDevice::open(path, opts.clone())?,
    };
    let size_bytes = dev.info().block_count * sluice_engine::device::BLOCK_SIZE as u64;
    let shards = shards.unwrap_or_else(|| default_shards(size_bytes));
    let mut pools = sharded::format_uring(dev, shards, format, &opts)?;
    let mut total = 0;
    for pool in &mut pools {
        match pool.execute(sluice_engine::api::Request::Space)? {
            sluice_engine::api::Reply::Space(s) => {
                total += s.total_blocks * sluice_engine::device::BLOCK_SIZE as u64
            }
            _ => {
                return Err(NodeError::Invalid(
                    "engine gave an unexpected reply to space".into(),
                ))
            }
        }
    }
    Ok((total, shards))
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_counts_against_its_address_or_uid() {
        assert_eq!(source_of("127.0.0.2:40000"), "127.0.0.2");
        assert_eq!(source_of("addr=[::1]:7001"), "[::1]");
        assert_eq!(source_of("uid=0 pid=42"), "uid=0");
        assert_eq!(source_of("?"), "?");
    }

    #[test]
    fn default_shards_follow_size_and_cores() {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as u32;
        assert_eq!(default_shards(0), 1);
        assert_eq!(default_shards(64 << 20), 1);
        assert_eq!(default_shards((1 << 30) - 4096), 1);
        let spare = (cores - 1).max(1);
        assert_eq!(default_shards(2 << 30), spare.min(2));
        assert_eq!(default_shards(1 << 50), spare.min(sharded::SHARDS_MAX));
    }
}
