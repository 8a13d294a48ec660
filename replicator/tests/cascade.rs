//! Cascades over real TCP between real engines: chains, fan-out, qtree
//! mirrors, soft locks end to end, restarts.

mod common;

use common::*;
use sluice_engine::api::NsName;
use sluice_replicator::{MirrorSpec, ReplError};

const QBYTES: u64 = 2 << 20;

fn same(a: &Node, av: &str, b: &Node, bv: &str, snap: &str, qtree: Option<&str>) {
    let blocks = match qtree {
        Some(_) => QBYTES / 4096,
        None => VOL_BLOCKS,
    };
    let an = match qtree {
        Some(q) => NsName::qtree(av, q),
        None => NsName::volume(av),
    };
    let bn = match qtree {
        Some(q) => NsName::qtree(bv, q),
        None => NsName::volume(bv),
    };
    let x = a.read_all(&an, Some(snap), blocks);
    let y = b.read_all(&bn, Some(snap), blocks);
    assert!(
        x == y,
        "{}:{an}@{snap} differs from {}:{bn}@{snap}",
        a.name,
        b.name
    );
}

/// Chain A -> B -> C -> D, A prunes to 1 snapshot every round, C and D
/// lag: every update after the baselines is incremental and content is
/// identical on every hop.
#[test]
fn chain_stays_incremental_with_keep_one_pruning() {
    let seed = seed("chain_stays_incremental_with_keep_one_pruning");
    let mut r = rng(seed);
    let (a, b, c) = (Node::start("A"), Node::start("B"), Node::start("C"));
    let d = Node::start("D");
    a.create_volume("v");
    a.create_qtree("v", "q", QBYTES);
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 300, &mut r);
    a.churn(&NsName::qtree("v", "q"), QBYTES / 4096, 50, &mut r);
    a.snap("v", "s1");
    let rep = b
        .repl
        .mirror_create(spec("v", &a, "v"))
        .expect("B baseline");
    assert_eq!(rep.kind, "full");
    let rep = c
        .repl
        .mirror_create(spec("v", &b, "v"))
        .expect("C baseline");
    assert_eq!(rep.kind, "full");
    same(&a, "v", &c, "v", "s1", None);
    same(&a, "v", &c, "v", "s1", Some("q"));
    assert_eq!(
        d.repl.mirror_create(spec("dv", &c, "v")).unwrap().kind,
        "full"
    );
    let mut c_skipped_by_locks = false;
    for round in 2..=7 {
        a.churn(&NsName::volume("v"), VOL_BLOCKS, 60, &mut r);
        a.churn(&NsName::qtree("v", "q"), QBYTES / 4096, 10, &mut r);
        let s = format!("s{round}");
        a.snap("v", &s);
        let plan = a.repl.prune("v", 1, false).expect("prune A");
        c_skipped_by_locks |= plan
            .skipped
            .iter()
            .any(|k| k.holders.iter().any(|h| h.origin_node == "C"));
        let rep = b.repl.mirror_update("v", &noprog).expect("B update");
        assert_eq!(rep.kind, "incremental", "round {round}: {rep:?}");
        same(&a, "v", &b, "v", &s, None);
        b.repl.prune("v", 1, false).expect("prune B");
        if round % 3 == 0 {
            let calls = std::sync::atomic::AtomicU64::new(0);
            let rep = c
                .repl
                .mirror_update("v", &|p| {
                    assert!(p.done_items <= p.total_items);
                    calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                })
                .expect("C update");
            assert!(calls.into_inner() > 0, "no progress reported");
            assert_eq!(rep.kind, "incremental", "round {round}: {rep:?}");
            same(&a, "v", &c, "v", &s, None);
            same(&a, "v", &c, "v", &s, Some("q"));
            c.repl.prune("v", 1, false).expect("prune C");
        }
        if round == 6 {
            let rep = d.repl.mirror_update("dv", &noprog).expect("D update");
            assert_eq!(rep.kind, "incremental", "round {round}: {rep:?}");
            same(&a, "v", &d, "dv", &s, Some("q"));
        }
    }
    assert!(c_skipped_by_locks, "A's prune never had to keep C's base");
    let rep = c.repl.mirror_update("v", &noprog).expect("C final update");
    assert_eq!(rep.kind, "incremental");
    same(&a, "v", &c, "v", "s7", None);
    same(&a, "v", &c, "v", "s7", Some("q"));
    let digest = |n: &Node| {
        n.snaps("v")
            .into_iter()
            .find(|s| s.name == "s7")
            .unwrap()
            .digests
    };
    assert_eq!(digest(&a), digest(&c));
    for n in [&b, &c] {
        let st = n.repl.mirror_status();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].full_transfers, 1, "{}: {:?}", n.name, st[0]);
        assert!(st[0].incremental_transfers >= 2);
        assert_eq!(st[0].newest_common_snapshot.as_ref().unwrap().name, "s7");
    }
    let m = b.repl.metrics();
    let inc = sluice_replicator::scrape::value(
        &m,
        "sluice_repl_transfers_total",
        &[("dst", "v"), ("kind", "incremental")],
    );
    assert!(inc >= Some(2), "{m:?}");
    for n in [a, b, c, d] {
        n.shutdown();
    }
}

