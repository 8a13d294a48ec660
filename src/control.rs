//! The control API: JSON lines over the node's control socket (a Unix
//! socket, root-only; see [`crate::auth`]), never over the peer port.
//!
//! One request object per line, answered by zero or more progress lines
//! (`{"progress": {...}}`, for long operations) and then exactly one final
//! line: `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.
//! A connection may carry many requests in turn. Request lines are
//! bounded ([`LINE_MAX`]); a longer line, bad JSON or an unknown op gets an
//! error response naming the problem, and the connection stays usable
//! (except after an over-long line, which closes it). Response lines are
//! bounded much higher ([`RESPONSE_LINE_MAX`]): a node's answer grows with
//! what it holds (`lock list` with 100,000 locks is about 30 MiB), and the
//! client reads it whole. Every op is listed in
//! `docs/CONTROL.md`.
//!
//! This module owns the bytes (request enum, response lines) and the client
//! side; [`crate::node::Node::execute`] gives the ops their meaning.

use crate::error::{NodeError, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Longest request line, in bytes (what a node accepts from a client).
pub const LINE_MAX: usize = 1 << 20;
/// Longest response line a client reads, in bytes: a node's answer is
/// bounded by what it holds, not by a request's size.
pub const RESPONSE_LINE_MAX: usize = 1 << 30;

/// Every control operation. The JSON form is internally tagged by `op`, e.g.
/// `{"op":"vol_create","name":"vol0","size_bytes":1073741824}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    VolCreate {
        name: String,
        size_bytes: u64,
    },
    VolList,
    /// A writable clone `name` of snapshot `origin@snapshot`: shares every
    /// block with it (copy-on-write, created at once whatever the size);
    /// the snapshot is held while the clone exists, and `vol delete NAME`
    /// ends the clone.
    VolClone {
        origin: String,
        snapshot: String,
        name: String,
    },
    /// Resize a volume's own space: grow always; shrink only when no image
    /// (live or snapshot) maps a block past the new end; refused on a
    /// mirror destination.
    VolResize {
        name: String,
        size_bytes: u64,
    },
    /// Delete a volume with its qtrees and snapshots; refused while a
    /// downstream pulls it or its snapshots are locked, unless `force`.
    VolDelete {
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// Retention by count: keep the newest `keep` snapshots of `volume`,
    /// applied by the node continuously; `null` ends the policy.
    VolRetain {
        volume: String,
        keep: Option<usize>,
    },
    /// Which peers may pull `volume` and lock its snapshots: node names,
    /// or `["*"]` for any authenticated peer; `null` drops the list (the
    /// node's default applies: open, or closed with `exports_required`).
    VolExport {
        volume: String,
        peers: Option<Vec<String>>,
    },
    /// Every volume's export list, and the node's default.
    VolExports,
    QtreeCreate {
        volume: String,
        name: String,
        size_bytes: u64,
    },
    SnapCreate {
        volume: String,
        name: String,
    },
    SnapList {
        volume: String,
    },
    SnapDelete {
        volume: String,
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// The live image of `volume` becomes snapshot `name`'s. Newer
    /// snapshots refuse it unless `destroy_newer` (they are deleted, each
    /// obeying its soft locks); NBD clients with the volume open for
    /// writing refuse it unless `force`; refused on a mirror destination.
    SnapRollback {
        volume: String,
        name: String,
        #[serde(default)]
        destroy_newer: bool,
        #[serde(default)]
        force: bool,
    },
    Prune {
        volume: String,
        keep: usize,
        #[serde(default)]
        dry_run: bool,
    },
    /// Changed extents of a volume (or qtree) between two snapshots.
    Diff {
        volume: String,
        #[serde(default)]
        qtree: Option<String>,
        #[serde(default)]
        base: Option<String>,
        target: String,
    },
    Status,
    /// Make `dst_volume` a mirror of `source` (`ADDR/VOL[/QTREE]`) and run
    /// the baseline transfer (progress lines while it runs).
    MirrorCreate {
        dst_volume: String,
        source: String,
        #[serde(default)]
        dst_qtree: Option<String>,
        #[serde(default)]
        every_secs: Option<u64>,
        /// Update as soon as the source has a new snapshot.
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        throttle_bps: Option<u64>,
        /// Retention on the destination volume.
        #[serde(default)]
        keep: Option<usize>,
    },
    MirrorUpdate {
        dst: String,
    },
    MirrorStatus,
    /// The downstream relationships that pull from this node.
    MirrorDestinations,
    MirrorBreak {
        dst: String,
    },
    MirrorResync {
        dst: String,
        /// Discard snapshots taken on the destination while broken.
        #[serde(default)]
        force: bool,
    },
    MirrorDelete {
        dst: String,
    },
    /// Point mirror `dst` at a new source (`ADDR/VOL[/QTREE]`), e.g. the
    /// node above a lost middle node, and update from it; refused without
    /// `allow_full` when they share no snapshot.
    MirrorRetarget {
        dst: String,
        source: String,
        #[serde(default)]
        allow_full: bool,
    },
    LockList,
    LockAdd {
        volume: String,
        snapshot: String,
        owner: String,
        #[serde(default)]
        text: Option<String>,
    },
    LockRelease {
        volume: String,
        snapshot: String,
        holder: String,
    },
}

impl ControlRequest {
    /// Whether the op destroys or gives up something (data, snapshots,
    /// locks, a relationship's protection): each is audited (logged with
    /// who asked, counted in metrics).
    pub fn destructive(&self) -> bool {
        match self {
            ControlRequest::SnapDelete { .. }
            | ControlRequest::SnapRollback { .. }
            | ControlRequest::VolDelete { .. }
            | ControlRequest::VolExport { .. }
            | ControlRequest::MirrorBreak { .. }
            | ControlRequest::MirrorDelete { .. }
            | ControlRequest::MirrorRetarget { .. }
            | ControlRequest::LockRelease { .. } => true,
            ControlRequest::Prune { dry_run, .. } => !dry_run,
            ControlRequest::MirrorResync { force, .. } => *force,
            _ => false,
        }
    }

    /// Whether the op may change the node's state: the node makes what it
    /// changed durable before it answers (`Node::execute`). Exhaustive, so
    /// a new op must say.
    pub fn changes_state(&self) -> bool {
        match self {
            ControlRequest::VolList
            | ControlRequest::VolExports
            | ControlRequest::SnapList { .. }
            | ControlRequest::Diff { .. }
            | ControlRequest::Status
            | ControlRequest::MirrorStatus
            | ControlRequest::MirrorDestinations
            | ControlRequest::LockList => false,
            ControlRequest::Prune { dry_run, .. } => !dry_run,
            ControlRequest::VolCreate { .. }
            | ControlRequest::VolClone { .. }
            | ControlRequest::VolResize { .. }
            | ControlRequest::VolDelete { .. }
            | ControlRequest::VolRetain { .. }
            | ControlRequest::VolExport { .. }
            | ControlRequest::QtreeCreate { .. }
            | ControlRequest::SnapCreate { .. }
            | ControlRequest::SnapDelete { .. }
            | ControlRequest::SnapRollback { .. }
            | ControlRequest::MirrorCreate { .. }
            | ControlRequest::MirrorUpdate { .. }
            | ControlRequest::MirrorBreak { .. }
            | ControlRequest::MirrorResync { .. }
            | ControlRequest::MirrorDelete { .. }
            | ControlRequest::MirrorRetarget { .. }
            | ControlRequest::LockAdd { .. }
            | ControlRequest::LockRelease { .. } => true,
        }
    }

    /// The op's wire name, for logs and metrics.
    pub fn op(&self) -> &'static str {
        match self {
            ControlRequest::VolCreate { .. } => "vol_create",
            ControlRequest::VolList => "vol_list",
            ControlRequest::VolClone { .. } => "vol_clone",
            ControlRequest::VolResize { .. } => "vol_resize",
            ControlRequest::VolDelete { .. } => "vol_delete",
            ControlRequest::VolRetain { .. } => "vol_retain",
            ControlRequest::VolExport { .. } => "vol_export",
            ControlRequest::VolExports => "vol_exports",
            ControlRequest::QtreeCreate { .. } => "qtree_create",
            ControlRequest::SnapCreate { .. } => "snap_create",
            ControlRequest::SnapList { .. } => "snap_list",
            ControlRequest::SnapDelete { .. } => "snap_delete",
            ControlRequest::SnapRollback { .. } => "snap_rollback",
            ControlRequest::Prune { .. } => "prune",
            ControlRequest::Diff { .. } => "diff",
            ControlRequest::Status => "status",
            ControlRequest::MirrorCreate { .. } => "mirror_create",
            ControlRequest::MirrorUpdate { .. } => "mirror_update",
            ControlRequest::MirrorStatus => "mirror_status",
            ControlRequest::MirrorDestinations => "mirror_destinations",
            ControlRequest::MirrorBreak { .. } => "mirror_break",
            ControlRequest::MirrorResync { .. } => "mirror_resync",
            ControlRequest::MirrorDelete { .. } => "mirror_delete",
            ControlRequest::MirrorRetarget { .. } => "mirror_retarget",
            ControlRequest::LockList => "lock_list",
            ControlRequest::LockAdd { .. } => "lock_add",
            ControlRequest::LockRelease { .. } => "lock_release",
        }
    }
}

