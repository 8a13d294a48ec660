//! End-to-end harness: real `sluice` processes on files in a temp folder,
//! real TCP on 127.0.0.1 for peers and NBD (ports chosen by the kernel: the
//! daemon is started with `:0` and prints the bound addresses on its
//! `ready` line), the control API on each node's Unix socket (`DATA.sock`).
//! Every daemon gets the shared test peer secret ([`test_secret`]) unless
//! its test chooses (`--peer-secret`, `--insecure-peers`, a `--config` that
//! sets either, or [`Daemon::try_start_exact`]), so the suite runs the
//! authenticated, encrypted peer path by default.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// Run `sluice ARGS` to completion.
pub fn sluice(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("SLUICE_NODE")
        .output()
        .expect("run sluice")
}

/// Format a pool file of `size` (e.g. "1G") at `dir/name`.
pub fn init_pool(dir: &Path, name: &str, size: &str) -> PathBuf {
    let path = dir.join(name);
    let out = sluice(&["init", path.to_str().unwrap(), "--size", size]);
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A running `sluice serve`.
pub struct Daemon {
    child: Option<Child>,
    pub data: PathBuf,
    /// The control socket's path (what `--node` is given).
    pub control: String,
    /// The peer address (`--listen`): mirror sources name it.
    pub listen: String,
    /// The TCP control address (`control_listen`), if configured.
    pub control_tcp: Option<String>,
    pub nbd: String,
    pub log: PathBuf,
}

impl Daemon {
    /// Start a daemon on `data` with control and NBD on free ports.
    pub fn start(data: &Path) -> Daemon {
        Self::try_start(data, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start with extra `serve` arguments (and the test peer secret unless
    /// they choose otherwise, see the module docs); `Err` with the daemon's
    /// stderr if it exits before it is ready.
    pub fn try_start(data: &Path, extra: &[&str]) -> Result<Daemon, String> {
        let secret = test_secret(data.parent().unwrap_or(Path::new(".")));
        let mut args = extra.to_vec();
        if !chooses_peer_mode(extra) {
            args.extend(["--peer-secret", secret.to_str().unwrap()]);
        }
        Self::try_start_exact(data, &args)
    }

    /// [`Self::try_start`] with exactly `extra`: no peer secret is added.
    pub fn try_start_exact(data: &Path, extra: &[&str]) -> Result<Daemon, String> {
        let log = data.with_extension(format!("log{}", std::process::id() ^ rand_u32()));
        let mut child = Command::new(BIN)
            .args(["serve", "--data", data.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0", "--nbd", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn sluice serve");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the daemon never blocks on stdout.
            let mut sink = String::new();
            while r.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(str::to_string)
        };
        match (field("control="), field("listen="), field("nbd=")) {
            (Some(control), Some(listen), Some(nbd)) if line.starts_with("ready") => Ok(Daemon {
                child: Some(child),
                data: data.to_path_buf(),
                control,
                listen,
                control_tcp: field("control_tcp=").filter(|a| a != "-"),
                nbd,
                log,
            }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "daemon did not start: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ))
            }
        }
    }

    /// A node named `name` on a fresh 256 MiB pool `dir/NAME.img`, with
    /// extra `serve` arguments.
    pub fn named(dir: &Path, name: &str, extra: &[&str]) -> Daemon {
        let pool = init_pool(dir, &format!("{name}.img"), "256M");
        let mut args = vec!["--name", name];
        args.extend_from_slice(extra);
        Daemon::try_start(&pool, &args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `ADDR/PATH` of this node: a mirror source.
    pub fn source(&self, path: &str) -> String {
        format!("{}/{path}", self.listen)
    }

    /// `mirror status` of the relationship with destination `dst`.
    pub fn mirror(&self, dst: &str) -> serde_json::Value {
        self.json(&["mirror", "status"])
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["dst"] == dst)
            .cloned()
            .unwrap_or_else(|| panic!("no relationship {dst}"))
    }

    /// A raw connection to the control API (the Unix socket).
    pub fn control_conn(&self) -> std::os::unix::net::UnixStream {
        std::os::unix::net::UnixStream::connect(&self.control)
            .unwrap_or_else(|e| panic!("connect to control socket {}: {e}", self.control))
    }

    /// `vol list`'s entry for volume `name`.
    pub fn vol(&self, name: &str) -> serde_json::Value {
        self.json(&["vol", "list"])
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no volume {name}"))
    }

    /// The names of `vol`'s snapshots, oldest first.
    pub fn snap_names(&self, vol: &str) -> Vec<String> {
        self.json(&["snap", "list", vol])
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// `sluice --node <this> ARGS`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut all = vec!["--node", self.control.as_str()];
        all.extend_from_slice(args);
        sluice(&all)
    }

    /// Like [`Self::cli`], asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(o.status.success(), "sluice {args:?} failed: {}", stderr(&o));
        stdout(&o)
    }

    /// `--json` output parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("json output")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// `GET /metrics` on the peer address, as an operator's scraper sees
    /// it (the body only).
    pub fn metrics_raw(&self) -> String {
        scrape(&self.listen)
    }

    /// [`Daemon::metrics_raw`] without the `node` label, so a test names a
    /// series by what it counts: `sluice_repl_locks{state="stale"} 0`.
    pub fn metrics(&self) -> String {
        without_node_label(&self.metrics_raw())
    }

    /// The value of the series `name` (with its labels, as
    /// [`Daemon::metrics`] shows them), if present.
    pub fn metric(&self, name: &str) -> Option<u64> {
        metric_value(&self.metrics(), name)
    }

    fn signal(&mut self, sig: i32) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        let sig = nix::sys::signal::Signal::try_from(sig).expect("signal number");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon did not exit after {sig}: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM; waits for the exit.
    pub fn term(mut self) -> ExitStatus {
        self.signal(15)
    }
    /// SIGINT; waits for the exit.
    pub fn int(mut self) -> ExitStatus {
        self.signal(2)
    }
    /// SIGKILL; waits for the exit.
    pub fn kill(mut self) -> ExitStatus {
        self.signal(9)
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What every test node proves to its peers unless its test chooses.
pub const TEST_PEER_SECRET: &str = "the sluice e2e tests' shared peer secret";

/// `dir/test-peer.secret`, holding [`TEST_PEER_SECRET`] (written once,
/// atomically, so daemons starting at once never read half a file).
pub fn test_secret(dir: &Path) -> PathBuf {
    let path = dir.join("test-peer.secret");
    if !path.exists() {
        let tmp = dir.join(format!("test-peer.secret.{}", rand_u32()));
        std::fs::write(&tmp, format!("{TEST_PEER_SECRET}\n")).expect("write the test peer secret");
        std::fs::rename(&tmp, &path).expect("rename the test peer secret");
    }
    path
}

/// `serve` arguments that say how peers authenticate: a secret, the
/// insecure mode, or a config file naming one of them.
fn chooses_peer_mode(extra: &[&str]) -> bool {
    let config_chooses = extra.windows(2).filter(|w| w[0] == "--config").any(|w| {
        let text = std::fs::read_to_string(w[1]).unwrap_or_default();
        text.contains("peer_secret") || text.contains("insecure_peers")
    });
    config_chooses
        || extra
            .iter()
            .any(|a| *a == "--peer-secret" || *a == "--insecure-peers")
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish() as u32
}

/// Is `prog` on PATH? Tests that need it print "skipped: ..." without it,
/// except where `SLUICE_REQUIRE_TOOLS` is set (CI): there a missing tool
/// fails the test, so nothing passes without having run.
/// `GET /metrics` of the node whose peer address is `listen`: the body.
pub fn scrape(listen: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(listen).expect("connect for /metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: sluice\r\n\r\n")
        .expect("send GET /metrics");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// Every series of an OpenMetrics text with its `node="..."` label taken
/// out (the first label, where the encoder puts it).
pub fn without_node_label(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("{node=\"") {
            Some(i) => {
                let rest = &l[i + 7..];
                let end = rest.find('"').map_or(0, |e| e + 1);
                let after = &rest[end..];
                match after.strip_prefix(',') {
                    Some(more) => format!("{}{{{more}", &l[..i]),
                    None => format!("{}{}", &l[..i], after.strip_prefix('}').unwrap_or(after)),
                }
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The value of the series `name` (labels included) in a metrics text.
pub fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

pub fn have(prog: &str) -> bool {
    sluice_testkit::tool(prog).is_some()
}

/// `qemu-io -f raw nbd://NBD/EXPORT -c CMD...`; panics with the output if
/// qemu-io reports a failure.
pub fn qemu_io(nbd: &str, export: &str, cmds: &[String]) -> String {
    try_qemu_io(nbd, export, cmds).unwrap_or_else(|e| panic!("{e}"))
}

/// [`qemu_io`], the failure returned (with qemu-io's output) instead.
pub fn try_qemu_io(nbd: &str, export: &str, cmds: &[String]) -> Result<String, String> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", &format!("nbd://{nbd}/{export}")]);
    if export.contains('@') {
        c.arg("-r");
    }
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let o = c.output().map_err(|e| format!("cannot run qemu-io: {e}"))?;
    let out = stdout(&o);
    if o.status.success() && !out.contains("failed") {
        return Ok(out);
    }
    Err(format!("qemu-io {export} {cmds:?}: {out}{}", stderr(&o)))
}

/// Every byte of an export, read by `qemu-img convert` through NBD.
pub fn read_export(nbd: &str, export: &str, scratch: &Path) -> Vec<u8> {
    let out = scratch.join(format!("export-{}.raw", rand_u32()));
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd://{nbd}/{export}"))
        .arg(&out)
        .output()
        .expect("run qemu-img");
    assert!(
        o.status.success(),
        "qemu-img convert {export}: {}",
        stderr(&o)
    );
    let bytes = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    bytes
}

/// How long [`wait_until`] polls before it fails the test.
pub const WAIT_DEADLINE: Duration = Duration::from_secs(60);

/// Poll `f` every 50 ms until it holds; fail naming `what` after
/// [`WAIT_DEADLINE`] (a correctness wait, not a timing assertion).
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_DEADLINE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `n` seeded 4 KiB pattern writes at random offsets of the first 8 MiB of
/// `export` through NBD; nothing without qemu-io (snapshots of an idle
/// volume serve the tests that use this just as well).
pub fn write_random_blocks(d: &Daemon, export: &str, n: usize, rng: &mut Rng) {
    if !have("qemu-io") {
        return;
    }
    let cmds: Vec<String> = (0..n)
        .map(|_| {
            format!(
                "write -P {} {} 4k",
                rng.next() % 250 + 1,
                (rng.next() % 2048) * 4096
            )
        })
        .collect();
    if let Err(e) = try_qemu_io(&d.nbd, export, &cmds) {
        // What the node said of it (an NBD error's cause is in its log).
        let log = d.log_text();
        let said: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        panic!("{e}\nthe node's warnings and errors:\n{}", said.join("\n"));
    }
}

/// The generator of a randomized test: `sluice_testkit`'s, from a printed
/// seed (`SLUICE_SEED` replays it).
pub struct Rng(pub rand::rngs::SmallRng);
impl Rng {
    pub fn from_env(test: &str) -> Rng {
        Rng(sluice_testkit::rng(sluice_testkit::seed(test)))
    }
    pub fn next(&mut self) -> u64 {
        rand::RngCore::next_u64(&mut self.0)
    }
}
