//! Issue 13, denial of service on the `--listen` (peer) port and on the
//! control socket, tried as an attacker would, on a real `sluice serve`. Each test fails on the
//! code before the fix: the node then stopped answering for good (or held
//! the attacker's connection as long as it liked).
//! - 256 connections that send 1 to 3 bytes and close used to leave 256
//!   threads peeking in a loop forever: the connection cap was reached and
//!   the operator locked out until a restart.
//! - A control connection (on the control socket, and a stray one on the
//!   peer port) that sends `{` and nothing more is closed at the
//!   configured control timeout.
//! - A peer frame header that announces a 1 MiB body before the handshake
//!   is refused at once instead of buffering for it.
//! - A peer that drips its Hello a byte at a time is cut at the handshake
//!   deadline, not kept while each byte arrives within a read timeout.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

fn node(dir: &Path, extra: &[&str]) -> Daemon {
    let pool = init_pool(dir, "a.img", "64M");
    let mut args = vec!["--name", "a"];
    args.extend_from_slice(extra);
    Daemon::try_start(&pool, &args).unwrap()
}

/// True once the node answers a control request again.
fn answers(d: &Daemon) -> bool {
    d.cli(&["status"]).status.success()
}

/// A socket a test can put a read timeout on.
trait Timeout: Read + Write {
    fn timeout(&self, wait: Duration);
}
impl Timeout for TcpStream {
    fn timeout(&self, wait: Duration) {
        self.set_read_timeout(Some(wait)).unwrap();
    }
}
impl Timeout for UnixStream {
    fn timeout(&self, wait: Duration) {
        self.set_read_timeout(Some(wait)).unwrap();
    }
}

/// Read until the server closes (true) or `wait` passes (false).
fn closed_by_server(s: &mut impl Timeout, wait: Duration) -> bool {
    s.timeout(wait);
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // an error frame or line first
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn stray_bytes_then_close_do_not_lock_out_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let d = node(dir.path(), &[]);
    for i in 0..256usize {
        let mut s = TcpStream::connect(&d.listen).unwrap();
        let junk = [b'S', b'L', b'C'];
        s.write_all(&junk[..1 + i % 3]).unwrap();
        drop(s);
    }
    wait_until("the node to answer after 256 stray connections", || {
        answers(&d)
    });
    // Again: the slots were given back, not just some of them.
    for _ in 0..256 {
        let mut s = TcpStream::connect(&d.listen).unwrap();
        s.write_all(b"GE").unwrap();
    }
    wait_until("the node to answer after 512 stray connections", || {
        answers(&d)
    });
}

#[test]
fn a_silent_control_connection_is_closed_at_the_control_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "control_timeout_ms = 1000\n").unwrap();
    let d = node(dir.path(), &["--config", cfg.to_str().unwrap()]);
    silent_and_dribbling_are_cut(d.control_conn(), d.control_conn());
    // The same on the peer port, where `{` is refused, never served.
    silent_and_dribbling_are_cut(
        TcpStream::connect(&d.listen).unwrap(),
        TcpStream::connect(&d.listen).unwrap(),
    );
    assert!(answers(&d));
}

fn silent_and_dribbling_are_cut(mut s: impl Timeout, mut t: impl Timeout) {
    s.write_all(b"{").unwrap();
    assert!(
        closed_by_server(&mut s, Duration::from_secs(30)),
        "a control connection that sent `{{` stayed open"
    );
    // A client that dribbles a byte at a time is cut all the same.
    let mut cut = false;
    for b in b"{\"op\":\"status\"".iter().cycle().take(200) {
        if t.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        cut || closed_by_server(&mut t, Duration::from_secs(30)),
        "a dribbling control client was never cut"
    );
}

#[test]
fn a_peer_header_announcing_a_big_body_before_the_handshake_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = node(dir.path(), &[]);
    let mut h = Vec::new();
    h.extend_from_slice(&sluice_lockproto::wire::MAGIC.to_le_bytes());
    h.extend_from_slice(&sluice_lockproto::wire::VERSION_MAJOR.to_le_bytes());
    h.extend_from_slice(&sluice_lockproto::wire::VERSION_MINOR.to_le_bytes());
    h.extend_from_slice(&7u16.to_le_bytes()); // Extent (may carry a payload)
    h.extend_from_slice(&0u16.to_le_bytes()); // flags
    h.extend_from_slice(&(1u32 << 20).to_le_bytes()); // body
    h.extend_from_slice(&(8u32 << 20).to_le_bytes()); // payload
    h.extend_from_slice(&0u32.to_le_bytes()); // crc
    let mut conns = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(&d.listen).unwrap();
        s.write_all(&h).unwrap();
        s.write_all(&[0u8; 64]).unwrap();
        conns.push(s);
    }
    for s in &mut conns {
        assert!(
            closed_by_server(s, Duration::from_secs(20)),
            "the node waited for a 9 MiB frame from an unauthenticated peer"
        );
    }
    assert!(answers(&d));
    wait_until("the refusal in the node's log", || {
        d.log_text().contains("before the handshake finished")
    });
}

#[test]
fn a_peer_dripping_its_hello_is_cut_at_the_handshake_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, "peer_timeout_ms = 2000\n").unwrap();
    let d = node(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let mut s = TcpStream::connect(&d.listen).unwrap();
    // The magic (so it is a peer), then one byte every half second: each
    // within the 2 s read timeout, never a whole 24-byte header.
    s.write_all(&sluice_lockproto::wire::MAGIC.to_le_bytes())
        .unwrap();
    let mut dripped = 0;
    let mut cut = false;
    while dripped < 19 {
        std::thread::sleep(Duration::from_millis(500));
        if s.write_all(&[0]).is_err() || closed_by_server(&mut s, Duration::from_millis(10)) {
            cut = true;
            break;
        }
        dripped += 1;
    }
    assert!(
        cut,
        "a peer dripping its header a byte per 0.5 s was kept for {dripped} bytes with a 2 s peer timeout"
    );
}

/// A TCP connection to `to` from the local source address `from`
/// (127.0.0.0/8 is all loopback).
fn connect_from(from: [u8; 4], to: &str) -> TcpStream {
    use std::os::fd::FromRawFd;
    let to: std::net::SocketAddrV4 = to.parse().unwrap();
    let sin = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a fresh fd with valid sockaddr_in
    // values; the fd is owned by the returned stream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket");
        let local = sin(from, 0);
        let rc = libc::bind(fd, &local as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "bind to {from:?}");
        let remote = sin(to.ip().octets(), to.port());
        let rc = libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "connect to {to}");
        TcpStream::from_raw_fd(fd)
    }
}

/// One source cannot take every slot of the peer port: past its 64
/// connections, the next from the same address is closed at once, while
/// another address is served.
#[test]
fn one_source_cannot_take_every_peer_slot() {
    let dir = tempfile::tempdir().unwrap();
    let d = node(dir.path(), &[]);
    let idle: Vec<TcpStream> = (0..64)
        .map(|_| connect_from([127, 0, 0, 2], &d.listen))
        .collect();
    let mut extra = connect_from([127, 0, 0, 2], &d.listen);
    assert!(
        closed_by_server(&mut extra, Duration::from_secs(5)),
        "a 65th connection from one source was kept"
    );
    let mut m = TcpStream::connect(&d.listen).unwrap();
    m.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    m.read_to_string(&mut text).unwrap();
    assert!(text.contains("sluice_"), "{text}");
    drop(idle);
    assert!(d.log_text().contains("too many connections from 127.0.0.2"));
}