/// Parse one request line; the error says what was wrong with it.
pub fn parse_request(line: &str) -> Result<ControlRequest> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| NodeError::BadRequest(format!("not a JSON object: {e}")))?;
    if !v.is_object() {
        return Err(NodeError::BadRequest("not a JSON object".into()));
    }
    match v.get("op") {
        None => return Err(NodeError::BadRequest("missing \"op\" field".into())),
        Some(Value::String(_)) => {}
        Some(_) => return Err(NodeError::BadRequest("\"op\" must be a string".into())),
    }
    serde_json::from_value(v).map_err(|e| NodeError::BadRequest(e.to_string()))
}

/// The final response line for a result.
pub fn response_line(result: &Result<Value>) -> String {
    let v = match result {
        Ok(r) => serde_json::json!({ "ok": true, "result": r }),
        Err(e) => serde_json::json!({ "ok": false, "error": e.to_string() }),
    };
    let mut s = v.to_string();
    s.push('\n');
    s
}

/// A progress line (not final).
pub fn progress_line(progress: &Value) -> String {
    let mut s = serde_json::json!({ "progress": progress }).to_string();
    s.push('\n');
    s
}

/// Read one `\n`-terminated line of at most [`LINE_MAX`] bytes. `Ok(None)`
/// at a clean end of stream.
pub fn read_line<R: BufRead>(r: &mut R) -> std::io::Result<Option<String>> {
    read_line_max(r, LINE_MAX)
}