/// An application lock on C protects the snapshot on B and A, named
/// everywhere; releasing it frees it.
#[test]
fn app_lock_on_c_protects_upstream() {
    let (a, b, c) = (Node::start("A"), Node::start("B"), Node::start("C"));
    let mut r = rng(seed("app_lock_on_c_protects_upstream"));
    a.create_volume("v");
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 50, &mut r);
    a.snap("v", "s1");
    b.repl.mirror_create(spec("v", &a, "v")).unwrap();
    c.repl.mirror_create(spec("v", &b, "v")).unwrap();
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 20, &mut r);
    a.snap("v", "s2");
    b.repl.mirror_update("v", &noprog).unwrap();
    c.repl.mirror_update("v", &noprog).unwrap();
    let v = c
        .repl
        .lock_add("v", "s1", "backup", Some("nightly copy"))
        .unwrap();
    assert!(v.delivered, "B was up: {v:?}");
    let v = v.lock;
    assert_eq!(v.origin_node, "C");
    assert_eq!(v.kind, "owner");
    let on_a = |a: &Node| {
        a.repl
            .lock_list()
            .into_iter()
            .find(|l| l.kind == "owner" && l.snapshot.as_deref() == Some("s1"))
    };
    wait_for("the app lock reaches A", || on_a(&a).is_some());
    let l = on_a(&a).unwrap();
    assert_eq!(l.text, "backup: nightly copy");
    assert_eq!(l.origin_node, "C");
    assert_eq!(l.hop_path, vec!["C".to_string(), "B".to_string()]);
    assert_eq!(l.state, "active");
    assert_eq!(
        l.locking_dataset_id, "C/v",
        "the resource on C that needs it"
    );
    match a.repl.snap_delete("v", "s1", false) {
        Err(ReplError::Locked { holders, .. }) => assert!(holders.contains("backup"), "{holders}"),
        other => panic!("delete of a locked snapshot: {other:?}"),
    }
    let plan = a.repl.prune("v", 1, true).unwrap();
    assert!(
        plan.deleted.is_empty() && plan.skipped.len() == 1,
        "{plan:?}"
    );
    // B's own snapshots are protected too.
    assert!(b.repl.snap_delete("v", "s1", false).is_err());
    c.repl.lock_release("v", "s1", "backup").unwrap();
    wait_for("the release reaches A", || on_a(&a).is_none());
    a.repl.snap_delete("v", "s1", false).expect("unlocked now");
    for n in [a, b, c] {
        n.shutdown();
    }
}

/// Fan-out A -> B and A -> D with different bases: both survive A's
/// pruning; deleting D's mirror releases its locks on A.
#[test]
fn fan_out_two_downstreams_lock_different_snapshots() {
    let (a, b, d) = (Node::start("A"), Node::start("B"), Node::start("D"));
    let mut r = rng(seed("fan_out_two_downstreams_lock_different_snapshots"));
    a.create_volume("v");
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 50, &mut r);
    a.snap("v", "s1");
    b.repl.mirror_create(spec("v", &a, "v")).unwrap();
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 20, &mut r);
    a.snap("v", "s2");
    d.repl.mirror_create(spec("dv", &a, "v")).unwrap();
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 20, &mut r);
    a.snap("v", "s3");
    let plan = a.repl.prune("v", 1, false).unwrap();
    assert!(plan.deleted.is_empty(), "{plan:?}");
    assert_eq!(plan.skipped.len(), 2);
    assert_eq!(a.snap_names("v"), vec!["s1", "s2", "s3"]);
    assert_eq!(
        b.repl.mirror_update("v", &noprog).unwrap().kind,
        "incremental"
    );
    assert_eq!(
        d.repl.mirror_update("dv", &noprog).unwrap().kind,
        "incremental"
    );
    same(&a, "v", &b, "v", "s3", None);
    same(&a, "v", &d, "dv", "s3", None);
    // Both now depend on s3 only: s1 and s2 go.
    let plan = a.repl.prune("v", 1, false).unwrap();
    assert_eq!(plan.deleted, vec!["s1", "s2"], "{plan:?}");
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 20, &mut r);
    a.snap("v", "s4");
    b.repl.mirror_update("v", &noprog).unwrap();
    // D still holds s3; deleting D's mirror releases it on A.
    assert!(a.repl.snap_delete("v", "s3", false).is_err());
    d.repl.mirror_delete("dv").unwrap();
    assert!(d.repl.mirror_status().is_empty());
    let plan = a.repl.prune("v", 1, false).unwrap();
    assert_eq!(plan.deleted, vec!["s3"], "{plan:?}");
    for n in [a, b, d] {
        n.shutdown();
    }
}

