//! The fault-injecting TCP proxy of the replication tests (the root
//! crate's end-to-end tests and the replicator's own).
//!
//! It listens on 127.0.0.1 (port chosen by the kernel) and forwards every
//! accepted connection to the current upstream address (settable, so a
//! source daemon restarted on a new port stays reachable at the same
//! address). A destination creates its mirror against [`Proxy::addr`].
//!
//! Faults are armed one at a time and fire once. [`Proxy::arm`] arms one
//! for whichever connection reaches it first; [`Proxy::arm_next`] binds it
//! to the next connection accepted only (if that connection ends without
//! the fault firing, it is dropped, and later connections forward cleanly).
//! - [`Fault::CutAfter`]: the first connection that carries N bytes from the
//!   upstream to the client gets exactly N bytes forwarded, then the end of
//!   the stream, and its upstream side is closed (a dropped connection,
//!   possibly mid-frame). The client receives all N bytes.
//! - [`Fault::CorruptExtent`]: the n-th `Extent` frame (message type 7)
//!   forwarded after arming gets one byte of its raw payload flipped. The
//!   frame layout is `docs/PROTOCOL.md`'s: a 24-byte header (magic `SLCE`,
//!   msg_type at 8..10, body_len at 12..16, payload_len at 16..20, all LE),
//!   then the body, then the payload. The payload is not covered by the
//!   frame crc; only the extent's own checksum can catch the flip.
//! - [`Fault::ForgeExtent`]: the same flip, but the extent header's checksum
//!   is recomputed and the frame re-encoded (a lying or buggy source): only
//!   the end-to-end content digest of the snapshot can catch it.
//! - [`Fault::FlipAt`]: one bit of the byte at this offset of a
//!   connection's upstream-to-client stream is flipped (raw: wherever it
//!   falls, header, body or payload).
//!
//! [`Proxy::down_bytes`] counts the upstream-to-client bytes forwarded, all
//! connections together.
//!
//! [`Proxy::set_rate`] paces the upstream-to-client direction: the backlog
//! then sits upstream of the proxy (in the source's socket), not in the
//! client's receive buffer, so a source killed mid-transfer really is
//! mid-transfer.
//!
//! With [`Proxy::record`] on, every byte forwarded either way is also kept
//! (to check what crosses the wire, e.g. that a secret never does).
//!
//! Invariants: bytes are forwarded unchanged and in order except where an
//! armed fault fires; a stream that does not start with the frame magic is
//! forwarded raw; end of stream is propagated (half-close) both ways.

use sluice_lockproto::Message;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const HEADER_LEN: usize = 24;
const MAGIC: &[u8; 4] = b"SLCE";
const MSG_EXTENT: u16 = 7;

/// A one-shot fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward exactly this many upstream-to-client bytes on the first
    /// connection that reaches it, then drop that connection.
    CutAfter(u64),
    /// Flip byte `offset % payload_len` of the payload of the `nth` (0-based)
    /// Extent frame forwarded after arming.
    CorruptExtent { nth: u64, offset: u64 },
    /// Like `CorruptExtent`, with a valid extent checksum over the flipped
    /// payload (the frame is re-encoded with lockproto's encoder).
    ForgeExtent { nth: u64, offset: u64 },
    /// Flip bit 4 of the upstream-to-client byte at this offset (counted
    /// from the start of the connection it fires on).
    FlipAt(u64),
}

/// What a fault did when it fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fired {
    /// Connection number `conn` was cut after `bytes` upstream-to-client bytes.
    Cut { conn: u64, bytes: u64 },
    /// Payload byte `offset` of an extent of `payload_len` bytes was flipped.
    Corrupted {
        conn: u64,
        payload_len: usize,
        offset: usize,
    },
    /// The same, with the extent checksum recomputed; `lba` is the wire lba.
    Forged {
        conn: u64,
        lba: u64,
        payload_len: usize,
        offset: usize,
    },
    /// The byte at `offset` of connection `conn`'s downstream was flipped.
    Flipped { conn: u64, offset: u64 },
}

/// An armed fault and the connection it is bound to, if any.
#[derive(Debug, Clone, Copy)]
struct Armed {
    fault: Fault,
    /// Bind to the next connection accepted (`arm_next`).
    next_only: bool,
    /// The connection it applies to (`None`: any).
    conn: Option<u64>,
}

impl Armed {
    fn applies_to(&self, conn: u64) -> bool {
        self.conn.is_none_or(|c| c == conn) && !(self.next_only && self.conn.is_none())
    }
}