/// [`read_line`] with its own bound, `max` bytes.
pub fn read_line_max<R: BufRead>(r: &mut R, max: usize) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r.take(max as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        if buf.len() > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line longer than {max} bytes"),
            ));
        }
        // End of stream without a newline: take what came.
    } else {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "line is not UTF-8"))
}

/// A client connection to a node's control API.
pub struct Client {
    addr: String,
    reader: BufReader<Box<dyn Read + Send>>,
    writer: Box<dyn Write + Send>,
}

impl Client {
    /// Connect to `addr`, failing within a few seconds: a Unix socket
    /// (`/path`, `./path` or `unix:/path`) or `HOST:PORT` (names resolve).
    pub fn connect(addr: &str) -> Result<Client> {
        Client::connect_as(addr, None)
    }

    /// Like [`Client::connect`], presenting `token` first (a TCP control
    /// API refuses every request without one; a Unix socket needs none).
    pub fn connect_as(addr: &str, token: Option<&crate::auth::Token>) -> Result<Client> {
        let mut c = Client::open(addr)?;
        if let Some(t) = token {
            if crate::auth::socket_path(addr).is_none() {
                c.present(t)?;
            }
        }
        Ok(c)
    }

    fn present(&mut self, token: &crate::auth::Token) -> Result<()> {
        let line = format!("{}\n", serde_json::json!({ "token": token.to_line() }));
        self.exchange(&line, &mut |_| {}).map(|_| ())
    }

