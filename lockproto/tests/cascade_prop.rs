//! Property test over random cascades (chains up to depth 6, fan-out,
//! fan-in) with message loss, duplication, reordering and restarts, plus
//! the canary with propagation switched off. Seed printed; replay with
//! `SLUICE_SEED=<seed>`.

mod sim;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sim::{run_seed, Faults, Sim, NO_FAULTS};

const SCENARIOS: usize = 10_000;
const STEPS: usize = 60;

#[test]
fn cascade_never_deletes_a_delivered_base_and_leases_release() {
    let seed = run_seed("cascade_prop");
    let mut meta = SmallRng::seed_from_u64(seed);
    let (mut transfers, mut deletes, mut faulty, mut relayed) = (0, 0, 0, 0);
    for sc in 0..SCENARIOS {
        let s: u64 = meta.gen();
        let with_faults = sc % 2 == 1;
        let f = if with_faults {
            Faults {
                loss: 0.2,
                dup: 0.1,
                restart: 0.03,
            }
        } else {
            NO_FAULTS
        };
        let mut sim = Sim::new(s, true);
        for _ in 0..STEPS {
            sim.step(&f);
        }
        assert!(
            sim.out.violations.is_empty(),
            "scenario {sc} (sub-seed {s}, run seed {seed}): {:?}",
            sim.out.violations
        );
        if !with_faults {
            assert_eq!(
                sim.out.broken, 0,
                "scenario {sc} (sub-seed {s}, run seed {seed}): a chain broke without faults"
            );
        } else {
            faulty += 1;
        }
        sim.kill_and_expire();
        assert!(
            sim.out.leaked.is_empty(),
            "scenario {sc} (sub-seed {s}, run seed {seed}): {:?}",
            sim.out.leaked
        );
        transfers += sim.out.transfers;
        deletes += sim.out.deletes;
        relayed += sim.out.relayed_refusals;
    }
    eprintln!("cascade_prop: {SCENARIOS} scenarios ({faulty} with faults), {transfers} transfers, {deletes} deletes, {relayed} deletes refused by relayed locks");
    assert!(
        transfers > SCENARIOS && deletes > SCENARIOS,
        "the simulation must exercise transfers and rotation"
    );
    assert!(
        relayed > 0,
        "relayed (multi-hop) locks must protect snapshots somewhere"
    );
}

#[test]
fn canary_propagation_off_breaks_a_chain() {
    let seed = run_seed("canary");
    let mut meta = SmallRng::seed_from_u64(seed);
    let mut broken = 0;
    let n = 2_000;
    for _ in 0..n {
        let mut sim = Sim::new(meta.gen(), false);
        for _ in 0..STEPS {
            sim.step(&NO_FAULTS);
        }
        broken += sim.out.broken;
    }
    eprintln!("canary: {n} scenarios, {broken} broken chains with propagation off");
    assert!(
        broken > 0,
        "with propagation off the property test must find a broken chain"
    );
}
