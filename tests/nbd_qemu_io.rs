//! `qemu-io` against the NBD server: known patterns written at many aligned
//! and unaligned offsets read back through a second connection; a snapshot
//! export shows the data of its time, not later writes, and refuses
//! writes; qtree exports are separate namespaces. Skips (with a printed
//! line) when qemu-io is not installed.

mod nbd_common;

use nbd_common::*;
use rand::Rng;
use std::path::Path;
use std::process::Command;

/// Run qemu-io with `-c` commands on an export; (success, output).
fn qemu_io(
    bin: &Path,
    node: &Node,
    export: &str,
    read_only: bool,
    cmds: &[String],
) -> (bool, String) {
    let mut c = Command::new(bin);
    if read_only {
        c.arg("-r");
    }
    c.arg("--image-opts").arg(node.image_opts(export));
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.output().expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = text.contains("failed") || text.contains("error") || text.contains("Error");
    (out.status.success() && !failed, text)
}

#[derive(Debug, Clone, Copy)]
struct Region {
    offset: u64,
    len: u64,
    pattern: u8,
}

/// Non-overlapping regions: one per 64 KiB slot, at a random offset in the
/// slot's first half (half of them block-aligned), random length.
fn regions(rng: &mut impl Rng, size: u64) -> Vec<Region> {
    let slot = 64 << 10;
    (0..size / slot)
        .step_by(3)
        .enumerate()
        .map(|(i, s)| {
            let aligned = i % 2 == 0;
            let (offset, len) = if aligned {
                (
                    s * slot + rng.gen_range(0..8u64) * 4096,
                    rng.gen_range(1..8u64) * 4096,
                )
            } else {
                (
                    s * slot + rng.gen_range(0..32 << 10),
                    rng.gen_range(1..32 << 10),
                )
            };
            Region {
                offset,
                len,
                pattern: rng.gen_range(1..=255),
            }
        })
        .collect()
}

fn writes(rs: &[Region]) -> Vec<String> {
    rs.iter()
        .map(|r| format!("write -P {} {} {}", r.pattern, r.offset, r.len))
        .collect()
}

fn reads(rs: &[Region]) -> Vec<String> {
    rs.iter()
        .map(|r| format!("read -P {} {} {}", r.pattern, r.offset, r.len))
        .collect()
}

#[test]
fn patterns_at_many_offsets_read_back_through_a_second_connection() {
    let Some(bin) = tool("qemu-io") else { return };
    let s = seed("patterns_at_many_offsets_read_back_through_a_second_connection");
    let mut rng = rng(s);
    let node = Node::start();
    let rs = regions(&mut rng, 16 << 20);
    assert!(rs.len() > 60);
    let (ok, out) = qemu_io(&bin, &node, VOL, false, &writes(&rs));
    assert!(ok, "seed {s}: writes failed:\n{out}");
    // A second connection (a new qemu-io process) reads them back.
    let (ok, out) = qemu_io(&bin, &node, VOL, true, &reads(&rs));
    assert!(ok, "seed {s}: read back failed:\n{out}");
    // The check can fail: a wrong pattern is noticed.
    let r = rs[1];
    let wrong = format!("read -P {} {} {}", r.pattern ^ 0x80, r.offset, r.len);
    let (ok, out) = qemu_io(&bin, &node, VOL, true, &[wrong]);
    assert!(!ok && out.contains("Pattern verification failed"), "{out}");
    // The gaps between regions still read as zeroes.
    let gaps: Vec<String> = rs
        .windows(2)
        .map(|w| {
            let end = w[0].offset + w[0].len;
            format!("read -P 0 {end} {}", w[1].offset - end)
        })
        .collect();
    let (ok, out) = qemu_io(&bin, &node, VOL, true, &gaps);
    assert!(ok, "seed {s}: gaps not zero:\n{out}");
    // Overwrite half of them unaligned, crossing block edges, then check
    // old and new bytes side by side.
    let over: Vec<Region> = rs
        .iter()
        .step_by(2)
        .map(|r| Region {
            offset: r.offset + r.len / 2,
            len: r.len / 2 + 100,
            pattern: r.pattern.wrapping_add(1).max(1),
        })
        .collect();
    let (ok, out) = qemu_io(&bin, &node, VOL, false, &writes(&over));
    assert!(ok, "seed {s}: overwrites failed:\n{out}");
    let mut checks = Vec::new();
    for (r, o) in rs.iter().step_by(2).zip(&over) {
        checks.push(format!(
            "read -P {} {} {}",
            r.pattern,
            r.offset,
            o.offset - r.offset
        ));
        checks.push(format!("read -P {} {} {}", o.pattern, o.offset, o.len));
    }
    let (ok, out) = qemu_io(&bin, &node, VOL, true, &checks);
    assert!(ok, "seed {s}: overwrite check failed:\n{out}");
    // Write-zeroes and discard (qemu-io's `write -z`, `discard`) unaligned.
    let z = rs[1];
    let (ok, out) = qemu_io(
        &bin,
        &node,
        VOL,
        false,
        &[
            format!("write -z {} {}", z.offset + 1, z.len - 2),
            "flush".to_string(),
        ],
    );
    assert!(ok, "seed {s}: write -z failed:\n{out}");
    let (ok, out) = qemu_io(
        &bin,
        &node,
        VOL,
        true,
        &[
            format!("read -P {} {} 1", z.pattern, z.offset),
            format!("read -P 0 {} {}", z.offset + 1, z.len - 2),
            format!("read -P {} {} 1", z.pattern, z.offset + z.len - 1),
        ],
    );
    assert!(ok, "seed {s}: zeroes check failed:\n{out}");
    node.stop();
}

