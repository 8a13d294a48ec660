//! Every call the soak makes to a node's control API, and every run of the
//! `sluice` CLI (init included), in this one module: today each is
//! `sluice --node SOCKET ... [--json]` (the node's control socket), with a deadline. When the way the
//! CLI reaches a node changes (a Unix socket, a token for TCP), this is the
//! only file to adapt.
//!
//! Invariants: a call never outlives [`CALL_TIMEOUT`] (a stopped node
//! would hang the CLI); an error carries the command and the node's one-line
//! error text.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The longest a CLI call may take (a baseline of a small volume included).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(90);

/// The `sluice` binary the soak drives.
#[derive(Clone, Debug)]
pub struct Ctl {
    pub bin: PathBuf,
}

impl Ctl {
    /// Run the binary with `args`; stdout on success, else the error text.
    fn exec(&self, args: &[&str]) -> Result<String> {
        let (ok, out, err) = self.run(args)?;
        if !ok {
            bail!("sluice {}: {}", args.join(" "), err.trim());
        }
        Ok(out)
    }

    /// Run the binary with `args`: (exit status success, stdout, stderr).
    fn run(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let mut child = Command::new(&self.bin)
            .args(args)
            .env_remove("SLUICE_NODE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("run {}", self.bin.display()))?;
        let out_pipe = child.stdout.take();
        let err_pipe = child.stderr.take();
        let out_t = std::thread::spawn(move || read_all(out_pipe));
        let err_t = std::thread::spawn(move || read_all(err_pipe));
        let deadline = Instant::now() + CALL_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "sluice {}: no answer within {CALL_TIMEOUT:?}",
                    args.join(" ")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = out_t.join().unwrap_or_default();
        let err = err_t.join().unwrap_or_default();
        Ok((status.success(), out, err))
    }

    /// `sluice status --json`: the node's status, healthy or not (an
    /// unhealthy node exits non-zero after printing it).
    pub fn status(&self, node: &str) -> Result<Value> {
        let args = ["--node", node, "status", "--json"];
        let (_, out, err) = self.run(&args)?;
        serde_json::from_str(&out)
            .with_context(|| format!("sluice {args:?}: not JSON: {out} {}", err.trim()))
    }

    /// `sluice --node NODE ARGS --json`, parsed.
    pub fn json(&self, node: &str, args: &[&str]) -> Result<Value> {
        let mut all = vec!["--node", node];
        all.extend_from_slice(args);
        all.push("--json");
        let out = self.exec(&all)?;
        serde_json::from_str(&out).with_context(|| format!("sluice {all:?}: not JSON: {out}"))
    }

    /// `sluice --node NODE ARGS` for the commands without `--json`.
    pub fn text(&self, node: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["--node", node];
        all.extend_from_slice(args);
        self.exec(&all)
    }

    /// `sluice init PATH` (`--size` for a file that does not exist yet).
    pub fn init(&self, path: &Path, size: Option<&str>) -> Result<()> {
        let p = path.to_string_lossy().to_string();
        let mut args = vec!["init", p.as_str()];
        if let Some(s) = size {
            args.extend(["--size", s]);
        }
        self.exec(&args).map(drop)
    }

    /// The argument list of `sluice serve` (the process is the caller's).
    pub fn serve_command(&self, config: &Path) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("serve").arg("--config").arg(config);
        c
    }

    pub fn vol_create(&self, node: &str, vol: &str, size: &str) -> Result<()> {
        self.text(node, &["vol", "create", vol, "--size", size])
            .map(drop)
    }

    pub fn qtree_create(&self, node: &str, vol: &str, qtree: &str, size: &str) -> Result<()> {
        self.text(node, &["qtree", "create", vol, qtree, "--size", size])
            .map(drop)
    }

    pub fn vol_retain(&self, node: &str, vol: &str, keep: usize) -> Result<()> {
        let k = keep.to_string();
        self.text(node, &["vol", "retain", vol, "--keep", &k])
            .map(drop)
    }

    pub fn snap_create(&self, node: &str, vol: &str, name: &str) -> Result<Value> {
        self.json(node, &["snap", "create", vol, name])
    }

    /// `snap list VOL`, oldest first.
    pub fn snap_list(&self, node: &str, vol: &str) -> Result<Vec<Value>> {
        as_list(self.json(node, &["snap", "list", vol])?)
    }

    /// `mirror create DST --from SOURCE --every SECSs --keep KEEP
    /// [--follow]`.
    pub fn mirror_create(
        &self,
        node: &str,
        dst: &str,
        source: &str,
        every_secs: u64,
        keep: usize,
        follow: bool,
    ) -> Result<Value> {
        let every = format!("{every_secs}s");
        let k = keep.to_string();
        let mut args = vec![
            "mirror", "create", dst, "--from", source, "--every", &every, "--keep", &k,
        ];
        if follow {
            args.push("--follow");
        }
        self.json(node, &args)
    }

    pub fn mirror_status(&self, node: &str) -> Result<Vec<Value>> {
        as_list(self.json(node, &["mirror", "status"])?)
    }

    pub fn mirror_retarget(&self, node: &str, dst: &str, source: &str) -> Result<Value> {
        self.json(node, &["mirror", "retarget", dst, "--from", source])
    }

    pub fn lock_list(&self, node: &str) -> Result<Vec<Value>> {
        as_list(self.json(node, &["lock", "list"])?)
    }

    pub fn lock_add(&self, node: &str, vol: &str, snap: &str, owner: &str) -> Result<()> {
        self.text(node, &["lock", "add", vol, snap, "--owner", owner])
            .map(drop)
    }

    pub fn lock_release(&self, node: &str, vol: &str, snap: &str, holder: &str) -> Result<()> {
        self.text(node, &["lock", "release", vol, snap, "--holder", holder])
            .map(drop)
    }
}

fn read_all(p: Option<impl std::io::Read>) -> String {
    let mut s = String::new();
    if let Some(mut p) = p {
        let _ = p.read_to_string(&mut s);
    }
    s
}

fn as_list(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        other => bail!("expected a JSON list, got {other}"),
    }
}
