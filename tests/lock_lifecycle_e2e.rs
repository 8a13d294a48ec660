//! Issue 5, test 5, with real `sluice serve` processes and real TCP: the
//! life of soft locks in a cascade A -> B -> C.
//!
//! - C's base lock appears on A with its hop path through B.
//! - `snap delete` of a locked snapshot on A is refused naming the holders
//!   (one line, non-zero exit); `--force` deletes it (logged with the
//!   holders), B is told (its next update keeps its own copy because C
//!   locks it there, and A stops showing locks on it) and C's chain holds.
//! - `lock add` on C (owner and text) shows on B and A; `lock release` ends
//!   it everywhere.
//! - A silent (killed) downstream's locks turn stale after its lease and
//!   are kept under the default policy; it renews them when it comes back.
//! - `mirror delete` on C releases C's locks on B and A.
//! - With `lease_policy = "release"`, a silent downstream's locks disappear
//!   after the grace period, on its upstream and (relayed) further up.
//! - What the operator was told is done (a lock added, a lock released, a
//!   mirror broken) survives a SIGKILL right after the answer.
//!
//! Short leases come from `--config` TOML files. Every wait polls with a
//! deadline; no wall-clock duration is asserted.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

const LEASE_MS: u64 = 3000;

fn config(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn locks(d: &Daemon) -> Vec<Value> {
    d.json(&["lock", "list"]).as_array().unwrap().clone()
}

fn from_origin<'a>(ls: &'a [Value], origin: &str) -> Vec<&'a Value> {
    ls.iter().filter(|l| l["origin_node"] == origin).collect()
}

fn hops(l: &Value) -> Vec<String> {
    l["hop_path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_string())
        .collect()
}

fn snap_id(d: &Daemon, snap: &str) -> String {
    d.json(&["snap", "list", "v"])
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == snap)
        .and_then(|s| s["id"].as_str())
        .unwrap_or_else(|| panic!("snapshot v@{snap}"))
        .to_string()
}

fn update(d: &Daemon, vol: &str) -> Value {
    d.json(&["mirror", "update", vol])
}