struct Shared {
    upstream: Mutex<String>,
    fault: Mutex<Option<Armed>>,
    down_bytes: AtomicU64,
    extents_since_arm: AtomicU64,
    fired: Mutex<Vec<Fired>>,
    conns: AtomicU64,
    stop: AtomicBool,
    live: Mutex<Vec<TcpStream>>,
    recording: AtomicBool,
    recorded: Mutex<Vec<u8>>,
    rate: AtomicU64,
}

impl Shared {
    fn keep(&self, data: &[u8]) {
        if self.recording.load(Ordering::SeqCst) {
            lock(&self.recorded).extend_from_slice(data);
        }
    }
}

/// The proxy; dropping it stops it and closes every connection.
pub struct Proxy {
    addr: String,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Start forwarding to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream.to_string()),
            fault: Mutex::new(None),
            down_bytes: AtomicU64::new(0),
            extents_since_arm: AtomicU64::new(0),
            fired: Mutex::new(Vec::new()),
            conns: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
            recording: AtomicBool::new(false),
            recorded: Mutex::new(Vec::new()),
            rate: AtomicU64::new(0),
        });
        let sh = shared.clone();
        std::thread::spawn(move || accept_loop(listener, sh));
        Proxy { addr, shared }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Forward new connections to `upstream` from now on.
    pub fn set_upstream(&self, upstream: &str) {
        *lock(&self.shared.upstream) = upstream.to_string();
    }

    /// Arm `f` for whichever connection reaches it first (replacing any
    /// fault not fired yet).
    pub fn arm(&self, f: Fault) {
        self.arm_with(f, false);
    }

    /// Arm `f` for the next connection accepted only: if that connection
    /// ends without `f` firing, `f` is dropped (replacing any fault not
    /// fired yet).
    pub fn arm_next(&self, f: Fault) {
        self.arm_with(f, true);
    }

    fn arm_with(&self, fault: Fault, next_only: bool) {
        let mut armed = lock(&self.shared.fault);
        self.shared.extents_since_arm.store(0, Ordering::SeqCst);
        *armed = Some(Armed {
            fault,
            next_only,
            conn: None,
        });
    }

    /// Upstream-to-client bytes forwarded so far, all connections.
    pub fn down_bytes(&self) -> u64 {
        self.shared.down_bytes.load(Ordering::SeqCst)
    }

    /// Disarm a fault that has not fired.
    pub fn disarm(&self) {
        *lock(&self.shared.fault) = None;
    }

    /// Faults that fired so far, in order.
    pub fn fired(&self) -> Vec<Fired> {
        lock(&self.shared.fired).clone()
    }

    /// Forward upstream-to-client bytes at most this fast (0 = no limit).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.shared.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Keep (or stop keeping) a copy of every forwarded byte.
    pub fn record(&self, on: bool) {
        self.shared.recording.store(on, Ordering::SeqCst);
    }

    /// The bytes kept while recording, both directions interleaved.
    pub fn recorded(&self) -> Vec<u8> {
        lock(&self.shared.recorded).clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.conns.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        for s in lock(&self.shared.live).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    for conn in listener.incoming() {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        let n = sh.conns.fetch_add(1, Ordering::SeqCst) + 1;
        let up_addr = lock(&sh.upstream).clone();
        let Ok(server) = TcpStream::connect(&up_addr) else {
            // Upstream down: the client sees the connection close, as if
            // the source were unreachable.
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        // An `arm_next` fault binds to the first connection that reaches
        // the upstream (one refused there leaves it for the next).
        if let Some(a) = lock(&sh.fault).as_mut() {
            if a.next_only && a.conn.is_none() {
                a.conn = Some(n);
            }
        }
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        {
            let mut live = lock(&sh.live);
            live.retain(|s| s.peer_addr().is_ok());
            if let Ok(c) = client.try_clone() {
                live.push(c);
            }
        }
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        // The upstream socket's write side, shared so that a cut can close
        // every descriptor of it (the source then gets a reset at once).
        let up_w = Arc::new(Mutex::new(Some(s2)));
        let up_w2 = up_w.clone();
        let sh1 = sh.clone();
        std::thread::spawn(move || pump_raw(c2, up_w2, sh1));
        let sh2 = sh.clone();
        std::thread::spawn(move || {
            pump_down(server, up_w, client, &sh2, n);
            // A fault bound to this connection that did not fire is dropped.
            let mut f = lock(&sh2.fault);
            if f.is_some_and(|a| a.conn == Some(n)) {
                *f = None;
            }
        });
    }
}

/// Client to upstream: bytes as they come; end of stream half-closes.
/// Once the upstream side is gone (a cut), the client's bytes are read and
/// dropped until it closes: closing a socket with unread bytes would send a
/// reset that discards what was forwarded before the cut.
fn pump_raw(mut from: TcpStream, to: Arc<Mutex<Option<TcpStream>>>, sh: Arc<Shared>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                if let Some(t) = lock(&to).as_ref() {
                    let _ = t.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => {
                sh.keep(&buf[..n]);
                let mut t = lock(&to);
                if let Some(w) = t.as_mut() {
                    if w.write_all(&buf[..n]).is_err() {
                        *t = None;
                    }
                }
            }
            Err(_) => {
                if let Some(t) = lock(&to).take() {
                    let _ = t.shutdown(Shutdown::Both);
                }
                return;
            }
        }
    }
}

