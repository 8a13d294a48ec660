//! `qemu-img convert` against the NBD server: a whole export (live and
//! snapshot) copied out to a file equals what was written; a file copied
//! in (zero runs become write-zeroes/trim, big writes) reads back equal;
//! `qemu-nbd --list` sees every export (NBD_OPT_LIST, NBD_OPT_INFO).
//! Skips (with a printed line) when the qemu tools are not installed.

mod nbd_common;

use nbd_common::*;
use rand::{Rng, RngCore};
use sluice_engine::api::{Image, NsName};
use std::path::Path;
use std::process::Command;

fn run(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .output()
        .expect("run qemu tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{text}",
        bin.display()
    );
    text
}

/// Scattered seeded writes straight into the engine; the model follows.
fn scatter(node: &Node, ns: &NsName, model: &mut [u8], rng: &mut impl Rng, count: usize) {
    let blocks = model.len() / 4096;
    for _ in 0..count {
        let lba = rng.gen_range(0..blocks - 8);
        let n = rng.gen_range(1..8);
        let mut data = vec![0u8; n * 4096];
        rng.fill_bytes(&mut data);
        node.write_direct(ns, lba as u64, &data);
        model[lba * 4096..(lba + n) * 4096].copy_from_slice(&data);
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn convert_copies_whole_exports_out() {
    let Some(img) = tool("qemu-img") else { return };
    let s = seed("convert_copies_whole_exports_out");
    let mut rng = rng(s);
    let node = Node::start();
    let dir = tempfile::tempdir().unwrap();
    let vol = NsName::volume(VOL);
    let mut model = vec![0u8; VOL_BYTES as usize];
    scatter(&node, &vol, &mut model, &mut rng, 400);
    // The last block too, so the copy must reach the very end.
    let last = (VOL_BYTES / 4096 - 1) as usize;
    node.write_direct(&vol, last as u64, &[0xee; 4096]);
    model[last * 4096..].fill(0xee);
    node.snapshot(VOL, "s1");
    let at_s1 = model.clone();
    scatter(&node, &vol, &mut model, &mut rng, 200);

    for (export, want) in [(VOL.to_string(), &model), (format!("{VOL}@s1"), &at_s1)] {
        let out = dir.path().join("copy.raw");
        let _ = std::fs::remove_file(&out);
        run(
            &img,
            &[
                "convert",
                "--image-opts",
                &node.image_opts(&export),
                "-O",
                "raw",
                out.to_str().unwrap(),
            ],
        );
        let got = std::fs::read(&out).unwrap();
        assert_eq!(
            first_difference(&got, want),
            None,
            "seed {s}: export {export} differs from what was written"
        );
    }
    node.stop();
}

#[test]
fn convert_copies_a_file_in() {
    let Some(img) = tool("qemu-img") else { return };
    let s = seed("convert_copies_a_file_in");
    let mut rng = rng(s);
    let node = Node::start();
    let dir = tempfile::tempdir().unwrap();
    let qt = NsName::qtree(VOL, QTREE);
    // Old content everywhere, so zero runs of the source must be written.
    let mut junk = vec![0u8; QTREE_BYTES as usize];
    rng.fill_bytes(&mut junk);
    node.write_direct(&qt, 0, &junk);
    // Source: random runs and zero runs of random, unaligned lengths.
    let mut src = vec![0u8; QTREE_BYTES as usize];
    let mut at = 0;
    while at < src.len() {
        let n = rng.gen_range(1..3 << 20).min(src.len() - at);
        if rng.gen_bool(0.5) {
            rng.fill_bytes(&mut src[at..at + n]);
        }
        at += n;
    }
    let src_path = dir.path().join("src.raw");
    std::fs::write(&src_path, &src).unwrap();
    let target = node.image_opts(&format!("{VOL}/{QTREE}"));
    run(
        &img,
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            src_path.to_str().unwrap(),
            "--target-image-opts",
            &target,
        ],
    );
    let image = Image {
        ns: qt,
        snapshot: None,
    };
    let got = node.read_direct(&image, 0, (QTREE_BYTES / 4096) as u32);
    assert_eq!(first_difference(&got, &src), None, "seed {s}");
    // And qemu agrees, through a fresh connection.
    let out = run(
        &img,
        &[
            "compare",
            "--image-opts",
            &format!("driver=file,filename={}", src_path.display()),
            &target,
        ],
    );
    assert!(out.contains("identical"), "{out}");
    node.stop();
}

#[test]
fn qemu_nbd_lists_every_export() {
    let Some(qnbd) = tool("qemu-nbd") else { return };
    let node = Node::start();
    node.snapshot(VOL, "s1");
    let out = run(
        &qnbd,
        &[
            "--list",
            "--bind",
            &node.nbd_addr.ip().to_string(),
            "--port",
            &node.nbd_addr.port().to_string(),
        ],
    );
    for name in ["vol", "vol/qt", "vol@s1", "vol/qt@s1"] {
        assert!(
            out.lines().any(|l| l.trim() == format!("export: '{name}'")),
            "{name} missing from:\n{out}"
        );
    }
    assert!(out.contains("exports available: 4"), "{out}");
    assert!(out.contains("size:  67108864"), "{out}");
    assert!(out.contains("readonly"), "{out}");
    node.stop();
}
