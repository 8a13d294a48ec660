//! Issue 5, test 3, with real `sluice serve` processes and real TCP: a
//! transfer cut at a seeded point resumes from the destination's checkpoint
//! on the next `mirror update`, and the data then matches the source at
//! that snapshot (read through NBD).
//!
//! Three ways to cut: kill -9 of the source daemon (restarted on the same
//! pool under the same name), kill -9 of the destination daemon (restarted
//! likewise), and a connection dropped by the fault-injecting proxy after a
//! seeded number of bytes (a baseline and an incremental, each cut after a
//! checkpoint, and one cut before the first checkpoint). The destination
//! always mirrors from the proxy's address, so a source restarted on a new
//! port stays reachable at the stored source address.
//!
//! Transfers are made long enough to cut: every round rewrites 256 extents
//! of 128 KiB (one item each, a checkpoint every 32 items), and the
//! relationship is throttled.

mod common;

use common::*;
use sluice_testkit::proxy::{Fault, Fired, Proxy};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const VOL_MB: u64 = 64;
const SLOTS: u64 = 256;
const SLOT_BYTES: u64 = 256 << 10;
const EXTENT_BYTES: u64 = 128 << 10;
const ROUND_BYTES: u64 = SLOTS * EXTENT_BYTES;
/// Items between two checkpoints (the source's `checkpoint_items`).
const CKPT_ITEMS: u64 = 32;
/// The relationship's throttle; the proxy forwards slower still (PROXY_RATE),
/// so the destination never has a backlog of received bytes.
const THROTTLE: &str = "32M";
const PROXY_RATE: u64 = 16 << 20;
const DEADLINE: Duration = Duration::from_secs(90);

struct Pair {
    dir: tempfile::TempDir,
    /// `serve` arguments of the source (its name and dense checkpoints).
    a_args: Vec<String>,
    a_pool: std::path::PathBuf,
    b_pool: std::path::PathBuf,
    a: Option<Daemon>,
    b: Option<Daemon>,
    proxy: Proxy,
}

impl Pair {
    fn new() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let a_pool = init_pool(dir.path(), "a.img", "512M");
        let b_pool = init_pool(dir.path(), "b.img", "512M");
        // Checkpoints of transfers served by A: every CKPT_ITEMS items.
        let cfg = dir.path().join("a.toml");
        std::fs::write(&cfg, format!("checkpoint_items = {CKPT_ITEMS}\n")).unwrap();
        let a_args: Vec<String> = ["--name", "a", "--config", cfg.to_str().unwrap()]
            .map(String::from)
            .into();
        let a = Pair::start_a(&a_pool, &a_args);
        let b = Daemon::try_start(&b_pool, &["--name", "b"]).unwrap();
        let proxy = Proxy::start(&a.listen);
        proxy.set_rate(PROXY_RATE);
        a.ok(&["vol", "create", "v", "--size", &format!("{VOL_MB}M")]);
        Pair {
            dir,
            a_args,
            a_pool,
            b_pool,
            a: Some(a),
            b: Some(b),
            proxy,
        }
    }
    fn start_a(pool: &std::path::Path, args: &[String]) -> Daemon {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::try_start(pool, &args).unwrap()
    }
    fn a(&self) -> &Daemon {
        self.a.as_ref().expect("source running")
    }
    fn b(&self) -> &Daemon {
        self.b.as_ref().expect("destination running")
    }
    fn from(&self) -> String {
        format!("{}/v", self.proxy.addr())
    }

    /// Rewrite every slot on A (one 128 KiB extent each), then snapshot.
    fn round(&self, rng: &mut Rng, snap: &str) {
        self.write_slots(rng, 0..SLOTS);
        self.a().ok(&["snap", "create", "v", snap]);
    }

    /// Write one 128 KiB extent at the start of each slot in `slots`.
    fn write_slots(&self, rng: &mut Rng, slots: std::ops::Range<u64>) {
        let base = rng.next() % 250;
        let mut cmds: Vec<String> = slots
            .map(|i| {
                format!(
                    "aio_write -P {} {} {}",
                    (base + i) % 250 + 1,
                    i * SLOT_BYTES,
                    EXTENT_BYTES
                )
            })
            .collect();
        cmds.push("aio_flush".into());
        qemu_io(&self.a().nbd, "v", &cmds);
    }

    fn create_mirror(&self) -> std::process::Output {
        self.b().cli(&[
            "mirror",
            "create",
            "v",
            "--from",
            &self.from(),
            "--throttle",
            THROTTLE,
            "--json",
        ])
    }

    /// `mirror update v --json` on a thread (the caller cuts meanwhile).
    fn update_bg(&self) -> JoinHandle<std::process::Output> {
        let node = self.b().control.clone();
        std::thread::spawn(move || sluice(&["--node", &node, "mirror", "update", "v", "--json"]))
    }

    fn update(&self) -> serde_json::Value {
        self.b().json(&["mirror", "update", "v"])
    }

    /// A's and B's images at `snap`, and B's live image, are the same bytes;
    /// the snapshot digests agree.
    fn check_content(&self, snap: &str) {
        let at = format!("v@{snap}");
        let want = read_export(&self.a().nbd, &at, self.dir.path());
        assert_eq!(want.len() as u64, VOL_MB << 20);
        let got = read_export(&self.b().nbd, &at, self.dir.path());
        assert!(got == want, "B's {at} differs from A's");
        let live = read_export(&self.b().nbd, "v", self.dir.path());
        assert!(live == want, "B's live mirror differs from A's {at}");
        assert_eq!(
            digest(self.a(), snap),
            digest(self.b(), snap),
            "digests at {at}"
        );
    }
}

