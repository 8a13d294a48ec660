//! Issue 13: the control API on TCP runs nothing without a token. Before,
//! the control API was on the peer port with no credential at all; now TCP
//! control is off unless `control_listen` is set, and then every connection
//! must first present a token the node's `control_tokens` names.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

fn token(dir: &Path, name: &str) -> String {
    let p = dir.join(format!("{name}.token"));
    let o = sluice(&["token", "create", name, "--out", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    p.to_str().unwrap().to_string()
}

fn node(dir: &Path, ops: &str) -> Daemon {
    let cfg = dir.join("n.toml");
    std::fs::write(
        &cfg,
        format!("control_listen = \"127.0.0.1:0\"\ncontrol_tokens = [\"{ops}\"]\n"),
    )
    .unwrap();
    Daemon::named(dir, "a", &["--config", cfg.to_str().unwrap()])
}

/// Send raw lines on a fresh TCP control connection; the replies.
fn raw(addr: &str, lines: &[&str]) -> Vec<serde_json::Value> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    for l in lines {
        let _ = s.write_all(l.as_bytes());
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    BufReader::new(s)
        .lines()
        .map_while(|l| l.ok())
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect()
}

#[test]
fn without_a_valid_token_no_control_operation_runs() {
    let dir = tempfile::tempdir().unwrap();
    let ops = token(dir.path(), "ops");
    let eve = token(dir.path(), "eve"); // a well-formed token the node does not accept
    let d = node(dir.path(), &ops);
    let tcp = d
        .control_tcp
        .clone()
        .expect("control_tcp on the ready line");

    // No token: the first request is refused and the connection closed;
    // the second never runs either.
    let got = raw(
        &tcp,
        &[
            "{\"op\":\"vol_create\",\"name\":\"x\",\"size_bytes\":16777216}\n",
            "{\"op\":\"status\"}\n",
        ],
    );
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["ok"], false);
    assert!(
        got[0]["error"].as_str().unwrap().contains("needs a token"),
        "{got:?}"
    );
    // A forged token line.
    let got = raw(&tcp, &["{\"token\":\"ops:00\"}\n", "{\"op\":\"status\"}\n"]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0]["error"]
        .as_str()
        .unwrap()
        .contains("token not accepted"));

    // The CLI: no token, a wrong token: refused with a clear error.
    let o = sluice(&["--node", &tcp, "vol", "create", "y", "--size", "16M"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("needs a token"), "{}", stderr(&o));
    let o = sluice(&[
        "--node",
        &tcp,
        "--token-file",
        &eve,
        "vol",
        "create",
        "y",
        "--size",
        "16M",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("token not accepted"), "{}", stderr(&o));
    let vols = d.json(&["vol", "list"]);
    assert_eq!(vols.as_array().unwrap().len(), 0, "something ran: {vols}");

    // The right token, by name (localhost) and by env var.
    let port = tcp.rsplit(':').next().unwrap();
    let by_name = format!("localhost:{port}");
    let o = sluice(&[
        "--node",
        &by_name,
        "--token-file",
        &ops,
        "vol",
        "create",
        "z",
        "--size",
        "16M",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = std::process::Command::new(BIN)
        .args(["--node", &tcp, "vol", "delete", "z"])
        .env("SLUICE_TOKEN_FILE", &ops)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // The audit names the token.
    let log = d.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("audit") && l.contains("token=ops") && l.contains("vol_delete")),
        "{log}"
    );
    assert!(log.contains("control connection refused"), "{log}");
}

#[test]
fn tcp_control_without_tokens_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("n.toml");
    std::fs::write(&cfg, "control_listen = \"127.0.0.1:0\"\n").unwrap();
    let pool = init_pool(dir.path(), "a.img", "64M");
    let e = Daemon::try_start(&pool, &["--config", cfg.to_str().unwrap()])
        .err()
        .expect("a TCP control API without tokens started");
    assert!(e.contains("control_listen needs control_tokens"), "{e}");
}