/// Qtree mirror A:v/q -> B:bq/q, then B's qtree mirrored on to C: a qtree
/// mirror is cascadable and stays incremental.
#[test]
fn qtree_mirror_in_a_cascade() {
    let (a, b, c) = (Node::start("A"), Node::start("B"), Node::start("C"));
    let mut r = rng(seed("qtree_mirror_in_a_cascade"));
    a.create_volume("v");
    a.create_qtree("v", "q", QBYTES);
    let q = NsName::qtree("v", "q");
    a.churn(&q, QBYTES / 4096, 80, &mut r);
    a.snap("v", "s1");
    let qspec = |dst: &str, src: &Node, vol: &str| MirrorSpec {
        source_qtree: Some("q".into()),
        ..spec(dst, src, vol)
    };
    assert_eq!(
        b.repl.mirror_create(qspec("bq", &a, "v")).unwrap().kind,
        "full"
    );
    assert_eq!(
        c.repl.mirror_create(qspec("cq", &b, "bq")).unwrap().kind,
        "full"
    );
    for round in 2..=3 {
        a.churn(&q, QBYTES / 4096, 20, &mut r);
        let s = format!("s{round}");
        a.snap("v", &s);
        a.repl.prune("v", 1, false).unwrap();
        assert_eq!(
            b.repl.mirror_update("bq/q", &noprog).unwrap().kind,
            "incremental"
        );
        assert_eq!(
            c.repl.mirror_update("cq/q", &noprog).unwrap().kind,
            "incremental"
        );
        let x = a.read_all(&q, Some(&s), QBYTES / 4096);
        let y = c.read_all(&NsName::qtree("cq", "q"), Some(&s), QBYTES / 4096);
        assert!(x == y, "round {round}: qtree content differs");
    }
    let st = c.repl.mirror_status();
    assert_eq!(st[0].kind, sluice_replicator::MirrorKind::Qtree);
    for n in [a, b, c] {
        n.shutdown();
    }
}

/// Restarting replicators keeps relationships, the lock table and the
/// ability to update incrementally.
#[test]
fn restart_keeps_relationships_and_locks() {
    let (mut a, mut b) = (Node::start("A"), Node::start("B"));
    let mut r = rng(seed("restart_keeps_relationships_and_locks"));
    a.create_volume("v");
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 50, &mut r);
    a.snap("v", "s1");
    b.repl.mirror_create(spec("v", &a, "v")).unwrap();
    b.repl.lock_add("v", "s1", "app", None).unwrap();
    b.restart();
    a.restart();
    let st = b.repl.mirror_status();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].full_transfers, 1);
    assert!(b
        .repl
        .lock_list()
        .iter()
        .any(|l| l.kind == "owner" && l.text == "app"));
    assert!(
        a.repl.lock_list().iter().any(|l| l.origin_node == "B"),
        "A lost B's locks over a restart"
    );
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 20, &mut r);
    a.snap("v", "s2");
    a.repl.prune("v", 1, false).unwrap();
    assert_eq!(
        b.repl.mirror_update("v", &noprog).unwrap().kind,
        "incremental"
    );
    same(&a, "v", &b, "v", "s2", None);
    // s1 stays on A and B: B's application lock.
    assert!(a.snap_names("v").contains(&"s1".to_string()));
    assert!(b.snap_names("v").contains(&"s1".to_string()));
    for n in [a, b] {
        n.shutdown();
    }
}

