//! Issue 15, with real `sluice serve` processes: scheduled relationships
//! run on a bounded pool of transfer workers, and one transfer that is held
//! does not keep the others from their schedule.
//!
//! The story: the scheduler once ran due transfers one at a time, so 1,000
//! mirrors set to every 1 s were each updated only every 11 s, and one slow
//! transfer held up every other relationship of the node.
//!
//! Here B pulls five volumes from A with `--every 1s` on two transfer
//! workers (`--max-transfers 2`). One ("big") is throttled so that its
//! scheduled incremental lasts many schedule periods: it holds one worker.
//! While it is held:
//! - each of the four small relationships is updated again and again (all
//!   of them, on the one worker left: the longest due goes first);
//! - the held relationship never starts a second transfer of itself: its
//!   transfer count moves by exactly one, when the held transfer ends.
//!
//! Every wait polls with a deadline; only counts and order are asserted,
//! never a wall-clock duration.

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const SMALL: [&str; 4] = ["s0", "s1", "s2", "s3"];
/// MiB written to the big volume before its scheduled incremental.
const BIG_MIB: u64 = 12;

/// `mirror status` of every relationship on `d`, by destination.
fn statuses(d: &Daemon) -> BTreeMap<String, Value> {
    d.json(&["mirror", "status"])
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["dst"].as_str().unwrap().to_string(), m.clone()))
        .collect()
}

fn count(m: &Value, what: &str) -> u64 {
    m[what].as_u64().unwrap()
}

fn common_name(m: &Value) -> String {
    m["newest_common_snapshot"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_held_scheduled_transfer_leaves_the_other_relationships_on_schedule() {
    if !have("qemu-io") {
        println!("skipped: qemu-io not found");
        return;
    }
    let _rng = Rng::from_env("scheduler_pool");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let a = Daemon::try_start(&init_pool(p, "a.img", "128M"), &["--name", "a"]).unwrap();
    let b = Daemon::try_start(
        &init_pool(p, "b.img", "128M"),
        &["--name", "b", "--max-transfers", "2"],
    )
    .unwrap();
    a.ok(&["vol", "create", "big", "--size", "16M"]);
    a.ok(&["snap", "create", "big", "b0"]);
    for v in SMALL {
        a.ok(&["vol", "create", v, "--size", "4M"]);
        a.ok(&["snap", "create", v, "t0"]);
    }
    b.ok(&[
        "mirror",
        "create",
        "big",
        "--from",
        &format!("{}/big", a.listen),
        "--every",
        "1s",
        "--throttle",
        "512K",
    ]);
    for v in SMALL {
        b.ok(&[
            "mirror",
            "create",
            v,
            "--from",
            &format!("{}/{v}", a.listen),
            "--every",
            "1s",
        ]);
    }

    // The held one: BIG_MIB MiB at 512 KiB/s, brought over by B's schedule.
    let cmds: Vec<String> = (0..BIG_MIB)
        .map(|i| format!("write -P {} {} 1M", i + 1, i << 20))
        .collect();
    qemu_io(&a.nbd, "big", &cmds);
    a.ok(&["snap", "create", "big", "b1"]);
    wait_until("B's scheduled transfer of the big volume to start", || {
        statuses(&b)["big"]["state"] == "transferring"
    });
    let start = statuses(&b);
    let big_start = count(&start["big"], "incremental_transfers");

    // While the big one is held: give every small volume a new snapshot
    // each time B has the last one, and count B's updates of each.
    let mut next_t: BTreeMap<&str, u32> = SMALL.iter().map(|v| (*v, 1)).collect();
    let mut during: BTreeMap<&str, u64> = BTreeMap::new();
    let deadline = Instant::now() + WAIT_DEADLINE * 2;
    loop {
        // Small ones first, the big one last: while the big one is not
        // done, what was read before happened during its transfer.
        let now = statuses(&b);
        for v in SMALL {
            let m = &now[v];
            let t = next_t.get_mut(v).unwrap();
            if common_name(m) == format!("t{}", *t - 1) {
                a.ok(&["snap", "create", v, &format!("t{t}")]);
                *t += 1;
            }
            during.insert(
                v,
                count(m, "incremental_transfers") - count(&start[v], "incremental_transfers"),
            );
            assert!(m["last_error"].is_null(), "{v}: {m}");
        }
        let big = &statuses(&b)["big"];
        if common_name(big) == "b1" {
            break;
        }
        // One transfer of a relationship at a time: the held transfer is
        // the only one of it until it ends.
        assert_eq!(count(big, "incremental_transfers"), big_start, "{big}");
        if during.values().all(|n| *n >= 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: small updates {during:?} while the big one was held: {big}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("updates of each small relationship while the big one was held: {during:?}");
    for v in SMALL {
        assert!(
            during[v] >= 2,
            "{v} was updated {} times while the big transfer held a worker: {during:?}",
            during[v]
        );
    }

    // The held transfer ends as one transfer.
    wait_until("the big transfer to end", || {
        common_name(&statuses(&b)["big"]) == "b1"
    });
    let big = &statuses(&b)["big"];
    assert_eq!(count(big, "incremental_transfers"), big_start + 1, "{big}");
    assert_eq!(big["full_transfers"], 1, "no restart from zero: {big}");
    assert!(big["last_error"].is_null(), "{big}");
    assert!(b.term().success(), "B did not stop cleanly");
}
