//! Issue 16 ("Commands"), on real `sluice serve` processes: every long
//! operation reports its progress while it runs, so the CLI can draw a bar
//! (bytes, rate, time left) on a terminal.
//!
//! The bug: `mirror create` was silent for its whole baseline (the node
//! passed its transfer no progress callback), and a prune of many
//! snapshots said nothing until its end. Now the node streams progress
//! lines (`{"progress":{done_items,total_items,done_bytes,total_bytes}}`)
//! for `mirror_create`, `mirror_update`, `mirror_resync`,
//! `mirror_retarget` and `prune`; the test reads them as any control API
//! client would. On a terminal the CLI draws them as a bar on stderr; with
//! `--json` it draws none and prints only the JSON result (checked under a
//! pseudo-terminal, through `script`, when it is installed).

mod common;
use common::*;
use serde_json::Value;
use sluice::control::{Client, ControlRequest};
use sluice::nbd_client::NbdClient;

const MIB: u64 = 1 << 20;

/// Run `req` on `d` through the control API: the progress lines it got,
/// and the final result.
fn call(d: &Daemon, req: ControlRequest) -> (Vec<Value>, Value) {
    let mut c = Client::connect(&d.control).unwrap();
    let mut lines = Vec::new();
    let r = c
        .call_with_progress(&req, &mut |p| lines.push(p.clone()))
        .unwrap_or_else(|e| panic!("{req:?}: {e}"));
    (lines, r)
}

/// Progress lines of a transfer: counts only grow, the last one has every
/// byte of the report.
fn check_transfer(what: &str, lines: &[Value], report: &Value) {
    assert!(lines.len() >= 2, "{what}: {} progress lines", lines.len());
    let mut last = 0;
    for p in lines {
        let done = p["done_bytes"].as_u64().unwrap();
        assert!(done >= last, "{what}: progress went back: {lines:?}");
        assert!(done <= p["total_bytes"].as_u64().unwrap(), "{what}: {p}");
        last = done;
    }
    let end = lines.last().unwrap();
    assert_eq!(end["done_bytes"], end["total_bytes"], "{what}: {end}");
    assert_eq!(end["done_bytes"], report["bytes"], "{what}: {report}");
    assert!(report["bytes"].as_u64().unwrap() > 0, "{what}: {report}");
}

fn write_mib(d: &Daemon, export: &str, at_mib: u64, n_mib: u64, v: u8) {
    let mut c = NbdClient::open(&d.nbd, export).unwrap();
    let data = vec![v; MIB as usize];
    for i in 0..n_mib {
        c.write((at_mib + i) * MIB, &data).unwrap();
    }
    c.flush().unwrap();
}

#[test]
fn baseline_update_resync_and_prune_report_progress() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::named(dir.path(), "a", &[]);
    let b = Daemon::named(dir.path(), "b", &[]);
    a.ok(&["vol", "create", "v", "--size", "32M"]);
    write_mib(&a, "v", 0, 6, 1);
    a.ok(&["snap", "create", "v", "s1"]);

    let (lines, r) = call(
        &b,
        ControlRequest::MirrorCreate {
            dst_volume: "v".into(),
            source: a.source("v"),
            dst_qtree: None,
            every_secs: None,
            follow: false,
            throttle_bps: None,
            keep: None,
        },
    );
    assert_eq!(r["kind"], "full", "{r}");
    check_transfer("mirror create (the baseline)", &lines, &r);

    write_mib(&a, "v", 8, 2, 2);
    a.ok(&["snap", "create", "v", "s2"]);
    let (lines, r) = call(&b, ControlRequest::MirrorUpdate { dst: "v".into() });
    assert_eq!(r["kind"], "incremental", "{r}");
    check_transfer("mirror update", &lines, &r);

    b.ok(&["mirror", "break", "v"]);
    write_mib(&a, "v", 12, 3, 3);
    a.ok(&["snap", "create", "v", "s3"]);
    let (lines, r) = call(
        &b,
        ControlRequest::MirrorResync {
            dst: "v".into(),
            force: false,
        },
    );
    assert_eq!(r["target"]["name"], "s3", "{r}");
    check_transfer("mirror resync", &lines, &r);

    // A prune: one line before it starts, then one per snapshot settled.
    for i in 4..=9 {
        a.ok(&["snap", "create", "v", &format!("s{i}")]);
    }
    let (lines, r) = call(
        &a,
        ControlRequest::Prune {
            volume: "v".into(),
            keep: 2,
            dry_run: false,
        },
    );
    let done: Vec<u64> = lines
        .iter()
        .map(|p| {
            assert_eq!(p["total_items"], 7, "{p}");
            p["done_items"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(
        done,
        (0..=7).collect::<Vec<_>>(),
        "prune progress: {lines:?}"
    );
    // s3 is B's newest common snapshot: locked, kept, and counted.
    assert_eq!(
        r["deleted"].as_array().unwrap().len() + r["skipped"].as_array().unwrap().len(),
        7,
        "{r}"
    );

    // Under a terminal: `--json` prints the result alone, no bar.
    if !have("script") {
        println!("skipped the terminal check: `script` not found");
        return;
    }
    write_mib(&a, "v", 16, 2, 4);
    a.ok(&["snap", "create", "v", "s10"]);
    let cmd = format!(
        "{} --node {} mirror update v --json",
        env!("CARGO_BIN_EXE_sluice"),
        b.control
    );
    let o = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let text = stdout(&o);
    assert!(o.status.success(), "{text}{}", stderr(&o));
    let v: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("--json on a terminal printed more than JSON ({e}): {text:?}"));
    assert_eq!(v["kind"], "incremental", "{v}");
}