/// A relationship table as older builds wrote it (one JSON list under
/// `repl.v1.relationships`) is read at start and written back as one
/// record per relationship plus the index; the old key goes.
#[test]
fn an_older_relationship_table_is_read_and_written_back_per_relationship() {
    use sluice_engine::api::{Reply, Request};
    use sluice_replicator::types::keys;
    let (a, mut b) = (Node::start("A"), Node::start("B"));
    a.create_volume("v");
    a.snap("v", "s1");
    b.repl.mirror_create(spec("v", &a, "v")).unwrap();
    let get = |n: &Node, key: &str| match n.engine.call(Request::GetAttr { key: key.into() }) {
        Ok(Reply::Attr(v)) => v,
        other => panic!("get {key}: {other:?}"),
    };
    let rec_key = format!("{}v", keys::RELATIONSHIP_PREFIX);
    let record = get(&b, &rec_key).expect("the relationship's record");
    assert!(get(&b, keys::RELATIONSHIP_INDEX).is_some());
    assert!(get(&b, keys::RELATIONSHIPS).is_none());
    // Back to the older form, after the replicator's shutdown (which
    // writes its tables).
    let mut old = b"[".to_vec();
    old.extend_from_slice(&record);
    old.push(b']');
    let edit = |e: &sluice_engine::shard::EngineHandle, kv: Vec<(String, Option<Vec<u8>>)>| {
        for (key, value) in kv {
            e.call(Request::SetAttr { key, value }).unwrap();
        }
    };
    let cfg = b.cfg.clone();
    b.restart_editing(cfg, |e| {
        edit(
            e,
            vec![
                (keys::RELATIONSHIPS.to_string(), Some(old)),
                (keys::RELATIONSHIP_INDEX.to_string(), None),
                (rec_key.clone(), None),
            ],
        )
    });
    let st = b.repl.mirror_status();
    assert_eq!(st.len(), 1, "the relationship survives the upgrade");
    assert_eq!(get(&b, &rec_key).as_deref(), Some(&record[..]));
    assert!(get(&b, keys::RELATIONSHIP_INDEX).is_some());
    assert!(
        get(&b, keys::RELATIONSHIPS).is_none(),
        "the old table is gone"
    );
    a.snap("v", "s2");
    assert_eq!(
        b.repl.mirror_update("v", &noprog).unwrap().kind,
        "incremental"
    );
    // And once more in the new form.
    b.restart();
    assert_eq!(b.repl.mirror_status().len(), 1);
    // A removal that a crash cut between its record and the index: the
    // node starts, without the relationship, and writes the index again.
    let cfg = b.cfg.clone();
    b.restart_editing(cfg, |e| edit(e, vec![(rec_key.clone(), None)]));
    assert!(b.repl.mirror_status().is_empty());
    assert_eq!(
        get(&b, keys::RELATIONSHIP_INDEX).as_deref(),
        Some(&b"[]"[..])
    );
    for n in [a, b] {
        n.shutdown();
    }
}

/// A volume with more snapshots than one frame's list holds (the old
/// single-frame list stopped at 4,096) is mirrored and updated: the
/// source's list comes in pages.
#[test]
fn a_volume_of_more_snapshots_than_a_frame_holds_mirrors_and_updates() {
    let (a, b) = (Node::start("A"), Node::start("B"));
    let mut r = rng(seed("a_volume_of_more_snapshots_than_a_frame_holds"));
    a.create_volume("v");
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 20, &mut r);
    let n = 2 * sluice_lockproto::wire::SNAPSHOT_PAGE_MAX as usize + 905;
    for i in 0..n {
        a.snap("v", &format!("s{i}"));
    }
    b.repl.mirror_create(spec("v", &a, "v")).unwrap();
    let last = format!("s{}", n - 1);
    same(&a, "v", &b, "v", &last, None);
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 20, &mut r);
    a.snap("v", "after");
    assert_eq!(
        b.repl.mirror_update("v", &noprog).unwrap().kind,
        "incremental"
    );
    same(&a, "v", &b, "v", "after", None);
    let st = b.repl.mirror_status();
    assert_eq!(st[0].full_transfers, 1);
    for n in [a, b] {
        n.shutdown();
    }
}

