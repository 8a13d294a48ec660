//! A filesystem on a volume, end to end (issue 16), with real tools: an
//! ext4 image made by `mkfs.ext4 -d` is written into a volume through NBD
//! by `qemu-img convert` (the real client; this machine has no kernel NBD
//! module and no nbdfuse, so the filesystem tools run on images that
//! qemu-img copies in and out), a snapshot is taken, the volume is
//! rewritten with another filesystem, and the snapshot's export, copied out
//! by qemu-img, passes `fsck.ext4 -n` and still holds the first files
//! (read with `debugfs`), as the live export holds the second.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn run(prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{prog} {args:?} failed:\n{text}");
    text
}

/// An ext4 image of `size_mb` MiB holding `files` (name, text).
fn ext4_image(dir: &Path, name: &str, size_mb: u64, files: &[(&str, &str)]) -> std::path::PathBuf {
    let src = dir.join(format!("{name}-files"));
    std::fs::create_dir_all(&src).unwrap();
    for (f, text) in files {
        std::fs::write(src.join(f), text).unwrap();
    }
    let img = dir.join(format!("{name}.img"));
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size_mb << 20).unwrap();
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-d",
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    img
}

/// The text of `file` in the ext4 image `img` (debugfs, read-only).
fn cat(img: &Path, file: &str) -> String {
    let o = Command::new("debugfs")
        .args(["-R", &format!("cat /{file}"), img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn an_ext4_filesystem_on_a_volume_snapshots_whole() {
    if !(have("qemu-img") && have("mkfs.ext4") && have("debugfs") && have("fsck.ext4")) {
        println!("skipped: needs qemu-img, mkfs.ext4, debugfs and fsck.ext4");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = Daemon::named(d, "a", &[]);
    a.ok(&["vol", "create", "fs", "--size", "32M"]);
    let first = ext4_image(
        d,
        "first",
        32,
        &[("hello.txt", "first filesystem\n"), ("b.txt", "bee\n")],
    );
    let url = |export: &str| format!("nbd://{}/{export}", a.nbd);
    // qemu-img writes an image into the volume through NBD.
    let copy_in = |img: &Path| {
        run(
            "qemu-img",
            &[
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "raw",
                img.to_str().unwrap(),
                &url("fs"),
            ],
        )
    };
    copy_in(&first);
    a.ok(&["snap", "create", "fs", "s1"]);
    // The live volume gets another filesystem; the snapshot keeps the first.
    let second = ext4_image(d, "second", 32, &[("hello.txt", "second filesystem\n")]);
    copy_in(&second);
    let out = |export: &str, name: &str| {
        let p = d.join(name);
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &url(export),
                p.to_str().unwrap(),
            ],
        );
        p
    };
    let snap = out("fs@s1", "snap-out.img");
    let live = out("fs", "live-out.img");
    for img in [&snap, &live] {
        run("fsck.ext4", &["-n", "-f", img.to_str().unwrap()]);
    }
    assert_eq!(cat(&snap, "hello.txt"), "first filesystem\n");
    assert_eq!(cat(&snap, "b.txt"), "bee\n");
    assert_eq!(cat(&live, "hello.txt"), "second filesystem\n");
    // Byte for byte what was written.
    assert!(std::fs::read(&snap).unwrap() == std::fs::read(&first).unwrap());
    assert!(std::fs::read(&live).unwrap() == std::fs::read(&second).unwrap());
}