/// Upstream to client, frame by frame, with the armed fault applied.
fn pump_down(
    mut from: TcpStream,
    up_w: Arc<Mutex<Option<TcpStream>>>,
    mut to: TcpStream,
    sh: &Shared,
    conn: u64,
) {
    let mut buf = vec![0u8; 64 << 10];
    let mut pending: Vec<u8> = Vec::new();
    let mut sent: u64 = 0;
    let mut raw = false;
    let t0 = std::time::Instant::now();
    let cut_both = |a: &TcpStream, b: &TcpStream| {
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    };
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                // Forward what is left (a partial frame) and half-close.
                if !pending.is_empty() && !forward(&mut to, &mut pending, &mut sent, sh, conn) {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(_) => {
                cut_both(&from, &to);
                return;
            }
        };
        pending.extend_from_slice(&buf[..n]);
        // Cut out every complete frame (or everything, in raw mode).
        let mut ready: Vec<u8> = Vec::new();
        loop {
            if raw {
                ready.append(&mut pending);
                break;
            }
            if pending.len() < HEADER_LEN {
                break;
            }
            if &pending[..4] != MAGIC {
                raw = true;
                continue;
            }
            let u16_at = |o: usize| u16::from_le_bytes([pending[o], pending[o + 1]]);
            let u32_at = |o: usize| {
                u32::from_le_bytes([pending[o], pending[o + 1], pending[o + 2], pending[o + 3]])
                    as usize
            };
            let msg_type = u16_at(8);
            let body_len = u32_at(12);
            let payload_len = u32_at(16);
            let frame_len = HEADER_LEN + body_len + payload_len;
            if pending.len() < frame_len {
                break;
            }
            let mut frame: Vec<u8> = pending.drain(..frame_len).collect();
            if msg_type == MSG_EXTENT && payload_len > 0 {
                corrupt_if_armed(&mut frame, HEADER_LEN + body_len, sh, conn);
            }
            ready.extend_from_slice(&frame);
        }
        if !ready.is_empty() && !forward(&mut to, &mut ready, &mut sent, sh, conn) {
            // Everything forwarded so far reaches the client, then its end
            // of stream; the upstream connection is closed (every
            // descriptor of it: `from` is dropped on return).
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Both);
            drop(lock(&up_w).take());
            return;
        }
        let rate = sh.rate.load(Ordering::SeqCst);
        if rate > 0 {
            let due = t0 + std::time::Duration::from_secs_f64(sent as f64 / rate as f64);
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
    }
}

fn corrupt_if_armed(frame: &mut Vec<u8>, payload_at: usize, sh: &Shared, conn: u64) {
    let mut f = lock(&sh.fault);
    let Some(armed) = *f else { return };
    if !armed.applies_to(conn) {
        return;
    }
    let (nth, offset, forge) = match armed.fault {
        Fault::CorruptExtent { nth, offset } => (nth, offset, false),
        Fault::ForgeExtent { nth, offset } => (nth, offset, true),
        _ => return,
    };
    let seen = sh.extents_since_arm.fetch_add(1, Ordering::SeqCst);
    if seen != nth {
        return;
    }
    *f = None;
    let payload_len = frame.len() - payload_at;
    let off = (offset % payload_len as u64) as usize;
    frame[payload_at + off] ^= 0xA5;
    if !forge {
        lock(&sh.fired).push(Fired::Corrupted {
            conn,
            payload_len,
            offset: off,
        });
        return;
    }
    let decoded = sluice_lockproto::decode(frame)
        .expect("the source sent a valid Extent frame")
        .expect("a whole frame");
    let Message::Extent(mut h) = decoded.msg else {
        panic!("message type 7 is not an Extent");
    };
    let payload = decoded.payload.to_vec();
    // sluice_replicator::transfer::checksum (xxh3-64 of the payload); the
    // kit does not depend on the replicator. Should the two differ, the
    // forge tests would see an extent checksum error instead of a digest one.
    h.checksum = xxhash_rust::xxh3::xxh3_64(&payload);
    let lba = h.lba;
    *frame = sluice_lockproto::encode(&Message::Extent(h), &payload).expect("re-encode Extent");
    lock(&sh.fired).push(Fired::Forged {
        conn,
        lba,
        payload_len,
        offset: off,
    });
}