/// `--every`: the scheduler pulls new snapshots by itself.
#[test]
fn scheduled_updates_pull_new_snapshots() {
    let (a, b) = (Node::start("A"), Node::start("B"));
    a.create_volume("v");
    a.snap("v", "s1");
    let s = MirrorSpec {
        every: Some(std::time::Duration::from_millis(200)),
        ..spec("v", &a, "v")
    };
    b.repl.mirror_create(s).unwrap();
    a.snap("v", "s2");
    wait_for("B pulls s2 by schedule", || {
        b.snap_names("v").contains(&"s2".to_string())
    });
    for n in [a, b] {
        n.shutdown();
    }
}

/// More due relationships than transfer workers: a worker that finishes
/// takes the next due one itself, so one tick's hand-out runs them all
/// (a tick used to hand out one job per worker: with one worker and a
/// 5 s tick, six relationships took a minute to be updated twice).
#[test]
fn one_worker_runs_every_due_relationship_without_waiting_for_ticks() {
    let a = Node::start("A");
    let mut cfg = config("B", None);
    cfg.max_transfers = 1;
    cfg.tick = std::time::Duration::from_secs(5);
    let b = Node::with_config(cfg);
    let vols: Vec<String> = (0..6).map(|i| format!("v{i}")).collect();
    for v in &vols {
        a.create_volume(v);
        a.snap(v, "s1");
        b.repl
            .mirror_create(MirrorSpec {
                every: Some(std::time::Duration::from_secs(1)),
                ..spec(v, &a, v)
            })
            .unwrap();
    }
    let created: Vec<u64> = b
        .repl
        .mirror_status()
        .iter()
        .map(|m| m.last_update_unix_ms.expect("the baseline's time"))
        .collect();
    let mut seen = vec![Vec::new(); vols.len()];
    wait_for("every relationship updated twice by its schedule", || {
        for (i, m) in b.repl.mirror_status().iter().enumerate() {
            let at = m.last_update_unix_ms.unwrap_or(0);
            if at > created[i] && seen[i].last() != Some(&at) {
                seen[i].push(at);
            }
        }
        seen.iter().all(|s| s.len() >= 2)
    });
    for n in [a, b] {
        n.shutdown();
    }
}

/// Random operations on a cascade A -> B -> C plus fan-out A -> D, with
/// pruning on every node and application locks on C: with soft locks no
/// update ever needs a full copy, and every update's target reads back
/// identical to its source.
#[test]
fn random_cascade_never_breaks() {
    random_cascade(seed("random_cascade_never_breaks"));
}

/// Seeds that found bugs. These three (2026-12-03): C application-locked
/// a snapshot B had already pruned (nothing held it there then), and C
/// sent that lock only to an upstream that had the snapshot, so it never
/// reached A, whose prune then deleted it: the snapshot C would re-attach
/// to A from. A lock now travels up a volume's only upstream whatever that
/// upstream still has.
#[test]
fn random_cascade_regressions() {
    for s in [
        15165183976738276603,
        18140478188300143748,
        4540316140015804465,
    ] {
        random_cascade(s);
    }
}

fn random_cascade(seed: u64) {
    use rand::Rng;
    let mut r = rng(seed);
    let (a, b, c, d) = (
        Node::start("A"),
        Node::start("B"),
        Node::start("C"),
        Node::start("D"),
    );
    a.create_volume("v");
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 100, &mut r);
    a.snap("v", "s0");
    b.repl.mirror_create(spec("v", &a, "v")).unwrap();
    c.repl.mirror_create(spec("v", &b, "v")).unwrap();
    d.repl.mirror_create(spec("v", &a, "v")).unwrap();
    let mut n = 1;
    // Each application lock on C, with the upstreams that had the snapshot
    // when it was taken (a lock cannot bring back what is gone already).
    let mut app_locks: Vec<(String, Vec<bool>)> = Vec::new();
    for step in 0..60 {
        let op: usize = r.gen_range(0..8);
        let ctx = format!("seed {seed} step {step} op {op}");
        match op {
            0 | 1 => {
                a.churn(&NsName::volume("v"), VOL_BLOCKS, r.gen_range(1..30), &mut r);
                a.snap("v", &format!("s{n}"));
                n += 1;
            }
            2 => {
                let node = [&a, &b, &c, &d][r.gen_range(0..4)];
                node.repl.prune("v", r.gen_range(1..3), false).expect(&ctx);
            }
            3..=5 => {
                let (dst, src) = [(&b, &a), (&c, &b), (&d, &a)][op - 3];
                let rep = dst.repl.mirror_update("v", &noprog).expect(&ctx);
                assert_ne!(rep.kind, "full", "{ctx}: {rep:?}");
                if let Some(t) = &rep.target {
                    let x = src.read_all(&NsName::volume("v"), Some(&t.name), VOL_BLOCKS);
                    let y = dst.read_all(&NsName::volume("v"), Some(&t.name), VOL_BLOCKS);
                    assert!(x == y, "{ctx}: {}@{} differs", dst.name, t.name);
                }
            }
            6 => {
                let names = c.snap_names("v");
                let s = names[r.gen_range(0..names.len())].clone();
                if !app_locks.iter().any(|(x, _)| *x == s) {
                    let had = [&a, &b].map(|u| u.snap_names("v").contains(&s)).to_vec();
                    c.repl.lock_add("v", &s, "app", Some(&s)).expect(&ctx);
                    app_locks.push((s, had));
                }
            }
            _ => {
                if !app_locks.is_empty() {
                    let (s, _) = app_locks.remove(r.gen_range(0..app_locks.len()));
                    c.repl.lock_release("v", &s, "app").expect(&ctx);
                }
            }
        }
        // Every application lock on C holds on A and B too.
        for (s, had) in &app_locks {
            for (up, had) in [&a, &b].into_iter().zip(had) {
                assert!(
                    !had || up.snap_names("v").contains(s),
                    "{ctx}: {}@{s} was deleted despite C's application lock",
                    up.name
                );
            }
        }
    }
    for n in [a, b, c, d] {
        n.shutdown();
    }
}

