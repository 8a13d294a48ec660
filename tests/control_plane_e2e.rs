//! Issue 13: the control plane is separate from the peer plane. Before,
//! anyone who could reach a node's peer port could send it control JSON
//! (`snap_delete` with `force`, `mirror break`, `vol_delete`); now the
//! control API listens only on a root-only Unix socket, and the peer port
//! answers a control request with an error and runs nothing.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};

#[test]
fn the_control_socket_is_root_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::named(dir.path(), "a", &[]);
    let meta = std::fs::metadata(&d.control).unwrap();
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        d.control
    );
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "control socket {} mode {:o}",
        d.control,
        meta.permissions().mode()
    );
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);
    // Next to the pool file by default.
    assert!(d.control.ends_with("a.img.sock"), "{}", d.control);
    // `unix:` spelling works too.
    let o = sluice(&["--node", &format!("unix:{}", d.control), "status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The audit log names the Unix peer by its credentials.
    d.ok(&["vol", "create", "v", "--size", "16M"]);
    d.ok(&["vol", "delete", "v"]);
    let log = d.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("audit") && l.contains("uid=0 pid=")),
        "{log}"
    );
    // Stopping the node removes its socket.
    let path = d.control.clone();
    assert!(d.term().success());
    assert!(!std::path::Path::new(&path).exists(), "{path} left behind");
}

#[test]
fn the_peer_port_refuses_control_requests() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::named(dir.path(), "a", &[]);
    d.ok(&["vol", "create", "v", "--size", "16M"]);
    for req in [
        "{\"op\":\"vol_delete\",\"name\":\"v\"}\n",
        "{\"op\":\"status\"}\n",
    ] {
        let mut s = std::net::TcpStream::connect(&d.listen).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        BufReader::new(s).read_line(&mut resp).unwrap();
        let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
        assert_eq!(v["ok"], false, "{req}: {v}");
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("not served on the peer port"),
            "{v}"
        );
    }
    // The CLI pointed at the peer port gets the same clear error.
    let o = sluice(&["--node", &d.listen, "vol", "delete", "v"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not served on the peer port"),
        "{}",
        stderr(&o)
    );
    // Nothing ran: the volume is still there.
    let vols = d.json(&["vol", "list"]);
    assert_eq!(vols[0]["name"], "v", "{vols}");
}
