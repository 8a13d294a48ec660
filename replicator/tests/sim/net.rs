//! The simulated world the nodes of one scenario share: a clock that only
//! the simulator moves, and a network of in-memory connections between the
//! nodes' replicators.
//!
//! A connection is two byte queues. Writes never block (the volumes are
//! small), so the outcome of a protocol exchange does not depend on thread
//! timing: it depends only on the bytes and on the faults the scenario
//! placed (a partition refuses the connection; a cut resets it after a
//! given number of bytes in one direction). Each accepted connection runs
//! the target's `handle_stream` on a thread of its own; the simulator joins
//! every such thread at the end of each step, so no step leaks work into
//! the next.
//!
//! A stall holds back what the client sends past a given byte, as a
//! middlebox that stops forwarding does: the client's read of an answer
//! that cannot come times out (at once, once the server waits for the held
//! bytes: nothing else can happen), the client gives up, and the held bytes
//! reach the server later, when the simulator releases them, after the
//! client moved on (a late, stale request), unless more simulated time
//! passed than the server's read timeout: then its read times out, as a
//! real server's would. Until then the server's thread waits in its read,
//! doing nothing, and a step's settling leaves it there; a crash of the
//! server resets it.
//!
//! A slow link makes a transfer long in simulated time: each time the
//! client has read another `every` bytes, the link pauses. Once the server
//! waits for the client (or is gone), the clock moves on by `ms` and every
//! up node runs one scheduler tick, in address order, each tick's own
//! connections settled before the next: leases run out, renewals and
//! retention run, while the transfer is half done, at points that depend
//! only on the bytes. A tick that cannot finish (it waits for something the
//! paused transfer holds) ends the whole test, loudly: that is a deadlock
//! of the product.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{Error, ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sluice_replicator::env::{Env, PeerStream};
use sluice_replicator::Replicator;

/// Wall-clock origin of simulated time (2026-01-01).
pub const WALL_BASE_MS: u64 = 1_767_225_600_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A pause of a slow link, sent to the gate ([`World::set_gate`]): `ms`
/// pass, every node ticks, then `resume` lets the transfer go on.
pub struct Pause {
    pub ms: u64,
    pub resume: std::sync::mpsc::Sender<()>,
}

/// A slow link: a pause after every `every` bytes the client reads, in
/// which `ms` of simulated time pass and every node ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slow {
    pub every: u64,
    pub ms: u64,
}

/// A connection fault armed for the next connection from one node to
/// another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Reset after this many bytes.
    pub after: u64,
    /// Count the bytes the server (upstream) sends; else the client's.
    pub server_side: bool,
}

#[derive(Default)]
struct Net {
    /// Reachable nodes: address -> (name, replicator).
    up: BTreeMap<String, (String, Arc<Replicator>)>,
    /// Pairs of node names that cannot reach each other (sorted pair).
    parted: BTreeSet<(String, String)>,
    /// Armed cuts: (from, to) -> fault for the next connection.
    cuts: BTreeMap<(String, String), Cut>,
    /// Armed stalls: (from, to) -> client bytes that pass before the hold.
    stalls: BTreeMap<(String, String), u64>,
    /// Slow links: (from, to) -> every connection opened while armed.
    slow: BTreeMap<(String, String), Slow>,
}

/// A connection armed with a stall, and its server's thread.
struct Held {
    /// The server's address.
    to: String,
    up: Arc<Dir>,
    thread: JoinHandle<()>,
    /// Also a slow link: once released, its server joins the slow ones
    /// (it waits for a client that a pause may hold).
    slow: bool,
}

/// What the nodes of one scenario share.
#[derive(Default)]
pub struct World {
    clock_ms: AtomicU64,
    net: Mutex<Net>,
    servers: Mutex<Vec<JoinHandle<()>>>,
    held: Mutex<Vec<Held>>,
    /// Connections opened, refused, cut, stalled, and delivered late (for
    /// the trace).
    pub connects: AtomicU64,
    pub refused: AtomicU64,
    pub cuts_fired: AtomicU64,
    pub stalls_fired: AtomicU64,
    pub late: AtomicU64,
    /// Pauses of slow links in which the nodes ticked.
    pub pauses: AtomicU64,
    /// A pause is running: connections its ticks open are not slow.
    pausing: AtomicBool,
    gate: Mutex<Option<std::sync::mpsc::Sender<Pause>>>,
    /// Server threads of slow connections (settled after their step).
    slow_servers: Mutex<Vec<JoinHandle<()>>>,
    /// What the scenario is, for a deadlock's message.
    pub label: Mutex<String>,
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.into(), b.into())
    } else {
        (b.into(), a.into())
    }
}