    /// Write one line and wait for its final answer.
    fn exchange(&mut self, line: &str, on_progress: &mut dyn FnMut(&Value)) -> Result<Value> {
        let addr = self.addr.clone();
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| NodeError::Unreachable { addr, source })?;
        self.final_line(on_progress)
    }

    fn open(addr: &str) -> Result<Client> {
        let unreachable = |source| NodeError::Unreachable {
            addr: addr.to_string(),
            source,
        };
        if let Some(path) = crate::auth::socket_path(addr) {
            let stream = std::os::unix::net::UnixStream::connect(path).map_err(unreachable)?;
            let writer = stream.try_clone().map_err(unreachable)?;
            return Ok(Client {
                addr: addr.to_string(),
                reader: BufReader::new(Box::new(stream)),
                writer: Box::new(writer),
            });
        }
        let sockaddr = addr
            .to_socket_addrs()
            .map_err(unreachable)?
            .next()
            .ok_or_else(|| {
                unreachable(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "address resolves to nothing",
                ))
            })?;
        let stream =
            TcpStream::connect_timeout(&sockaddr, Duration::from_secs(5)).map_err(unreachable)?;
        let _ = stream.set_nodelay(true);
        let writer = stream.try_clone().map_err(unreachable)?;
        Ok(Client {
            addr: addr.to_string(),
            reader: BufReader::new(Box::new(stream)),
            writer: Box::new(writer),
        })
    }

    /// Send one request and wait for its final line; progress lines go to
    /// `on_progress`. A node-side error comes back as [`NodeError::Remote`].
    pub fn call_with_progress(
        &mut self,
        req: &ControlRequest,
        on_progress: &mut dyn FnMut(&Value),
    ) -> Result<Value> {
        let mut line = serde_json::to_string(req)
            .map_err(|e| NodeError::BadRequest(format!("cannot encode request: {e}")))?;
        line.push('\n');
        self.exchange(&line, on_progress)
    }

    fn final_line(&mut self, on_progress: &mut dyn FnMut(&Value)) -> Result<Value> {
        let addr = self.addr.clone();
        loop {
            let got = read_line_max(&mut self.reader, RESPONSE_LINE_MAX).map_err(|source| {
                NodeError::Unreachable {
                    addr: addr.clone(),
                    source,
                }
            })?;
            let Some(got) = got else {
                return Err(NodeError::NoAnswer { addr });
            };
            let bad = |reason: String| NodeError::BadAnswer {
                addr: addr.clone(),
                reason,
            };
            let v: Value = serde_json::from_str(&got).map_err(|e| bad(e.to_string()))?;
            if let Some(p) = v.get("progress") {
                on_progress(p);
                continue;
            }
            return match v.get("ok") {
                Some(Value::Bool(true)) => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
                Some(Value::Bool(false)) => Err(NodeError::Remote(
                    v.get("error")
                        .and_then(Value::as_str)
                        .unwrap_or("unspecified error")
                        .to_string(),
                )),
                _ => Err(bad("no \"ok\" field".into())),
            };
        }
    }

    pub fn call(&mut self, req: &ControlRequest) -> Result<Value> {
        self.call_with_progress(req, &mut |_| {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_errors_name_the_problem() {
        assert_eq!(
            parse_request(r#"{"op":"vol_create","name":"v","size_bytes":4096}"#).unwrap(),
            ControlRequest::VolCreate {
                name: "v".into(),
                size_bytes: 4096
            }
        );
        assert_eq!(
            parse_request(r#"{"op":"snap_delete","volume":"v","name":"s"}"#).unwrap(),
            ControlRequest::SnapDelete {
                volume: "v".into(),
                name: "s".into(),
                force: false
            }
        );
        assert_eq!(
            parse_request(r#"{"op":"vol_clone","origin":"v","snapshot":"s","name":"c"}"#).unwrap(),
            ControlRequest::VolClone {
                origin: "v".into(),
                snapshot: "s".into(),
                name: "c".into()
            }
        );
        assert_eq!(
            parse_request(r#"{"op":"vol_resize","name":"v","size_bytes":8192}"#).unwrap(),
            ControlRequest::VolResize {
                name: "v".into(),
                size_bytes: 8192
            }
        );
        assert_eq!(
            parse_request(r#"{"op":"snap_rollback","volume":"v","name":"s","destroy_newer":true}"#)
                .unwrap(),
            ControlRequest::SnapRollback {
                volume: "v".into(),
                name: "s".into(),
                destroy_newer: true,
                force: false
            }
        );
        let cases = [
            (r#"{"op":"vol_resize","name":"v"}"#, "size_bytes"),
            (r#"{"op":"vol_clone","origin":"v","name":"c"}"#, "snapshot"),
            (r#"{"op":"snap_rollback","volume":"v"}"#, "name"),
            ("nope", "not a JSON object"),
            ("[1]", "not a JSON object"),
            (r#"{"name":"v"}"#, "missing \"op\""),
            (r#"{"op":7}"#, "must be a string"),
            (r#"{"op":"explode"}"#, "explode"),
            (r#"{"op":"vol_create","name":"v"}"#, "size_bytes"),
            (r#"{"op":"vol_create","name":"v","size_bytes":-1}"#, "-1"),
        ];
        for (line, want) in cases {
            let e = parse_request(line).unwrap_err().to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn every_op_round_trips() {
        let reqs = [
            ControlRequest::VolList,
            ControlRequest::Status,
            ControlRequest::Prune {
                volume: "v".into(),
                keep: 2,
                dry_run: true,
            },
            ControlRequest::Diff {
                volume: "v".into(),
                qtree: Some("q".into()),
                base: None,
                target: "s".into(),
            },
        ];
        for r in reqs {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(parse_request(&line).unwrap(), r);
            assert!(line.contains(&format!("\"op\":\"{}\"", r.op())));
        }
    }

    #[test]
    fn long_lines_are_refused() {
        let long = vec![b'x'; LINE_MAX + 10];
        let mut r = std::io::Cursor::new(long);
        assert!(read_line(&mut r).is_err());
        let mut r = std::io::Cursor::new(b"{}\n{\"a\":1}".to_vec());
        assert_eq!(read_line(&mut r).unwrap().unwrap(), "{}");
        assert_eq!(read_line(&mut r).unwrap().unwrap(), "{\"a\":1}");
        assert_eq!(read_line(&mut r).unwrap(), None);
    }
}
