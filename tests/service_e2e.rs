//! Running under a service manager (issue 16): with `NOTIFY_SOCKET` set,
//! as systemd's `Type=notify` sets it, the node sends `READY=1` (with its
//! `MAINPID`) once every listener is up and `STOPPING=1` at SIGTERM, then
//! stops cleanly (exit 0). `scripts/systemd/sluice.service` is the unit.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn the_node_tells_the_service_manager_when_it_is_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let pool = init_pool(dir.path(), "a.img", "64M");
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--data", pool.to_str().unwrap(), "--name", "a"])
        .args(["--listen", "127.0.0.1:0", "--insecure-peers"])
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("READY=1 within 60 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(msg.contains(&format!("MAINPID={}", child.id())), "{msg}");
    // Ready means serving: the ready line is out and the control API answers.
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ready "), "{line}");
    let control = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("control="))
        .unwrap()
        .to_string();
    let o = sluice(&["--node", &control, "status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = sock.recv(&mut buf).expect("STOPPING=1 at SIGTERM");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
