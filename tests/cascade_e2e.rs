//! Issue 5, tests 1 and 2, with real `sluice serve` processes and real TCP:
//! a 4-node chain A -> B -> C -> D with keep-1 pruning on A and downstreams
//! that lag several rounds behind. With soft locks, every update after the
//! baseline is incremental and every node reads back (through NBD)
//! byte-identical to A at the same snapshot. With lock propagation switched
//! off (the demonstration switch), the same scenario must break a chain:
//! the canary that proves the first test can fail.

mod common;
use common::*;

const VOL_MB: u64 = 32;
const ROUNDS: u64 = 7;

struct Outcome {
    full_after_baseline: u64,
    broken: Vec<String>,
}

/// Round r: write on A, snapshot, prune A to 1; B updates every round, C
/// every 2nd, D every 3rd (so C and D lag behind A's pruning).
fn run_chain(locks: bool, rng: &mut Rng, check_content: bool) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let extra: &[&str] = if locks {
        &[]
    } else {
        &["--no-lock-propagation"]
    };
    let nodes: Vec<Daemon> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| {
            let pool = init_pool(dir.path(), &format!("{n}.img"), "256M");
            let mut args = vec!["--name", n];
            args.extend_from_slice(extra);
            Daemon::try_start(&pool, &args).unwrap()
        })
        .collect();
    let (a, chain) = (&nodes[0], &nodes[1..]);
    a.ok(&["vol", "create", "v", "--size", &format!("{VOL_MB}M")]);
    let blocks = VOL_MB * 256;
    let write_round = |rng: &mut Rng, round: u64| {
        let cmds: Vec<String> = (0..24)
            .map(|i| {
                let lba = rng.next() % blocks;
                format!("write -P {} {} 4k", (round * 24 + i) % 250 + 1, lba * 4096)
            })
            .collect();
        qemu_io(&a.nbd, "v", &cmds);
    };
    write_round(rng, 0);
    a.ok(&["snap", "create", "v", "s0"]);
    for (i, n) in chain.iter().enumerate() {
        let up = &nodes[i];
        n.ok(&[
            "mirror",
            "create",
            "v",
            "--from",
            &format!("{}/v", up.listen),
        ]);
    }
    let mut out = Outcome {
        full_after_baseline: 0,
        broken: Vec::new(),
    };
    for round in 1..=ROUNDS {
        write_round(rng, round);
        a.ok(&["snap", "create", "v", &format!("s{round}")]);
        a.ok(&["prune", "v", "--keep", "1"]);
        for (i, n) in chain.iter().enumerate() {
            let every = i as u64 + 1;
            if round % every != 0 && round != ROUNDS {
                continue;
            }
            let o = n.cli(&["mirror", "update", "v", "--json"]);
            if !o.status.success() {
                let e = stderr(&o);
                assert!(e.contains("no common snapshot"), "unexpected failure: {e}");
                out.broken
                    .push(format!("round {round}: node {}: {}", i + 1, e.trim()));
                continue;
            }
            let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
            if r["kind"] == "full" {
                out.full_after_baseline += 1;
            }
        }
    }
    if check_content {
        // Every node at the last snapshot: equal digests and equal bytes.
        let last = format!("v@s{ROUNDS}");
        let want = read_export(&a.nbd, &last, dir.path());
        assert_eq!(want.len() as u64, VOL_MB << 20);
        let digest = |d: &Daemon| {
            d.json(&["snap", "list", "v"])
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == format!("s{ROUNDS}"))
                .map(|s| s["digests"].clone())
                .expect("last snapshot on every node")
        };
        let a_digest = digest(a);
        for (i, n) in chain.iter().enumerate() {
            assert_eq!(digest(n), a_digest, "node {} digest", i + 1);
            let got = read_export(&n.nbd, &last, dir.path());
            assert!(got == want, "node {}: bytes differ from A at {last}", i + 1);
            let live = read_export(&n.nbd, "v", dir.path());
            assert!(
                live == want,
                "node {}: live mirror differs from A at {last}",
                i + 1
            );
        }
        // A kept only what locks asked for: fewer than all rounds.
        let a_snaps = a.json(&["snap", "list", "v"]);
        assert!(a_snaps.as_array().unwrap().len() < ROUNDS as usize);
    }
    out
}

#[test]
fn four_node_chain_stays_incremental_with_soft_locks() {
    if !have("qemu-io") || !have("qemu-img") {
        println!("skipped: qemu-io/qemu-img not found");
        return;
    }
    let mut rng = Rng::from_env("four_node_chain");
    let o = run_chain(true, &mut rng, true);
    assert!(
        o.broken.is_empty(),
        "chains broke with soft locks on: {:?}",
        o.broken
    );
    assert_eq!(
        o.full_after_baseline, 0,
        "full transfers after the baseline"
    );
}

#[test]
fn canary_without_lock_propagation_the_chain_breaks() {
    if !have("qemu-io") {
        println!("skipped: qemu-io not found");
        return;
    }
    let mut rng = Rng::from_env("canary");
    let o = run_chain(false, &mut rng, false);
    println!("broken without propagation: {:#?}", o.broken);
    assert!(
        !o.broken.is_empty(),
        "the canary found no broken chain: the test could not fail"
    );
}