#[test]
fn soft_locks_live_and_die_through_a_cascade() {
    let mut rng = Rng::from_env("lock_lifecycle");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let keep_cfg = config(
        p,
        "keep.toml",
        &format!("lease_ms = {LEASE_MS}\nlease_policy = \"keep\"\n"),
    );
    let release_cfg = config(
        p,
        "release.toml",
        &format!("lease_ms = {LEASE_MS}\nlease_policy = \"release\"\nlease_grace_ms = 1500\n"),
    );
    let c_cfg = config(p, "c.toml", &format!("lease_ms = {LEASE_MS}\n"));
    let a_pool = init_pool(p, "a.img", "128M");
    let b_pool = init_pool(p, "b.img", "128M");
    let c_pool = init_pool(p, "c.img", "128M");
    let a = Daemon::try_start(&a_pool, &["--name", "a"]).unwrap();
    let b = Daemon::try_start(&b_pool, &["--name", "b", "--config", &keep_cfg]).unwrap();
    let c = Daemon::try_start(&c_pool, &["--name", "c", "--config", &c_cfg]).unwrap();
    a.ok(&["vol", "create", "v", "--size", "8M"]);
    write_random_blocks(&a, "v", 8, &mut rng);
    a.ok(&["snap", "create", "v", "s1"]);
    b.ok(&[
        "mirror",
        "create",
        "v",
        "--from",
        &format!("{}/v", a.listen),
    ]);
    c.ok(&[
        "mirror",
        "create",
        "v",
        "--from",
        &format!("{}/v", b.listen),
    ]);
    let s1 = snap_id(&a, "s1");

    // C's base lock on A, through B.
    let on_a = locks(&a);
    let c_on_a = from_origin(&on_a, "c");
    assert!(
        c_on_a
            .iter()
            .any(|l| l["snapshot"] == "s1" && hops(l) == ["c", "b"] && l["state"] == "active"),
        "A shows no lock of C's on s1 through B: {on_a:#?}"
    );

    // B moves on to s2; C stays at s1, so A's s1 is held by C alone.
    write_random_blocks(&a, "v", 8, &mut rng);
    a.ok(&["snap", "create", "v", "s2"]);
    assert_eq!(update(&b, "v")["kind"], "incremental");
    let o = a.cli(&["snap", "delete", "v", "s1"]);
    assert!(!o.status.success(), "delete of a locked snapshot succeeded");
    let e = stderr(&o);
    assert_eq!(e.trim().lines().count(), 1, "one-line refusal: {e}");
    for want in ["v@s1", "locked", "from c via c>b", "--force"] {
        assert!(e.contains(want), "refusal lacks {want:?}: {e}");
    }
    assert!(a.snap_names("v").contains(&"s1".to_string()));
    let plan = a.json(&["prune", "v", "--keep", "1", "--dry-run"]);
    assert!(
        plan["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["snapshot"] == "s1"),
        "prune preview keeps s1 for its holders: {plan}"
    );

    // --force deletes it, logs the holders, and the downstream is told.
    a.ok(&["snap", "delete", "v", "s1", "--force"]);
    assert!(!a.snap_names("v").contains(&"s1".to_string()));
    let log = a.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("forced delete of a locked snapshot") && l.contains("from c")),
        "A's log does not record the forced delete with its holders:\n{log}"
    );
    let r = update(&b, "v");
    assert_eq!(
        r["kept_locked"],
        serde_json::json!(["s1"]),
        "B keeps s1 (gone at the source, locked by C): {r}"
    );
    // C's lock on s1 still travels up past A (the nodes above A would keep
    // s1 for a re-attach of C past A): A lists it as passing through, with
    // no snapshot of its own that it holds.
    let on_s1: Vec<serde_json::Value> = locks(&a)
        .into_iter()
        .filter(|l| l["snapshot_id"] == s1.as_str())
        .collect();
    assert!(
        !on_s1.is_empty() && on_s1.iter().all(|l| l["snapshot"].is_null()),
        "A lists a lock on the deleted s1 as holding something here: {on_s1:#?}"
    );
    let r = update(&c, "v");
    assert_eq!(r["kind"], "incremental", "C's chain survived: {r}");
    assert_eq!(r["base"]["name"], "s1");

    // An application lock on C shows on B and A with owner and text.
    let text = "nightly report";
    let want_text = format!("app: {text}");
    let added = c.ok(&["lock", "add", "v", "s2", "--owner", "app", "--text", text]);
    assert!(added.contains("holder app"), "{added}");
    let app_lock = |d: &Daemon| -> Option<Value> {
        locks(d)
            .into_iter()
            .find(|l| l["kind"] == "owner" && l["text"] == want_text.as_str())
    };
    for (d, name, path) in [
        (&c, "C", vec!["c"]),
        (&b, "B", vec!["c"]),
        (&a, "A", vec!["c", "b"]),
    ] {
        let l = app_lock(d).unwrap_or_else(|| {
            panic!("{name} does not show C's application lock: {:#?}", locks(d))
        });
        assert_eq!(l["origin_node"], "c", "{name}: {l}");
        assert_eq!(l["snapshot"], "s2", "{name}: {l}");
        assert_eq!(hops(&l), path, "{name}: {l}");
    }
    let o = a.cli(&["snap", "delete", "v", "s2"]);
    assert!(
        !o.status.success() && stderr(&o).contains(&want_text),
        "A's refusal names the application: {}",
        stderr(&o)
    );
    c.ok(&["lock", "release", "v", "s2", "--holder", "app"]);
    for (d, name) in [(&c, "C"), (&b, "B"), (&a, "A")] {
        wait_until(&format!("the application lock to end on {name}"), || {
            app_lock(d).is_none()
        });
    }

    // A silent downstream: C killed; B marks its locks stale after C's
    // lease and keeps them (default policy); C coming back renews them.
    let c_locks_on =
        |d: &Daemon| -> Vec<Value> { from_origin(&locks(d), "c").into_iter().cloned().collect() };
    assert!(!c_locks_on(&b).is_empty());
    c.kill();
    wait_until("C's locks to turn stale on B", || {
        let ls = c_locks_on(&b);
        !ls.is_empty() && ls.iter().all(|l| l["state"] == "stale")
    });
    wait_until("B's log to report the stale downstream", || {
        b.log_text().contains("is stale")
    });
    let c = Daemon::try_start(&c_pool, &["--name", "c", "--config", &c_cfg]).unwrap();
    wait_until("C's locks to be renewed on B", || {
        let ls = c_locks_on(&b);
        !ls.is_empty() && ls.iter().all(|l| l["state"] == "active")
    });

    // mirror delete on C releases C's locks upstream, on return.
    c.ok(&["mirror", "delete", "v"]);
    assert!(c_locks_on(&b).is_empty(), "B: {:#?}", locks(&b));
    assert!(c_locks_on(&a).is_empty(), "A: {:#?}", locks(&a));

    // lease_policy = "release": B drops a silent C's locks after the grace
    // period, and A (told by B) no longer shows them either.
    b.term();
    let b = Daemon::try_start(&b_pool, &["--name", "b", "--config", &release_cfg]).unwrap();
    c.ok(&[
        "mirror",
        "create",
        "w",
        "--from",
        &format!("{}/v", b.listen),
    ]);
    assert!(
        !c_locks_on(&b).is_empty(),
        "C's new mirror locks nothing on B"
    );
    wait_until("C's locks to reach A", || !c_locks_on(&a).is_empty());
    c.kill();
    wait_until("C's locks to be released on B", || {
        c_locks_on(&b).is_empty()
    });
    wait_until("C's locks to disappear from A", || {
        c_locks_on(&a).is_empty()
    });
    wait_until("B's log to say why C's locks were released", || {
        b.log_text().contains("LeaseExpired")
    });
    // B's own locks on A are untouched.
    assert!(!from_origin(&locks(&a), "b").is_empty());
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A silent downstream two hops down: C's locks must not look alive on A
/// once C has gone silent. B (C's direct upstream) marks them stale; A sees
/// them only through B's sets, which must not present them as renewed by C.
#[test]
fn a_silent_downstreams_locks_do_not_look_alive_further_up() {
    let _rng = Rng::from_env("silent_two_hops");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    // B and C renew every second (a third of their lease).
    let cfg = config(p, "short.toml", &format!("lease_ms = {LEASE_MS}\n"));
    let start = |n: &str, extra: &[&str]| {
        let pool = init_pool(p, &format!("{n}.img"), "64M");
        let mut args = vec!["--name", n];
        args.extend_from_slice(extra);
        Daemon::try_start(&pool, &args).unwrap()
    };
    let a = start("a", &[]);
    let b = start("b", &["--config", &cfg]);
    let c = start("c", &["--config", &cfg]);
    a.ok(&["vol", "create", "v", "--size", "4M"]);
    a.ok(&["snap", "create", "v", "s1"]);
    b.ok(&[
        "mirror",
        "create",
        "v",
        "--from",
        &format!("{}/v", a.listen),
    ]);
    c.ok(&[
        "mirror",
        "create",
        "v",
        "--from",
        &format!("{}/v", b.listen),
    ]);
    let c_on =
        |d: &Daemon| -> Vec<Value> { from_origin(&locks(d), "c").into_iter().cloned().collect() };
    assert!(!c_on(&a).is_empty(), "C's locks reach A");
    let died = now_unix_ms();
    c.kill();
    wait_until("C's locks to turn stale on B", || {
        let ls = c_on(&b);
        !ls.is_empty() && ls.iter().all(|l| l["state"] == "stale")
    });
    // Let B renew its own set on A at least twice after that.
    let b_renewed = || -> u64 {
        locks(&a)
            .iter()
            .filter(|l| l["origin_node"] == "b" && l["text"] == "b:v")
            .filter_map(|l| l["renewed_unix_ms"].as_u64())
            .max()
            .unwrap_or(0)
    };
    let mark = now_unix_ms();
    wait_until("B to renew its set on A", || b_renewed() > mark + 1);
    let mark = b_renewed();
    wait_until("B to renew its set on A again", || b_renewed() > mark);
    let on_a = c_on(&a);
    assert!(
        !on_a.is_empty(),
        "C's locks are still held on A (keep policy)"
    );
    for l in &on_a {
        assert!(
            l["renewed_unix_ms"].as_u64().unwrap_or(0) <= died,
            "A shows C's lock renewed after C died: {l}"
        );
        assert_eq!(l["state"], "stale", "A shows a dead C's lock as: {l}");
    }
}

