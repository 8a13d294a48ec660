//! Issue 16: a reply of any size is read, not refused for a 1 MiB line. A
//! node's answer grows with what it holds; here `lock list` of 3,000
//! application locks with long texts (about 1.5 MiB of JSON on one line)
//! through the CLI as an operator types it, `--json` and the table, while
//! a request line is still bounded at 1 MiB.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};

const LOCKS: usize = 3000;

#[test]
fn lock_list_longer_than_a_mebibyte_reads_whole() {
    let dir = tempfile::tempdir().unwrap();
    let pool = init_pool(dir.path(), "pool.img", "256M");
    let d = Daemon::start(&pool);
    d.ok(&["vol", "create", "v", "--size", "16M"]);
    d.ok(&["snap", "create", "v", "s1"]);
    // The locks go in on one control connection, pipelined (3,000 CLI
    // runs would only be slower).
    let s = d.control_conn();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let text = "t".repeat(200);
        for i in 0..LOCKS {
            let req = serde_json::json!({
                "op": "lock_add", "volume": "v", "snapshot": "s1",
                "owner": format!("app-{i:05}"), "text": text,
            });
            writeln!(w, "{req}").unwrap();
        }
    });
    let mut r = BufReader::new(s);
    for i in 0..LOCKS {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], true, "lock {i}: {v}");
    }
    writer.join().unwrap();

    let o = d.cli(&["lock", "list", "--json"]);
    assert!(o.status.success(), "lock list --json: {}", stderr(&o));
    assert!(
        o.stdout.len() > 1 << 20,
        "the reply is meant to pass 1 MiB: {} bytes",
        o.stdout.len()
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let locks = v.as_array().unwrap();
    let apps = locks
        .iter()
        .filter(|l| l["text"].as_str().unwrap_or("").starts_with("app-"))
        .count();
    assert_eq!(apps, LOCKS, "every application lock listed");
    let table = d.ok(&["lock", "list"]);
    assert!(
        table.contains("app-02999"),
        "the table lists the last one too"
    );

    // A request line is still bounded: 2 MiB of one line is refused, named.
    let s = d.control_conn();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut long = vec![b' '; 2 << 20];
    long.push(b'\n');
    let _ = w.write_all(&long);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("longer than"), "{line}");
}
