//! Issue 16 ("Around the binary"): `/metrics` as a scraper reads it from
//! two real nodes, A -> B: OpenMetrics text (prometheus-client), the
//! `node` label on every series, lock sets counted where they are sent and
//! received, per relationship its transfers, resumes, lag and the time of
//! its last success, and the throttles (the node's and a relationship's).

mod common;
use common::*;

#[test]
fn two_nodes_report_lock_sets_transfers_lag_and_throttles() {
    let dir = tempfile::tempdir().unwrap();
    let a = Daemon::named(dir.path(), "a", &[]);
    let b = Daemon::named(dir.path(), "b", &["--throttle", "200M"]);
    a.ok(&["vol", "create", "v", "--size", "4M"]);
    a.ok(&["snap", "create", "v", "s1"]);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    b.ok(&[
        "mirror",
        "create",
        "v",
        "--from",
        &a.source("v"),
        "--throttle",
        "50M",
    ]);
    a.ok(&["snap", "create", "v", "s2"]);
    b.ok(&["mirror", "update", "v"]);

    // Every series of each node carries its own name.
    for (d, name) in [(&a, "a"), (&b, "b")] {
        let raw = d.metrics_raw();
        assert!(raw.ends_with("# EOF\n"), "{raw}");
        for l in raw.lines().filter(|l| l.starts_with("sluice_")) {
            assert!(
                l.starts_with(&format!(
                    "{}{{node=\"{name}\"",
                    l.split('{').next().unwrap()
                )),
                "{l}"
            );
        }
    }
    // B sent its lock sets (after the baseline and the update), A took them.
    let sent = b.metric("sluice_repl_lock_sets_sent_total").unwrap();
    assert!(sent >= 2, "b sent {sent} lock sets");
    let got = wait_for_metric(&a, "sluice_repl_lock_sets_received_total", sent);
    assert!(got >= sent, "a received {got} of {sent}");
    assert_eq!(a.metric("sluice_repl_lock_sets_refused_total"), Some(0));
    // Per relationship on B.
    assert_eq!(
        b.metric("sluice_repl_transfers_total{dst=\"v\",kind=\"full\"}"),
        Some(1)
    );
    assert_eq!(
        b.metric("sluice_repl_transfers_total{dst=\"v\",kind=\"incremental\"}"),
        Some(1)
    );
    assert_eq!(
        b.metric("sluice_repl_transfers_resumed_total{dst=\"v\"}"),
        Some(0)
    );
    let last = b
        .metric("sluice_repl_last_success_timestamp_seconds{dst=\"v\"}")
        .expect("last success");
    assert!(
        last >= before,
        "last success {last} before the run {before}"
    );
    assert!(b.metric("sluice_repl_lag_seconds{dst=\"v\"}").is_some());
    assert_eq!(b.metric("sluice_repl_broken{dst=\"v\"}"), Some(0));
    // The throttles: the node's and the relationship's.
    assert_eq!(
        b.metric("sluice_repl_throttle_bytes_per_second{scope=\"node\",dst=\"\"}"),
        Some(200 << 20)
    );
    assert_eq!(
        b.metric("sluice_repl_throttle_bytes_per_second{scope=\"relationship\",dst=\"v\"}"),
        Some(50 << 20)
    );
    // A counts the soft locks B holds there, as `lock list` shows them.
    let listed = a.json(&["lock", "list"]).as_array().unwrap().len() as u64;
    assert!(listed >= 1);
    assert_eq!(
        a.metric("sluice_repl_locks{state=\"active\"}"),
        Some(listed)
    );

    // Every series the example dashboard queries is one the nodes export.
    let dash = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana/sluice-dashboard.json"),
    )
    .unwrap();
    let _: serde_json::Value = serde_json::from_str(&dash).expect("the dashboard is JSON");
    let exported = format!("{}{}", a.metrics(), b.metrics());
    let mut names: Vec<&str> = dash
        .match_indices("sluice_")
        .map(|(i, _)| {
            let rest = &dash[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|n| *n != "sluice_" && !n.starts_with("sluice_overview"))
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() > 15, "{names:?}");
    for n in names {
        // A family with no rows yet (no destructive operation so far) is
        // still declared.
        let family = n.trim_end_matches("_total").trim_end_matches("_bucket");
        assert!(
            exported
                .lines()
                .any(|l| l.starts_with(n) && matches!(l.as_bytes().get(n.len()), Some(b'{' | b' ')))
                || exported.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {n}, which no node exports"
        );
    }
}

/// Lock sets travel on their own connections: wait until `name` reaches
/// `at_least` (or give up after a while and return what it is).
fn wait_for_metric(d: &Daemon, name: &str, at_least: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let v = d.metric(name).unwrap_or(0);
        if v >= at_least || std::time::Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
