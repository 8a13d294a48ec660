//! The network between two nodes: one TCP proxy per (downstream, upstream)
//! pair, on 127.0.0.1, through which the downstream reaches the upstream
//! (mirror sources name the proxy, so transfers and lock-set sessions both
//! cross it). Faults, each until a deadline:
//! - `cut`: every open connection is shut down both ways (a reset mid-frame);
//! - `partition`: the same, and new connections are closed at once until it heals;
//! - `stall`: bytes stop moving (connections stay open) until it ends;
//! - `delay`: every chunk waits `delay_ms` before it is forwarded.
//!
//! Invariants: outside a fault, bytes are forwarded unchanged and in order,
//! end of stream half-closes; the proxy never sends anything outside
//! 127.0.0.1 (it binds and connects to loopback addresses only).

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    /// Deadlines as milliseconds since `t0` (0: none).
    partition_until_ms: AtomicU64,
    stall_until_ms: AtomicU64,
    delay_until_ms: AtomicU64,
    delay_ms: AtomicU64,
    stop: AtomicBool,
    conns: AtomicU64,
    live: Mutex<Vec<TcpStream>>,
}

/// One proxy; dropping it stops it.
pub struct Proxy {
    pub addr: String,
    t0: Instant,
    st: Arc<State>,
}

impl Proxy {
    /// Listen on a free loopback port, forward to `upstream` (a loopback address).
    pub fn start(upstream: &str) -> Result<Proxy> {
        assert!(upstream.starts_with("127."), "the soak stays on loopback");
        let l = TcpListener::bind("127.0.0.1:0").context("proxy bind")?;
        let addr = l.local_addr()?.to_string();
        let st = Arc::new(State::default());
        let t0 = Instant::now();
        let (st2, up) = (st.clone(), upstream.to_string());
        std::thread::spawn(move || accept_loop(l, up, st2, t0));
        Ok(Proxy { addr, t0, st })
    }

    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// Shut down every open connection.
    pub fn cut(&self) {
        for s in self
            .st
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn partition(&self, d: Duration) {
        let until = self.now_ms() + d.as_millis() as u64;
        self.st.partition_until_ms.store(until, Ordering::SeqCst);
        self.cut();
    }

    pub fn stall(&self, d: Duration) {
        let until = self.now_ms() + d.as_millis() as u64;
        self.st.stall_until_ms.store(until, Ordering::SeqCst);
    }

    pub fn delay(&self, d: Duration, delay_ms: u64) {
        self.st.delay_ms.store(delay_ms, Ordering::SeqCst);
        let until = self.now_ms() + d.as_millis() as u64;
        self.st.delay_until_ms.store(until, Ordering::SeqCst);
    }

    /// End every fault now.
    pub fn heal(&self) {
        self.st.partition_until_ms.store(0, Ordering::SeqCst);
        self.st.stall_until_ms.store(0, Ordering::SeqCst);
        self.st.delay_until_ms.store(0, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.st.conns.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.st.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        self.cut();
    }
}

fn accept_loop(l: TcpListener, upstream: String, st: Arc<State>, t0: Instant) {
    for conn in l.incoming() {
        if st.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        st.conns.fetch_add(1, Ordering::SeqCst);
        if (t0.elapsed().as_millis() as u64) < st.partition_until_ms.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect(&upstream) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        {
            let mut live = st.live.lock().unwrap_or_else(|p| p.into_inner());
            live.retain(|s| s.peer_addr().is_ok());
            for s in [&client, &server] {
                if let Ok(c) = s.try_clone() {
                    live.push(c);
                }
            }
        }
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        let st1 = st.clone();
        std::thread::spawn(move || pump(client, server, st1, t0));
        let st2 = st.clone();
        std::thread::spawn(move || pump(s2, c2, st2, t0));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, st: Arc<State>, t0: Instant) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        loop {
            let now = t0.elapsed().as_millis() as u64;
            let stall = st.stall_until_ms.load(Ordering::SeqCst);
            if now >= stall || st.stop.load(Ordering::SeqCst) {
                if now < st.delay_until_ms.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(st.delay_ms.load(Ordering::SeqCst)));
                }
                break;
            }
            std::thread::sleep(Duration::from_millis((stall - now).min(100)));
        }
        if to.write_all(&buf[..n]).is_err() {
            let _ = from.shutdown(Shutdown::Both);
            return;
        }
    }
}
