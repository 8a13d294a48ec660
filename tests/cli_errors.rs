//! Issue 4, test 6: every CLI command, given a missing volume, a bad size, a
//! duplicate name or an unreachable node, prints one line naming the
//! problem on stderr and exits non-zero. Real daemon, real TCP.

mod common;
use common::*;

/// Assert a failed run with exactly one stderr line containing `want`.
fn fails_with(o: &std::process::Output, want: &str, what: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "{what}: succeeded, expected failure");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: want one line, got {err:?}");
    assert!(lines[0].starts_with("error: "), "{what}: {err:?}");
    assert!(
        lines[0].to_lowercase().contains(&want.to_lowercase()),
        "{what}: {err:?} does not name {want:?}"
    );
}

/// `serve` logs while starting; its last stderr line is the error.
fn serve_fails_with(o: &std::process::Output, want: &str, what: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "{what}: succeeded, expected failure");
    let last = err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(last.starts_with("error: "), "{what}: {err:?}");
    assert!(
        last.contains(want),
        "{what}: {err:?} does not name {want:?}"
    );
}

#[test]
fn every_command_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let pool = init_pool(dir.path(), "pool.img", "1G");
    let d = Daemon::start(&pool);
    d.ok(&["vol", "create", "v", "--size", "64M"]);
    d.ok(&["qtree", "create", "v", "q", "--size", "8M"]);
    d.ok(&["snap", "create", "v", "s1"]);

    // Missing volume (and missing qtree/snapshot).
    let missing: &[(&[&str], &str)] = &[
        (&["qtree", "create", "nope", "q", "--size", "1M"], "nope"),
        (&["snap", "create", "nope", "s"], "nope"),
        (&["snap", "list", "nope"], "nope"),
        (&["snap", "delete", "nope", "s1"], "nope"),
        (&["snap", "delete", "v", "nosnap"], "nosnap"),
        (&["prune", "nope", "--keep", "1"], "nope"),
        (&["diff", "nope", "s1"], "nope"),
        (&["diff", "v", "nosnap"], "nosnap"),
        (&["diff", "v", "s1", "--qtree", "noq"], "noq"),
    ];
    for (args, want) in missing {
        fails_with(&d.cli(args), want, &format!("{args:?}"));
    }

    // Bad sizes: named in the error, rejected before anything is created.
    for size in ["4097", "0", "1X", "abc", "1.5G", "99999999999P"] {
        fails_with(
            &d.cli(&["vol", "create", "w", "--size", size]),
            &format!("bad size \"{size}\""),
            &format!("vol create --size {size}"),
        );
        fails_with(
            &d.cli(&["qtree", "create", "v", "q2", "--size", size]),
            &format!("bad size \"{size}\""),
            &format!("qtree create --size {size}"),
        );
    }
    // A well-formed size the pool cannot hold, and a qtree bigger than allowed.
    fails_with(
        &d.cli(&["vol", "create", "w", "--size", "1P"]),
        "size",
        "vol create 1P",
    );
    fails_with(
        &sluice(&[
            "init",
            dir.path().join("x.img").to_str().unwrap(),
            "--size",
            "12345",
        ]),
        "bad size \"12345\"",
        "init --size 12345",
    );

    // Duplicate names.
    let dups: &[(&[&str], &str)] = &[
        (&["vol", "create", "v", "--size", "64M"], "v already exists"),
        (
            &["qtree", "create", "v", "q", "--size", "8M"],
            "q already exists",
        ),
        (&["snap", "create", "v", "s1"], "s1 already exists"),
    ];
    for (args, want) in dups {
        fails_with(&d.cli(args), want, &format!("{args:?}"));
    }
    // Bad names.
    fails_with(
        &d.cli(&["vol", "create", "a/b", "--size", "1M"]),
        "a/b",
        "vol create a/b",
    );
    let long = "x".repeat(65);
    fails_with(
        &d.cli(&["vol", "create", &long, "--size", "1M"]),
        &long,
        "vol create long",
    );

    // Nothing above changed the node.
    let vols = d.json(&["vol", "list"]);
    assert_eq!(vols.as_array().unwrap().len(), 1, "{vols}");
    assert_eq!(d.json(&["snap", "list", "v"]).as_array().unwrap().len(), 1);

    // Unreachable node: port 1 on 127.0.0.1 is closed.
    let every: &[&[&str]] = &[
        &["vol", "create", "v", "--size", "1M"],
        &["vol", "list"],
        &["qtree", "create", "v", "q", "--size", "1M"],
        &["snap", "create", "v", "s"],
        &["snap", "list", "v"],
        &["snap", "delete", "v", "s"],
        &["prune", "v", "--keep", "1"],
        &["diff", "v", "s"],
        &["status"],
    ];
    for args in every {
        let mut a = vec!["--node", "127.0.0.1:1"];
        a.extend_from_slice(args);
        fails_with(
            &sluice(&a),
            "cannot reach node 127.0.0.1:1",
            &format!("{args:?}"),
        );
        // No --node at all.
        fails_with(&sluice(args), "--node", &format!("{args:?} without --node"));
    }
    drop(d);
}

#[test]
fn daemon_start_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let pool = init_pool(dir.path(), "pool.img", "256M");
    // init refuses to overwrite a pool.
    fails_with(
        &sluice(&["init", pool.to_str().unwrap()]),
        "already holds a sluice pool",
        "init twice",
    );
    // A second daemon on the same pool is refused.
    let d = Daemon::start(&pool);
    let o = sluice(&[
        "serve",
        "--data",
        pool.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    serve_fails_with(&o, "busy", "second serve");
    drop(d);
    // Not a pool.
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, vec![7u8; 1 << 20]).unwrap();
    serve_fails_with(
        &sluice(&[
            "serve",
            "--data",
            junk.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ]),
        "junk.img: device has no sluice pool",
        "serve on junk",
    );
    // Missing device, bad listen address, bad config file.
    serve_fails_with(
        &sluice(&[
            "serve",
            "--data",
            "/nonexistent/p.img",
            "--listen",
            "127.0.0.1:0",
        ]),
        "/nonexistent/p.img",
        "serve on a missing file",
    );
    serve_fails_with(
        &sluice(&[
            "serve",
            "--data",
            pool.to_str().unwrap(),
            "--listen",
            "not-an-address",
        ]),
        "not-an-address",
        "serve on a bad address",
    );
    // A pool keeps its node name: another --name is refused.
    let named = init_pool(dir.path(), "named.img", "256M");
    let d = Daemon::try_start(&named, &["--name", "alpha"]).unwrap();
    assert!(d.term().success());
    serve_fails_with(
        &sluice(&[
            "serve",
            "--data",
            named.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--name",
            "beta",
        ]),
        "belongs to node \"alpha\"",
        "serve with another name",
    );
    let d = Daemon::start(&named);
    assert_eq!(d.json(&["status"])["node"], "alpha");
    drop(d);
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "lisen = \"127.0.0.1:0\"\n").unwrap();
    serve_fails_with(
        &sluice(&["serve", "--config", cfg.to_str().unwrap()]),
        "lisen",
        "serve with a typo in the config",
    );
}
