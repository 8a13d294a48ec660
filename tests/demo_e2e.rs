//! `sluice demo`, the README's first command, run as a user runs it: it
//! succeeds, soft locks keep every chain incremental, the canary breaks
//! chains, and the last act re-attaches C (a volume mirror and a qtree
//! mirror) to A past the killed B, incrementally.

mod common;
use common::*;

#[test]
fn demo_runs_and_reattaches_past_the_lost_node() {
    let o = sluice(&["demo"]);
    let out = stdout(&o);
    assert!(o.status.success(), "demo failed: {}\n{out}", stderr(&o));
    assert!(
        out.contains("0 full copies after the baseline, 0 broken chains"),
        "{out}"
    );
    for who in ["C:vol0", "C:dbcopy/db"] {
        assert!(
            out.contains(&format!(
                "{who}: re-attached to A, went on from r6 with an incremental transfer"
            )),
            "{who} not re-attached incrementally:\n{out}"
        );
    }
    assert!(
        out.contains("C:vol0@r8 vs A: content digest equal, bytes read through NBD identical"),
        "{out}"
    );
    assert!(
        out.contains("C:dbcopy/db vs A:vol0/db@r8: bytes read through NBD identical"),
        "{out}"
    );
    assert!(!out.contains("DIFFERENT"), "{out}");
}