/// Write `data` (the next bytes after `sent` of connection `conn`),
/// honouring an armed cut or flip. False: the connection was cut (or the
/// client went away).
fn forward(to: &mut TcpStream, data: &mut [u8], sent: &mut u64, sh: &Shared, conn: u64) -> bool {
    let end = *sent + data.len() as u64;
    let cut_at = {
        let mut f = lock(&sh.fault);
        match *f {
            Some(a) if a.applies_to(conn) => match a.fault {
                Fault::CutAfter(n) if end >= n => {
                    *f = None;
                    Some(n)
                }
                Fault::FlipAt(at) if (*sent..end).contains(&at) => {
                    *f = None;
                    data[(at - *sent) as usize] ^= 0x10;
                    lock(&sh.fired).push(Fired::Flipped { conn, offset: at });
                    None
                }
                _ => None,
            },
            _ => None,
        }
    };
    match cut_at {
        Some(n) => {
            let keep = (n.saturating_sub(*sent)) as usize;
            sh.keep(&data[..keep]);
            let _ = to.write_all(&data[..keep]);
            *sent += keep as u64;
            sh.down_bytes.fetch_add(keep as u64, Ordering::SeqCst);
            let _ = to.flush();
            lock(&sh.fired).push(Fired::Cut { conn, bytes: n });
            false
        }
        None => {
            sh.keep(data);
            if to.write_all(data).is_err() {
                return false;
            }
            *sent += data.len() as u64;
            sh.down_bytes.fetch_add(data.len() as u64, Ordering::SeqCst);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that sends `len` zero bytes to every connection, then
    /// closes it.
    fn zeros_upstream(len: usize) -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let _ = c.write_all(&vec![0u8; len]);
            }
        });
        addr
    }

    fn read_all(p: &Proxy) -> Vec<u8> {
        let mut c = TcpStream::connect(p.addr()).expect("connect");
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        out
    }

    #[test]
    fn flip_at_next_connection_only_then_clean() {
        let p = Proxy::start(&zeros_upstream(1000));
        p.arm_next(Fault::FlipAt(10));
        let first = read_all(&p);
        assert_eq!(first.len(), 1000);
        assert_eq!(first[10], 0x10);
        assert_eq!(first.iter().filter(|&&b| b != 0).count(), 1);
        assert_eq!(read_all(&p), vec![0u8; 1000]);
        assert_eq!(p.down_bytes(), 2000);
        assert_eq!(
            p.fired(),
            vec![Fired::Flipped {
                conn: 1,
                offset: 10
            }]
        );
    }

    #[test]
    fn an_arm_next_fault_the_connection_never_reaches_is_dropped() {
        let p = Proxy::start(&zeros_upstream(1000));
        p.arm_next(Fault::CutAfter(5000));
        assert_eq!(read_all(&p).len(), 1000);
        // The first connection's pump clears the fault when it ends.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while lock(&p.shared.fault).is_some() {
            assert!(std::time::Instant::now() < end, "fault still armed");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(read_all(&p).len(), 1000);
        assert!(p.fired().is_empty());
    }

    #[test]
    fn cut_after_fires_on_the_first_connection_that_reaches_it() {
        let p = Proxy::start(&zeros_upstream(1000));
        p.arm(Fault::CutAfter(1500));
        assert_eq!(read_all(&p).len(), 1000);
        p.set_upstream(&zeros_upstream(2000));
        assert_eq!(read_all(&p).len(), 1500);
        assert_eq!(
            p.fired(),
            vec![Fired::Cut {
                conn: 2,
                bytes: 1500
            }]
        );
    }
}