impl World {
    pub fn new() -> Arc<World> {
        Arc::new(World::default())
    }

    pub fn now_ms(&self) -> u64 {
        self.clock_ms.load(Ordering::SeqCst)
    }

    pub fn advance(&self, ms: u64) {
        self.clock_ms.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn attach(&self, addr: &str, name: &str, r: Arc<Replicator>) {
        lock(&self.net).up.insert(addr.into(), (name.into(), r));
    }

    /// The node at `addr` goes away; connections held on their way to it
    /// are reset (its process is gone).
    pub fn detach(&self, addr: &str) {
        lock(&self.net).up.remove(addr);
        let mut held = lock(&self.held);
        let (gone, keep): (Vec<Held>, Vec<Held>) = std::mem::take(&mut *held)
            .into_iter()
            .partition(|h| h.to == addr);
        *held = keep;
        drop(held);
        for h in gone {
            h.up.close(true);
            lock(&self.servers).push(h.thread);
        }
    }

    /// Stalls armed for connections not opened yet will not fire.
    pub fn disarm_stalls(&self) {
        lock(&self.net).stalls.clear();
    }

    /// Connections `from` -> `to` opened from now on are slow, until
    /// [`World::disarm_slow`].
    pub fn arm_slow(&self, from: &str, to: &str, slow: Slow) {
        lock(&self.net).slow.insert((from.into(), to.into()), slow);
    }

    pub fn disarm_slow(&self) {
        lock(&self.net).slow.clear();
    }

    /// Who handles the pauses of slow links (the simulator's step), until
    /// `None`: without one a slow link does not pause.
    pub fn set_gate(&self, gate: Option<std::sync::mpsc::Sender<Pause>>) {
        *lock(&self.gate) = gate;
    }

    /// While on, connections opened are never slow (a pause's ticks).
    pub fn set_pausing(&self, on: bool) {
        self.pausing.store(on, Ordering::SeqCst);
    }

    /// The servers of slow connections join the others (their clients are
    /// done): the next settle waits for them.
    pub fn finish_slow(&self) {
        let slow = std::mem::take(&mut *lock(&self.slow_servers));
        lock(&self.servers).extend(slow);
    }

    /// A slow link's pause (module docs): `server_rx` carries the client's
    /// bytes to the server, `client_rx` the server's to the client. Once
    /// the server waits for the client, the gate gets the pause and this
    /// client waits until it is over.
    fn pause(&self, server_rx: &Dir, client_rx: &Dir, ms: u64) {
        let Some(gate) = lock(&self.gate).clone() else {
            return;
        };
        let limit = Duration::from_secs(60);
        let start = Instant::now();
        loop {
            let waits = {
                let st = lock(&server_rx.st);
                st.waiting || st.parked
            };
            if waits || lock(&client_rx.st).closed {
                break;
            }
            if start.elapsed() > limit {
                self.deadlock("the server of a slow transfer never waited for its client");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        if gate.send(Pause { ms, resume: tx }).is_err() {
            return;
        }
        self.pauses.fetch_add(1, Ordering::SeqCst);
        if rx.recv_timeout(limit).is_err() {
            self.deadlock("the nodes could not tick while a slow transfer was paused");
        }
    }

    /// A deadlock cannot be reported by returning: the stuck threads would
    /// hang the run. Say it on the real stderr and end the process.
    fn deadlock(&self, what: &str) -> ! {
        use std::io::Write;
        let label = lock(&self.label).clone();
        let _ = writeln!(
            std::io::stderr().lock(),
            "cascade simulation: DEADLOCK in scenario {label}: {what}"
        );
        std::process::exit(101);
    }

    pub fn arm_stall(&self, from: &str, to: &str, after: u64) {
        lock(&self.net)
            .stalls
            .insert((from.into(), to.into()), after);
    }

    /// Let every held connection's bytes through to its server, late: a
    /// server that waited longer (in simulated time) than its read timeout
    /// has timed out instead, as a real one would have. Returns how many
    /// connections delivered held bytes.
    pub fn release_stalls(&self) -> usize {
        let held = std::mem::take(&mut *lock(&self.held));
        let now = self.now_ms();
        let mut late = 0;
        for h in held {
            {
                let mut s = lock(&h.up.st);
                let waited = Duration::from_millis(now.saturating_sub(s.parked_at_ms));
                if s.parked && s.park_timeout.is_some_and(|t| waited > t) {
                    s.timed_out = true;
                } else if s.pass == Some(0) && !s.data.is_empty() {
                    late += 1;
                }
                s.pass = None;
                h.up.cv.notify_all();
            }
            // A slow link's server may wait for a client held in a pause:
            // the settles inside the slow update must not wait for it.
            match h.slow {
                true => lock(&self.slow_servers).push(h.thread),
                false => lock(&self.servers).push(h.thread),
            }
        }
        self.late.fetch_add(late as u64, Ordering::SeqCst);
        late
    }

    pub fn partition(&self, a: &str, b: &str) {
        lock(&self.net).parted.insert(pair(a, b));
    }

    pub fn heal(&self) {
        lock(&self.net).parted.clear();
    }

    pub fn parted(&self) -> Vec<(String, String)> {
        lock(&self.net).parted.iter().cloned().collect()
    }

    pub fn arm_cut(&self, from: &str, to: &str, cut: Cut) {
        lock(&self.net).cuts.insert((from.into(), to.into()), cut);
    }

    /// Join every server thread started so far (and those they started),
    /// except those waiting for held bytes: they stay parked until the
    /// bytes are released or their server goes. Returns how many of them
    /// panicked.
    pub fn settle(&self) -> usize {
        let mut panics = 0;
        loop {
            let hs = std::mem::take(&mut *lock(&self.servers));
            for h in hs {
                if h.join().is_err() {
                    panics += 1;
                }
            }
            // A held connection's server either finished (the client sent
            // nothing past the stall point), or waits for the held bytes, or
            // is still working on what came before them.
            let mut held = lock(&self.held);
            let mut busy = false;
            let mut done = Vec::new();
            for (i, h) in held.iter().enumerate() {
                if h.thread.is_finished() {
                    done.push(i);
                } else if !h.slow && !lock(&h.up.st).parked {
                    // (A slow one's client may be held in a pause.)
                    busy = true;
                }
            }
            for i in done.into_iter().rev() {
                let h = held.remove(i);
                lock(&self.servers).push(h.thread);
            }
            drop(held);
            if lock(&self.servers).is_empty() {
                if !busy {
                    return panics;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Drop every replicator reference (ends the scenario's cycles), and
    /// reset the connections still held.
    pub fn clear(&self) {
        let mut n = lock(&self.net);
        n.up.clear();
        n.cuts.clear();
        n.stalls.clear();
        n.slow.clear();
        drop(n);
        for h in std::mem::take(&mut *lock(&self.held)) {
            h.up.close(true);
            let _ = h.thread.join();
        }
    }
}

/// One node's view of the world: its [`Env`].
pub struct NodeEnv {
    pub world: Arc<World>,
    pub name: String,
    /// Random values drawn so far (they derive from the name and this).
    drawn: AtomicU64,
}

impl NodeEnv {
    pub fn new(world: Arc<World>, name: &str) -> NodeEnv {
        NodeEnv {
            world,
            name: name.into(),
            drawn: AtomicU64::new(0),
        }
    }
}

/// splitmix64: a well-mixed function of its input.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl std::fmt::Debug for NodeEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeEnv({})", self.name)
    }
}

impl Env for NodeEnv {
    fn wall_ms(&self) -> u64 {
        WALL_BASE_MS + self.world.now_ms()
    }

    fn mono_ms(&self) -> u64 {
        self.world.now_ms()
    }

    /// A function of the node and of how many it drew before: the same in
    /// every run of a scenario, whatever the threads do in between.
    fn random_u64(&self) -> u64 {
        let n = self.drawn.fetch_add(1, Ordering::SeqCst);
        let node = self.name.bytes().fold(0u64, |h, b| mix(h ^ u64::from(b)));
        mix(node ^ mix(n))
    }

    fn new_snapshot_id(&self) -> uuid::Uuid {
        let hi = u128::from(self.random_u64()) << 64;
        uuid::Uuid::from_u128(hi | u128::from(self.random_u64()))
    }

    fn connect(&self, addr: &str, _timeout: Duration) -> std::io::Result<Box<dyn PeerStream>> {
        let w = &self.world;
        let (target, repl, cut, stall, slow) = {
            let mut n = lock(&w.net);
            let Some((target, repl)) = n.up.get(addr).cloned() else {
                w.refused.fetch_add(1, Ordering::SeqCst);
                return Err(Error::new(
                    ErrorKind::ConnectionRefused,
                    format!("{addr}: node down"),
                ));
            };
            if n.parted.contains(&pair(&self.name, &target)) {
                w.refused.fetch_add(1, Ordering::SeqCst);
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!("{addr}: partitioned from {}", self.name),
                ));
            }
            let key = (self.name.clone(), target.clone());
            let cut = n.cuts.remove(&key);
            let stall = n.stalls.remove(&key);
            let slow = match w.pausing.load(Ordering::SeqCst) {
                true => None,
                false => n.slow.get(&key).copied(),
            };
            (target, repl, cut, stall, slow)
        };
        w.connects.fetch_add(1, Ordering::SeqCst);
        let (client, server) = pipe(&self.name, &target, cut, w.clone());
        let up = client.0.tx.clone();
        if let Some(after) = stall {
            lock(&up.st).pass = Some(after);
        }
        if let Some(sl) = slow {
            lock(&client.0.rx.st).slow = Some((sl, sl.every));
        }
        let h = std::thread::Builder::new()
            .name(format!("sim-serve-{target}"))
            .spawn(move || repl.handle_stream(Box::new(server)))?;
        if stall.is_some() {
            lock(&w.held).push(Held {
                to: addr.to_string(),
                up,
                thread: h,
                slow: slow.is_some(),
            });
        } else if slow.is_some() {
            lock(&w.slow_servers).push(h);
        } else {
            lock(&w.servers).push(h);
        }
        Ok(Box::new(client))
    }
}

#[derive(Default)]
struct DirState {
    data: VecDeque<u8>,
    closed: bool,
    reset: bool,
    /// Bytes this direction may still carry before the cut fires.
    budget: Option<u64>,
    /// Bytes the reader may still take before the stall holds the rest
    /// (`None`: no stall, or released).
    pass: Option<u64>,
    /// The reader waits for held bytes: since when (simulated ms), and
    /// the read timeout it waits under.
    parked: bool,
    parked_at_ms: u64,
    park_timeout: Option<Duration>,
    /// The release came after the reader's timeout: its read fails.
    timed_out: bool,
    /// The reader waits for bytes that are not there (none held).
    waiting: bool,
    /// A slow link, and the bytes the reader may take before its pause.
    slow: Option<(Slow, u64)>,
}

impl DirState {
    /// The reader must wait for bytes the stall holds (or may yet hold).
    fn holding(&self) -> bool {
        self.pass == Some(0) && !self.reset && !(self.data.is_empty() && self.closed)
    }
}

#[derive(Default)]
struct Dir {
    st: Mutex<DirState>,
    cv: Condvar,
}

impl Dir {
    fn close(&self, reset: bool) {
        let mut s = lock(&self.st);
        s.closed = true;
        s.reset |= reset;
        self.cv.notify_all();
    }
}

/// One end of a connection; its clones share it, and the last one dropped
/// closes the connection (as the last descriptor of a socket does).
struct Side {
    rx: Arc<Dir>,
    tx: Arc<Dir>,
    read_timeout: Mutex<Option<Duration>>,
    label: String,
    world: Arc<World>,
    /// The connecting side (see [`Side::close`]).
    client: bool,
}

impl Side {
    /// Close both directions. A client's close first lets the server
    /// finish what it is doing until it waits for the client (or is
    /// gone): whether the server's last writes went out before the close
    /// (a served transfer the client abandoned after its first frame)
    /// depends on the bytes, not on which thread ran first.
    fn close(&self) {
        if self.client && !lock(&self.rx.st).closed {
            let start = Instant::now();
            loop {
                let quiet = {
                    let p = lock(&self.tx.st);
                    p.waiting || p.parked || p.closed
                };
                if quiet || lock(&self.rx.st).closed || start.elapsed() > Duration::from_secs(20) {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        self.rx.close(false);
        self.tx.close(false);
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        self.close();
    }
}

pub struct End(Arc<Side>);

fn pipe(client: &str, server: &str, cut: Option<Cut>, world: Arc<World>) -> (End, End) {
    let up = Arc::new(Dir::default()); // client -> server
    let down = Arc::new(Dir::default()); // server -> client
    if let Some(c) = cut {
        let d = if c.server_side { &down } else { &up };
        lock(&d.st).budget = Some(c.after);
    }
    let c = Side {
        rx: down.clone(),
        tx: up.clone(),
        read_timeout: Mutex::new(None),
        label: format!("sim:{server}"),
        world: world.clone(),
        client: true,
    };
    let s = Side {
        rx: up,
        tx: down,
        read_timeout: Mutex::new(None),
        label: format!("sim:{client}"),
        world,
        client: false,
    };
    (End(Arc::new(c)), End(Arc::new(s)))
}

impl Read for End {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let timeout = *lock(&self.0.read_timeout);
        let deadline = timeout.map(|t| Instant::now() + t);
        let rx = &self.0.rx;
        let mut settled = false;
        let settle_start = Instant::now();
        let mut s = lock(&rx.st);
        loop {
            if s.holding() {
                // Only a release or a reset ends this wait; the peer's read
                // of an answer now times out.
                if !s.parked {
                    s.parked = true;
                    s.parked_at_ms = self.0.world.now_ms();
                    s.park_timeout = timeout;
                    drop(s);
                    let peer = lock(&self.0.tx.st);
                    self.0.tx.cv.notify_all();
                    drop(peer);
                    s = lock(&rx.st);
                    continue;
                }
                s = rx.cv.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            s.parked = false;
            if std::mem::take(&mut s.timed_out) {
                return Err(Error::new(
                    ErrorKind::WouldBlock,
                    "read timed out (the peer's bytes were stalled on their way)",
                ));
            }
            let avail = match s.pass {
                Some(p) => s.data.len().min(usize::try_from(p).unwrap_or(usize::MAX)),
                None => s.data.len(),
            };
            if avail > 0 {
                // A slow link's reads end at its next pause.
                let to_pause = s.slow.map_or(usize::MAX, |(_, left)| {
                    usize::try_from(left).unwrap_or(usize::MAX)
                });
                // And they take all the server sends before it waits (up
                // to the buffer or the pause), never what a thread's timing
                // happened to let through: where the client is when a pause
                // comes, and whether it reads to the next pause before it
                // closes, depend on the bytes only.
                if s.slow.is_some()
                    && !settled
                    && avail < buf.len().min(to_pause)
                    && !s.closed
                    && s.pass.is_none()
                {
                    drop(s);
                    let quiet = {
                        let p = lock(&self.0.tx.st);
                        p.waiting || p.parked || p.closed
                    };
                    s = lock(&rx.st);
                    let late = deadline.is_some_and(|d| Instant::now() >= d);
                    if quiet || late || settle_start.elapsed() > Duration::from_secs(60) {
                        settled = true;
                    } else {
                        s = rx
                            .cv
                            .wait_timeout(s, Duration::from_micros(200))
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    continue;
                }
                let n = buf.len().min(avail).min(to_pause);
                if let Some(p) = s.pass.as_mut() {
                    *p -= n as u64;
                }
                for (b, x) in buf.iter_mut().zip(s.data.drain(..n)) {
                    *b = x;
                }
                if let Some((sl, left)) = s.slow.as_mut() {
                    *left = left.saturating_sub(n as u64);
                    if *left == 0 {
                        *left = sl.every;
                        let ms = sl.ms;
                        drop(s);
                        self.0.world.pause(&self.0.tx, rx, ms);
                    }
                }
                return Ok(n);
            }
            if s.reset {
                return Err(Error::new(ErrorKind::ConnectionReset, "connection cut"));
            }
            if s.closed {
                return Ok(0);
            }
            // Our bytes are held on their way and the peer waits for them:
            // no answer can come before our timeout.
            if lock(&self.0.tx.st).parked {
                self.0.world.stalls_fired.fetch_add(1, Ordering::SeqCst);
                return Err(Error::new(
                    ErrorKind::WouldBlock,
                    "read timed out (our bytes are stalled on their way)",
                ));
            }
            s.waiting = true;
            match deadline {
                None => s = rx.cv.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        s.waiting = false;
                        return Err(Error::new(ErrorKind::WouldBlock, "read timed out"));
                    }
                    s = rx
                        .cv
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            s.waiting = false;
        }
    }
}

impl Write for End {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let tx = &self.0.tx;
        let mut s = lock(&tx.st);
        if s.closed {
            let kind = if s.reset {
                ErrorKind::ConnectionReset
            } else {
                ErrorKind::BrokenPipe
            };
            return Err(Error::new(kind, "connection closed"));
        }
        if let Some(b) = s.budget {
            if buf.len() as u64 > b {
                s.data.extend(&buf[..b as usize]);
                drop(s);
                self.0.world.cuts_fired.fetch_add(1, Ordering::SeqCst);
                tx.close(true);
                self.0.rx.close(true);
                return Err(Error::new(ErrorKind::ConnectionReset, "connection cut"));
            }
            s.budget = Some(b - buf.len() as u64);
        }
        s.data.extend(buf);
        // The reader has bytes now: it no longer waits, even before it wakes.
        s.waiting = false;
        tx.cv.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl PeerStream for End {
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn PeerStream>> {
        Ok(Box::new(End(self.0.clone())))
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        *lock(&self.0.read_timeout) = t;
        Ok(())
    }

    fn set_write_timeout(&self, _t: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }

    fn shutdown_both(&self) {
        self.0.close();
    }

    fn peer_label(&self) -> String {
        self.0.label.clone()
    }
}