#[test]
fn qtree_export_is_its_own_namespace() {
    let Some(bin) = tool("qemu-io") else { return };
    let node = Node::start();
    let qt = format!("{VOL}/{QTREE}");
    let (ok, out) = qemu_io(
        &bin,
        &node,
        &qt,
        false,
        &[
            "write -P 0x71 4095 10000".into(),
            "write -P 0x72 0 1".into(),
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(
        &bin,
        &node,
        &qt,
        true,
        &[
            "read -P 0x72 0 1".into(),
            "read -P 0 1 4094".into(),
            "read -P 0x71 4095 10000".into(),
        ],
    );
    assert!(ok, "{out}");
    // The volume's own space did not change.
    let (ok, out) = qemu_io(&bin, &node, VOL, true, &["read -P 0 0 65536".into()]);
    assert!(ok, "{out}");
    // Its size is the qtree's, and writing past it fails.
    let (ok, out) = qemu_io(&bin, &node, &qt, true, &["length".into()]);
    assert!(ok && out.contains("16 MiB"), "{out}");
    let (ok, _) = qemu_io(
        &bin,
        &node,
        &qt,
        false,
        &[format!("write -P 1 {} 4096", QTREE_BYTES)],
    );
    assert!(!ok, "a write past the end succeeded");
    node.stop();
}

#[test]
fn snapshot_export_shows_its_time_and_refuses_writes() {
    let Some(bin) = tool("qemu-io") else { return };
    let s = seed("snapshot_export_shows_its_time_and_refuses_writes");
    let mut rng = rng(s);
    let node = Node::start();
    let rs = regions(&mut rng, 8 << 20);
    let (ok, out) = qemu_io(&bin, &node, VOL, false, &writes(&rs));
    assert!(ok, "seed {s}: {out}");
    let qt = format!("{VOL}/{QTREE}");
    let (ok, out) = qemu_io(&bin, &node, &qt, false, &["write -P 0x33 1000 5000".into()]);
    assert!(ok, "{out}");
    node.snapshot(VOL, "s1");
    // Later writes to the live volume and qtree.
    let later: Vec<Region> = rs
        .iter()
        .map(|r| Region {
            pattern: r.pattern ^ 0xff,
            ..*r
        })
        .collect();
    let (ok, out) = qemu_io(&bin, &node, VOL, false, &writes(&later));
    assert!(ok, "seed {s}: {out}");
    let (ok, out) = qemu_io(&bin, &node, &qt, false, &["write -P 0x44 0 65536".into()]);
    assert!(ok, "{out}");
    // The snapshot has the old data, the live volume the new.
    let (ok, out) = qemu_io(&bin, &node, &format!("{VOL}@s1"), true, &reads(&rs));
    assert!(ok, "seed {s}: snapshot content:\n{out}");
    let (ok, out) = qemu_io(&bin, &node, VOL, true, &reads(&later));
    assert!(ok, "seed {s}: live content:\n{out}");
    let (ok, out) = qemu_io(
        &bin,
        &node,
        &format!("{qt}@s1"),
        true,
        &[
            "read -P 0 0 1000".into(),
            "read -P 0x33 1000 5000".into(),
            "read -P 0 6000 59536".into(),
        ],
    );
    assert!(ok, "qtree snapshot content:\n{out}");
    // Writing the snapshot export fails, and changes nothing.
    let (ok, out) = qemu_io(
        &bin,
        &node,
        &format!("{VOL}@s1"),
        false,
        &["write -P 0x99 0 4096".into()],
    );
    assert!(!ok, "a write to a snapshot export succeeded:\n{out}");
    eprintln!("write to the snapshot export: {}", out.trim());
    let (ok, out) = qemu_io(&bin, &node, &format!("{VOL}@s1"), true, &reads(&rs[..4]));
    assert!(ok, "{out}");
    // An unknown snapshot is an unknown export.
    let (ok, out) = qemu_io(
        &bin,
        &node,
        &format!("{VOL}@nope"),
        true,
        &["read 0 1".into()],
    );
    assert!(!ok && out.contains("no snapshot named nope"), "{out}");
    node.stop();
}