/// `mirror delete` at the end of a chain releases that node's locks on
/// every node upstream, not only on its direct source.
#[test]
fn mirror_delete_releases_through_the_chain() {
    let (a, b, c) = (Node::start("A"), Node::start("B"), Node::start("C"));
    a.create_volume("v");
    a.snap("v", "s1");
    b.repl.mirror_create(spec("v", &a, "v")).unwrap();
    c.repl.mirror_create(spec("v", &b, "v")).unwrap();
    c.repl.lock_add("v", "s1", "app", None).unwrap();
    let from_c = |n: &Node| n.repl.lock_list().iter().any(|l| l.origin_node == "C");
    wait_for("C's locks reach A", || from_c(&a) && from_c(&b));
    c.repl.mirror_delete("v").unwrap();
    wait_for("C's locks leave B and A", || !from_c(&a) && !from_c(&b));
    // B's own base still holds on A.
    assert!(a.repl.lock_list().iter().any(|l| l.origin_node == "B"));
    for n in [a, b, c] {
        n.shutdown();
    }
}

/// The promise behind re-attach, in its plainest shape: A -> B -> C. B's
/// newest base with C moves on and B prunes s1 (nothing holds it there).
/// An application on C then locks s1, which C still has: the lock reaches
/// A through B (which no longer has s1), so A's prune keeps it. B is lost
/// for good and an operator force-deletes s2 and s3 on A: C re-attaches to
/// A from s1, incrementally.
#[test]
fn a_lock_on_a_snapshot_the_middle_pruned_still_holds_above_and_reattach_uses_it() {
    let (a, b, c) = (Node::start("A"), Node::start("B"), Node::start("C"));
    let v = NsName::volume("v");
    let mut r = rng(7);
    a.create_volume("v");
    a.churn(&v, VOL_BLOCKS, 20, &mut r);
    a.snap("v", "s1");
    b.repl.mirror_create(spec("v", &a, "v")).unwrap();
    c.repl.mirror_create(spec("v", &b, "v")).unwrap();
    a.churn(&v, VOL_BLOCKS, 20, &mut r);
    a.snap("v", "s2");
    b.repl.mirror_update("v", &noprog).unwrap();
    c.repl.mirror_update("v", &noprog).unwrap();
    // C's base with B is s2 now: B may prune s1 (and does).
    b.repl.prune("v", 1, false).unwrap();
    assert_eq!(b.snap_names("v"), ["s2"]);
    assert!(c.snap_names("v").contains(&"s1".to_string()));
    // The application on C locks s1; A still has it.
    c.repl.lock_add("v", "s1", "app", None).unwrap();
    a.churn(&v, VOL_BLOCKS, 20, &mut r);
    a.snap("v", "s3");
    b.repl.mirror_update("v", &noprog).unwrap();
    c.repl.mirror_update("v", &noprog).unwrap();
    // A prunes to one: s1 is held by C's lock (relayed by B), s3 by B's
    // and C's bases.
    a.repl.prune("v", 1, false).unwrap();
    let on_a = a.snap_names("v");
    assert!(on_a.contains(&"s1".to_string()), "A deleted s1: {on_a:?}");
    let held = a.repl.lock_list();
    assert!(
        held.iter()
            .any(|l| l.snapshot.as_deref() == Some("s1") && l.origin_node == "C"),
        "A names C's lock on s1: {held:?}"
    );
    // B is lost; on A the operator force-deletes what B and C's base held
    // (s2, s3): only C's application lock keeps a snapshot C shares with A.
    b.shutdown();
    a.churn(&v, VOL_BLOCKS, 20, &mut r);
    a.snap("v", "s4");
    for s in ["s2", "s3"] {
        let _ = a.repl.snap_delete("v", s, true);
    }
    assert!(!a.snap_names("v").contains(&"s3".to_string()));
    let rep = c
        .repl
        .mirror_retarget("v", &a.addr, "v", None, false, &noprog)
        .unwrap();
    assert_eq!(
        rep.base.as_ref().map(|b| b.name.as_str()),
        Some("s1"),
        "{rep:?}"
    );
    let t = rep.transfer.as_ref().expect("the retarget's update");
    assert_eq!(t.kind, "incremental", "{rep:?}");
    same(&a, "v", &c, "v", "s4", None);
    for n in [a, c] {
        n.shutdown();
    }
}