/// `lock list` gives each lock's created and renewed time: a lock that
/// holds a snapshot now was created and (at least) renewed at some real
/// moment, never at the epoch.
#[test]
fn every_listed_lock_has_real_created_and_renewed_times() {
    let _rng = Rng::from_env("lock_times");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let a = Daemon::try_start(&init_pool(p, "a.img", "64M"), &["--name", "a"]).unwrap();
    let b = Daemon::try_start(&init_pool(p, "b.img", "64M"), &["--name", "b"]).unwrap();
    a.ok(&["vol", "create", "v", "--size", "4M"]);
    a.ok(&["snap", "create", "v", "s1"]);
    b.ok(&[
        "mirror",
        "create",
        "v",
        "--from",
        &format!("{}/v", a.listen),
    ]);
    for (d, name) in [(&a, "A"), (&b, "B")] {
        let ls = locks(d);
        assert!(!ls.is_empty(), "{name} lists no lock");
        for l in &ls {
            for k in ["created_unix_ms", "renewed_unix_ms"] {
                assert!(
                    l[k].as_u64().unwrap_or(0) > 0,
                    "{name}: lock without a real {k}: {l}"
                );
            }
        }
    }
}

/// `lock add` says whether the lock reached the upstream before it
/// returned: with the upstream up, `delivered`; with it down, the lock is
/// held here, the reply names the upstream that does not know of it yet,
/// and the CLI warns that the snapshot is not protected there.
#[test]
fn lock_add_says_when_the_upstream_did_not_get_the_lock() {
    let _rng = Rng::from_env("lock_add_undelivered");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let a = Daemon::named(p, "a", &[]);
    let b = Daemon::named(p, "b", &[]);
    a.ok(&["vol", "create", "v", "--size", "4M"]);
    a.ok(&["snap", "create", "v", "s1"]);
    a.ok(&["snap", "create", "v", "s2"]);
    b.ok(&[
        "mirror",
        "create",
        "v",
        "--from",
        &format!("{}/v", a.listen),
    ]);
    let r = b.json(&["lock", "add", "v", "s2", "--owner", "app1"]);
    assert_eq!(r["delivered"], true, "{r}");
    assert_eq!(r["undelivered_upstreams"], serde_json::json!([]), "{r}");
    assert_eq!(r["holder"], "app1", "the lock's own fields stay: {r}");
    assert!(
        locks(&a).iter().any(|l| l["text"] == "app1"),
        "A holds app1's lock when lock add returned"
    );
    a.kill();
    let r = b.json(&["lock", "add", "v", "s2", "--owner", "app2"]);
    assert_eq!(r["delivered"], false, "{r}");
    assert_eq!(r["undelivered_upstreams"], serde_json::json!(["a"]), "{r}");
    let o = b.cli(&["lock", "add", "v", "s2", "--owner", "app3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("upstream a could not be reached")
            && stderr(&o).contains("not protected"),
        "the CLI warns: {}",
        stderr(&o)
    );
    assert!(
        locks(&b).iter().any(|l| l["text"] == "app2"),
        "the lock is held here all the same"
    );
}

/// What the operator was told is done survives a SIGKILL right after the
/// answer (the 1-hour soak lost a confirmed `lock add` to a power cut, and
/// the snapshot with it): a lock added, a lock released, a mirror broken.
#[test]
fn confirmed_lock_and_break_changes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let a = Daemon::named(p, "a", &[]);
    a.ok(&["vol", "create", "v", "--size", "4M"]);
    a.ok(&["snap", "create", "v", "s1"]);
    a.ok(&["snap", "create", "v", "s2"]);
    let b = Daemon::named(p, "b", &[]);
    b.ok(&["mirror", "create", "v", "--from", &a.source("v")]);
    let app_locks = |d: &Daemon| -> Vec<String> {
        locks(d)
            .iter()
            .filter(|l| l["origin_node"] == "b" && l["holder"] == "app")
            .map(|l| l["snapshot"].as_str().unwrap_or("?").to_string())
            .collect()
    };
    let restart = |d: Daemon| -> Daemon {
        let pool = d.data.clone();
        d.kill();
        Daemon::try_start(&pool, &["--name", "b"]).unwrap_or_else(|e| panic!("{e}"))
    };

    b.ok(&["lock", "add", "v", "s2", "--owner", "app"]);
    let b = restart(b);
    assert_eq!(app_locks(&b), vec!["s2"], "a confirmed lock add was lost");

    b.ok(&["lock", "release", "v", "s2", "--holder", "app"]);
    let b = restart(b);
    assert!(
        app_locks(&b).is_empty(),
        "a confirmed lock release came back: {:?}",
        app_locks(&b)
    );

    b.ok(&["mirror", "break", "v"]);
    let b = restart(b);
    assert_eq!(
        b.mirror("v")["state"],
        "broken",
        "a confirmed break was lost"
    );
}