fn digest(d: &Daemon, snap: &str) -> serde_json::Value {
    d.json(&["snap", "list", "v"])
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == snap)
        .map(|s| s["digests"].clone())
        .unwrap_or_else(|| panic!("snapshot {snap} missing"))
}

fn rel_status(b: &Daemon) -> serde_json::Value {
    b.json(&["mirror", "status"])
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["dst"] == "v")
        .cloned()
        .expect("relationship v in mirror status")
}

/// The checkpoint of relationship v (None: no relationship or checkpoint yet).
fn ckpt_position(b: &Daemon) -> Option<u64> {
    b.json(&["mirror", "status"])
        .as_array()?
        .iter()
        .find(|r| r["dst"] == "v")?["checkpoint"]["position"]
        .as_u64()
}

/// Poll B's checkpoint until it reaches `k` while `job` runs.
fn wait_checkpoint(b: &Daemon, k: u64, job: &JoinHandle<std::process::Output>) -> u64 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(p) = ckpt_position(b) {
            if p >= k {
                return p;
            }
        }
        assert!(
            !job.is_finished(),
            "the transfer ended before checkpoint {k}; make it longer"
        );
        assert!(
            Instant::now() < deadline,
            "checkpoint {k} never reached: {}",
            rel_status(b)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A failed CLI call: non-zero exit and one line on stderr.
fn failed_one_line(o: &std::process::Output, what: &str) -> String {
    assert!(
        !o.status.success(),
        "{what} should have failed: {}",
        stdout(o)
    );
    let e = stderr(o);
    assert_eq!(e.trim().lines().count(), 1, "{what}: one-line error: {e}");
    e.trim().to_string()
}

/// The report of a resumed transfer: from `from`, only the rest was sent.
fn assert_resumed(r: &serde_json::Value, from: u64, kind: &str) {
    assert_eq!(r["kind"], kind, "{r}");
    assert_eq!(r["resumed_from"].as_u64(), Some(from), "{r}");
    let total = r["total_items"].as_u64().unwrap();
    let extents = r["extents"].as_u64().unwrap();
    let bytes = r["bytes"].as_u64().unwrap();
    assert_eq!(
        extents,
        total - from,
        "only the items after the checkpoint: {r}"
    );
    assert_eq!(bytes, (total - from) * EXTENT_BYTES, "{r}");
    if from > 0 {
        assert!(
            bytes < ROUND_BYTES,
            "fewer bytes than the whole transfer: {r}"
        );
    }
}

fn baseline(p: &Pair, rng: &mut Rng) {
    p.round(rng, "s0");
    let o = p.create_mirror();
    assert!(o.status.success(), "baseline: {}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["kind"], "full");
    assert_eq!(r["bytes"].as_u64(), Some(ROUND_BYTES), "{r}");
    assert_eq!(
        r["total_items"].as_u64(),
        Some(SLOTS),
        "one item per extent written: {r}"
    );
}

fn need_qemu() -> bool {
    if !have("qemu-io") || !have("qemu-img") {
        println!("skipped: qemu-io/qemu-img not found");
        return false;
    }
    true
}

#[test]
fn source_killed_mid_transfer_resumes_after_restart() {
    if !need_qemu() {
        return;
    }
    let mut rng = Rng::from_env("source_killed");
    let mut p = Pair::new();
    baseline(&p, &mut rng);
    p.round(&mut rng, "s1");
    // Kill A after a seeded checkpoint (2..=6 of 8).
    let k = CKPT_ITEMS * (2 + rng.next() % 4);
    let job = p.update_bg();
    let seen = wait_checkpoint(p.b(), k, &job);
    p.a.take().unwrap().kill();
    let o = job.join().unwrap();
    let e = failed_one_line(&o, "update while the source dies");
    println!("update cut by kill -9 of the source at checkpoint >= {seen}: {e}");
    let pos = ckpt_position(p.b()).expect("checkpoint kept after the cut");
    assert!(pos >= seen, "checkpoint went back: {pos} < {seen}");
    assert!(rel_status(p.b())["last_error"].is_string());
    // Same pool, same name, new port: the proxy points at it.
    let a = Pair::start_a(&p.a_pool, &p.a_args);
    p.proxy.set_upstream(&a.listen);
    p.a = Some(a);
    let r = p.update();
    assert_resumed(&r, pos, "incremental");
    assert_eq!(r["target"]["name"], "s1");
    assert!(rel_status(p.b())["checkpoint"].is_null());
    p.check_content("s1");
}

#[test]
fn destination_killed_during_the_baseline_resumes_it_after_restart() {
    if !need_qemu() {
        return;
    }
    let mut rng = Rng::from_env("destination_killed_baseline");
    let mut p = Pair::new();
    p.round(&mut rng, "s0");
    let k = CKPT_ITEMS * (2 + rng.next() % 5);
    let node = p.b().control.clone();
    let from = p.from();
    let job = std::thread::spawn(move || {
        sluice(&[
            "--node",
            &node,
            "mirror",
            "create",
            "v",
            "--from",
            &from,
            "--throttle",
            THROTTLE,
        ])
    });
    let seen = wait_checkpoint(p.b(), k, &job);
    p.b.take().unwrap().kill();
    let o = job.join().unwrap();
    failed_one_line(&o, "baseline while the destination dies");
    let b = Daemon::try_start(&p.b_pool, &["--name", "b"]).unwrap();
    p.b = Some(b);
    let st = rel_status(p.b());
    let pos = st["checkpoint"]["position"]
        .as_u64()
        .expect("baseline checkpoint");
    assert!(
        pos + CKPT_ITEMS >= seen && pos > 0,
        "durable {pos}, seen {seen}"
    );
    assert_eq!(st["full_transfers"].as_u64(), Some(0), "{st}");
    let r = p.update();
    assert_resumed(&r, pos, "full");
    p.check_content("s0");
}

/// SIGTERM (a clean stop) of either side mid-transfer: the daemon stops at
/// once and the next update resumes from the checkpoint.
#[test]
fn stopped_daemons_mid_transfer_resume_after_restart() {
    if !need_qemu() {
        return;
    }
    let mut rng = Rng::from_env("stopped_daemons");
    let mut p = Pair::new();
    baseline(&p, &mut rng);
    // The destination stops.
    p.round(&mut rng, "s1");
    let k = CKPT_ITEMS * (2 + rng.next() % 5);
    let job = p.update_bg();
    let seen = wait_checkpoint(p.b(), k, &job);
    let st = p.b.take().unwrap().term();
    assert!(st.success(), "destination exit on SIGTERM: {st:?}");
    failed_one_line(&job.join().unwrap(), "update while the destination stops");
    p.b = Some(Daemon::try_start(&p.b_pool, &["--name", "b"]).unwrap());
    let pos = ckpt_position(p.b()).expect("checkpoint after a clean stop");
    assert!(
        pos >= seen,
        "a clean stop keeps checkpoint {seen}, has {pos}"
    );
    assert_resumed(&p.update(), pos, "incremental");
    p.check_content("s1");
    // The source stops.
    p.round(&mut rng, "s2");
    let k = CKPT_ITEMS * (2 + rng.next() % 4);
    let job = p.update_bg();
    let seen = wait_checkpoint(p.b(), k, &job);
    let st = p.a.take().unwrap().term();
    assert!(st.success(), "source exit on SIGTERM: {st:?}");
    failed_one_line(&job.join().unwrap(), "update while the source stops");
    let pos = ckpt_position(p.b()).expect("checkpoint kept");
    assert!(pos >= seen, "checkpoint went back: {pos} < {seen}");
    let a = Pair::start_a(&p.a_pool, &p.a_args);
    p.proxy.set_upstream(&a.listen);
    p.a = Some(a);
    assert_resumed(&p.update(), pos, "incremental");
    p.check_content("s2");
}

#[test]
fn destination_killed_mid_transfer_resumes_after_restart() {
    if !need_qemu() {
        return;
    }
    let mut rng = Rng::from_env("destination_killed");
    let mut p = Pair::new();
    baseline(&p, &mut rng);
    p.round(&mut rng, "s1");
    let k = CKPT_ITEMS * (2 + rng.next() % 5);
    let job = p.update_bg();
    let seen = wait_checkpoint(p.b(), k, &job);
    p.b.take().unwrap().kill();
    let o = job.join().unwrap();
    let e = failed_one_line(&o, "update while the destination dies");
    println!("update cut by kill -9 of the destination at checkpoint >= {seen}: {e}");
    let b = Daemon::try_start(&p.b_pool, &["--name", "b"]).unwrap();
    p.b = Some(b);
    // Checkpoint `seen - 32` was flushed before `seen` was written.
    let pos = ckpt_position(p.b()).expect("checkpoint survives the kill");
    assert!(
        pos + CKPT_ITEMS >= seen && pos > 0,
        "durable checkpoint {pos}, seen {seen}"
    );
    let r = p.update();
    assert_resumed(&r, pos, "incremental");
    p.check_content("s1");
    // And the chain goes on incrementally.
    p.round(&mut rng, "s2");
    let r = p.update();
    assert_resumed(&r, 0, "incremental");
    p.check_content("s2");
}

#[test]
fn dropped_connections_resume_from_the_checkpoint() {
    if !need_qemu() {
        return;
    }
    let mut rng = Rng::from_env("dropped_connections");
    let p = Pair::new();
    let mb = 1u64 << 20;
    // (1) The baseline, cut after a checkpoint: `mirror create` fails, the
    // relationship and its checkpoint stay, `mirror update` resumes it.
    p.round(&mut rng, "s0");
    let n = 6 * mb + rng.next() % (22 * mb);
    p.proxy.arm(Fault::CutAfter(n));
    let o = p.create_mirror();
    let e = failed_one_line(&o, "baseline through a dropped connection");
    assert!(
        matches!(p.proxy.fired().last(), Some(Fired::Cut { bytes, .. }) if *bytes == n),
        "the cut did not fire: {:?}",
        p.proxy.fired()
    );
    println!("baseline cut after {n} bytes: {e}");
    let pos = ckpt_position(p.b()).expect("baseline checkpoint kept");
    assert!(pos >= CKPT_ITEMS, "cut after {n} bytes, checkpoint {pos}");
    let r = p.update();
    assert_resumed(&r, pos, "full");
    p.check_content("s0");

    // (2) An incremental, cut after a checkpoint.
    p.round(&mut rng, "s1");
    let n = 6 * mb + rng.next() % (24 * mb);
    p.proxy.arm(Fault::CutAfter(n));
    let o = p.b().cli(&["mirror", "update", "v", "--json"]);
    let e = failed_one_line(&o, "incremental through a dropped connection");
    println!("incremental cut after {n} bytes: {e}");
    let pos = ckpt_position(p.b()).expect("checkpoint kept");
    assert!(pos >= CKPT_ITEMS, "cut after {n} bytes, checkpoint {pos}");
    let st = rel_status(p.b());
    assert!(st["last_error"].is_string(), "{st}");
    assert_eq!(st["state"], "idle", "{st}");
    // A moves on meanwhile: the resume still finishes the interrupted
    // target first; the next update brings the newer snapshot.
    p.write_slots(&mut rng, 0..4);
    p.a().ok(&["snap", "create", "v", "s1b"]);
    let r = p.update();
    assert_resumed(&r, pos, "incremental");
    assert_eq!(r["target"]["name"], "s1", "{r}");
    p.check_content("s1");
    let r = p.update();
    assert_eq!(r["kind"], "incremental", "{r}");
    assert_eq!(r["base"]["name"], "s1", "{r}");
    assert_eq!(r["target"]["name"], "s1b", "{r}");
    p.check_content("s1b");

    // (3) Cut before the first checkpoint: nothing to resume from, the
    // transfer starts over and still matches.
    p.round(&mut rng, "s2");
    let n = 200 * 1024 + rng.next() % (2 * mb);
    p.proxy.arm(Fault::CutAfter(n));
    let o = p.b().cli(&["mirror", "update", "v", "--json"]);
    failed_one_line(&o, "incremental cut before its first checkpoint");
    assert_eq!(ckpt_position(p.b()), Some(0));
    let r = p.update();
    assert_resumed(&r, 0, "incremental");
    p.check_content("s2");
    let st = rel_status(p.b());
    assert_eq!(st["full_transfers"].as_u64(), Some(1), "{st}");
    assert_eq!(st["incremental_transfers"].as_u64(), Some(3), "{st}");
    assert!(st["last_error"].is_null(), "{st}");
}

/// A cut transfer whose target disappears upstream (force-deleted while
/// the destination waits to resume) is abandoned: the partial data it left
/// on the destination is undone before the next target is pulled. The
/// scenario makes that observable: the cut transfer wrote blocks that were
/// unmapped at the base and are unmapped again at the new target, so no
/// item of the new transfer covers them.
#[test]
fn abandoned_resume_target_is_undone_before_the_next_transfer() {
    if !need_qemu() {
        return;
    }
    let mut rng = Rng::from_env("abandoned_target");
    let p = Pair::new();
    let mb = 1u64 << 20;
    let half = SLOTS / 2;
    // s0: only the upper half is mapped.
    p.write_slots(&mut rng, half..SLOTS);
    p.a().ok(&["snap", "create", "v", "s0"]);
    let o = p.create_mirror();
    assert!(o.status.success(), "baseline: {}", stderr(&o));
    // s1 writes every slot; the lower half (fresh) goes first. Cut inside it,
    // after at least one checkpoint.
    p.round(&mut rng, "s1");
    let n = 5 * mb + rng.next() % (10 * mb);
    p.proxy.arm(Fault::CutAfter(n));
    let o = p.b().cli(&["mirror", "update", "v"]);
    let e = failed_one_line(&o, "update through a dropped connection");
    println!("cut after {n} bytes: {e}; {:?}", p.proxy.fired());
    let pos = ckpt_position(p.b()).expect("checkpoint");
    assert!(
        pos >= CKPT_ITEMS && pos < half,
        "cut after {n} bytes: checkpoint {pos}"
    );
    // The source keeps the interrupted target for the destination (once
    // its serving thread has noticed the dropped connection, the target is
    // no longer "in use", but still locked).
    let deadline = Instant::now() + DEADLINE;
    let e = loop {
        let o = p.a().cli(&["snap", "delete", "v", "s1"]);
        assert!(
            !o.status.success(),
            "A deleted the target of a cut transfer"
        );
        let e = stderr(&o);
        if !e.contains("in use by a running transfer") {
            break e;
        }
        assert!(Instant::now() < deadline, "A still serves the cut transfer");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        e.contains("transfer to b:v in progress"),
        "A's refusal names the interrupted transfer: {e}"
    );
    // Unmap the lower half again, snapshot, and force the target away.
    let disc = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-d", "unmap"])
        .arg(format!("nbd://{}/v", p.a().nbd))
        .args(["-c", &format!("discard 0 {}", half * SLOT_BYTES)])
        .output()
        .expect("run qemu-io");
    assert!(disc.status.success(), "discard: {}", stderr(&disc));
    p.a().ok(&["snap", "create", "v", "s2"]);
    p.a().ok(&["snap", "delete", "v", "s1", "--force"]);
    let r = p.update();
    assert_eq!(r["kind"], "incremental", "{r}");
    assert_eq!(r["base"]["name"], "s0", "{r}");
    assert_eq!(r["target"]["name"], "s2", "{r}");
    assert_eq!(r["resumed_from"].as_u64(), Some(0), "{r}");
    assert!(rel_status(p.b())["checkpoint"].is_null());
    p.check_content("s2");
    let live = read_export(&p.b().nbd, "v", p.dir.path());
    assert!(
        live[..(half * SLOT_BYTES) as usize].iter().all(|b| *b == 0),
        "partial data of the abandoned transfer survived on B"
    );
}