/// `--follow` on every hop, no schedule: a snapshot taken on A reaches the
/// end of A -> B -> C -> D with nobody asking, and a qtree mirror and a
/// second volume mirror that follow the same source (one watch on A for
/// the three) get theirs too. Every hop reads back what A holds.
#[test]
fn followed_hops_pass_new_snapshots_down_a_cascade_by_themselves() {
    let (a, b, c, d) = (
        Node::start("A"),
        Node::start("B"),
        Node::start("C"),
        Node::start("D"),
    );
    let mut r = rng(seed("followed_hops_pass_new_snapshots_down_a_cascade"));
    a.create_volume("v");
    a.create_volume("w");
    a.create_volume("x");
    a.create_qtree("x", "q", QBYTES);
    let (v, w, q) = (
        NsName::volume("v"),
        NsName::volume("w"),
        NsName::qtree("x", "q"),
    );
    a.churn(&v, VOL_BLOCKS, 100, &mut r);
    for vol in ["v", "w", "x"] {
        a.snap(vol, "s1");
    }
    let follow = |dst: &str, src: &Node, vol: &str| MirrorSpec {
        follow: true,
        ..spec(dst, src, vol)
    };
    b.repl.mirror_create(follow("v", &a, "v")).unwrap();
    b.repl.mirror_create(follow("w", &a, "w")).unwrap();
    b.repl
        .mirror_create(MirrorSpec {
            source_qtree: Some("q".into()),
            ..follow("bx", &a, "x")
        })
        .unwrap();
    c.repl.mirror_create(follow("v", &b, "v")).unwrap();
    d.repl.mirror_create(follow("v", &c, "v")).unwrap();
    assert!(b.repl.mirror_status().iter().all(|s| s.follow));
    for round in 2..=4 {
        let s = format!("s{round}");
        a.churn(&v, VOL_BLOCKS, 40, &mut r);
        a.churn(&w, VOL_BLOCKS, 10, &mut r);
        a.churn(&q, QBYTES / 4096, 10, &mut r);
        for vol in ["v", "w", "x"] {
            a.snap(vol, &s);
        }
        wait_for(&format!("{s} reaches D"), || d.snap_names("v").contains(&s));
        wait_for(&format!("{s} of w reaches B"), || {
            b.snap_names("w").contains(&s)
        });
        wait_for(&format!("{s} of x/q reaches B"), || {
            b.snap_names("bx").contains(&s)
        });
        let want = a.read_all(&v, Some(&s), VOL_BLOCKS);
        for (n, node) in [("B", &b), ("C", &c), ("D", &d)] {
            assert!(
                node.read_all(&v, Some(&s), VOL_BLOCKS) == want,
                "round {round}: {n}'s copy of v@{s} differs from A's"
            );
        }
        assert!(b.read_all(&w, Some(&s), VOL_BLOCKS) == a.read_all(&w, Some(&s), VOL_BLOCKS));
        assert!(
            b.read_all(&NsName::qtree("bx", "q"), Some(&s), QBYTES / 4096)
                == a.read_all(&q, Some(&s), QBYTES / 4096)
        );
    }
    // Every follow update after the baseline was incremental (the last
    // one's counters land just after its snapshot).
    for n in [&b, &c, &d] {
        wait_for(&format!("{}'s counters", n.name), || {
            n.repl
                .mirror_status()
                .iter()
                .all(|st| st.incremental_transfers >= 3)
        });
        for st in n.repl.mirror_status() {
            assert_eq!(st.full_transfers, 1, "{}: {st:?}", n.name);
        }
    }
    for n in [a, b, c, d] {
        n.shutdown();
    }
}

/// A follower starts with one update of what it follows: a snapshot taken
/// while the destination was down arrives after its restart, with no new
/// snapshot to wake a watch.
#[test]
fn a_follower_catches_up_after_a_restart() {
    let (a, mut b) = (Node::start("A"), Node::start("B"));
    let mut r = rng(seed("a_follower_catches_up_after_a_restart"));
    a.create_volume("v");
    a.churn(&NsName::volume("v"), VOL_BLOCKS, 50, &mut r);
    a.snap("v", "s1");
    b.repl
        .mirror_create(MirrorSpec {
            follow: true,
            ..spec("v", &a, "v")
        })
        .unwrap();
    let cfg = b.cfg.clone();
    b.restart_editing(cfg, |_| {
        a.churn(&NsName::volume("v"), VOL_BLOCKS, 20, &mut r);
        a.snap("v", "s2");
    });
    wait_for("B catches up with s2 after its restart", || {
        b.snap_names("v").contains(&"s2".to_string())
    });
    // Following goes on after the catch-up.
    a.snap("v", "s3");
    wait_for("B follows s3", || {
        b.snap_names("v").contains(&"s3".to_string())
    });
    for n in [a, b] {
        n.shutdown();
    }
}

/// A node follows at most `max_follow_sources` source addresses: a
/// `--follow` mirror from one more is refused, naming the bound and what
/// to do, and nothing of it is left; from a source already followed, or
/// without `--follow`, it is taken.
#[test]
fn a_follow_past_the_followed_sources_bound_is_refused() {
    let (a, c) = (Node::start("A"), Node::start("C"));
    let mut cfg = config("B", None);
    cfg.max_follow_sources = 1;
    let b = Node::with_config(cfg);
    for n in [&a, &c] {
        n.create_volume("v");
        n.create_volume("w");
        n.snap("v", "s1");
        n.snap("w", "s1");
    }
    let follow = |dst: &str, src: &Node, vol: &str| MirrorSpec {
        follow: true,
        ..spec(dst, src, vol)
    };
    b.repl.mirror_create(follow("av", &a, "v")).unwrap();
    let e = b.repl.mirror_create(follow("cv", &c, "v")).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("at most 1") && text.contains("--every") && text.contains(&c.addr),
        "{text}"
    );
    assert_eq!(
        b.repl.mirror_status().len(),
        1,
        "nothing of the refused mirror is left"
    );
    b.repl.mirror_create(follow("aw", &a, "w")).unwrap();
    b.repl.mirror_create(spec("cw", &c, "w")).unwrap();
    assert_eq!(b.repl.mirror_status().len(), 3);
    for n in [a, b, c] {
        n.shutdown();
    }
}

/// Deleting a followed relationship ends its follower; the source keeps
/// serving, and a node whose relationships no longer follow stops asking.
#[test]
fn a_deleted_follow_relationship_is_no_longer_updated() {
    let (a, b) = (Node::start("A"), Node::start("B"));
    a.create_volume("v");
    a.snap("v", "s1");
    b.repl
        .mirror_create(MirrorSpec {
            follow: true,
            ..spec("v", &a, "v")
        })
        .unwrap();
    a.snap("v", "s2");
    // Its transfer done to the end (a delete while it runs is refused as
    // busy).
    wait_for("B follows s2", || {
        b.repl
            .mirror_status()
            .first()
            .is_some_and(|m| m.incremental_transfers == 1 && m.state == "idle")
    });
    assert!(b.snap_names("v").contains(&"s2".to_string()));
    b.repl.mirror_delete("v").unwrap();
    a.snap("v", "s3");
    // A deleted volume mirror leaves its volume; nothing pulls s3 into it.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!b.snap_names("v").contains(&"s3".to_string()));
    assert!(b.repl.mirror_status().is_empty());
    for n in [a, b] {
        n.shutdown();
    }
}
