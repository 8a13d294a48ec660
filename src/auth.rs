//! Who may run control operations, and where the control API listens.
//!
//! Owns the control socket: its default path (derived from the pool's
//! path, [`default_socket`]), binding it root-only ([`bind_control_socket`]:
//! the socket file is created under umask 0177 and then set to 0600, so no
//! other user can ever connect), the CLI's choice between a Unix socket and
//! a TCP address ([`socket_path`]), and naming who asked ([`unix_peer`]: the
//! kernel's SO_PEERCRED uid and pid, for the audit log), and the tokens a
//! TCP control client must present ([`Token`]: `sluice token create`
//! writes one, the node's `control_tokens` names the files it accepts),
//! and the peer secret files `sluice secret create` writes
//! ([`create_peer_secret`]).
//!
//! Invariants: the control API is never served on the peer port; on TCP
//! no request runs before the connection's first line presented a token
//! the node accepts, compared in constant time over every accepted token
//! (no early exit on the first byte that differs, nor on the first token
//! that matches); a socket
//! file left by a dead node is replaced, one that a live node answers on is
//! refused (two nodes never share one control socket).

use crate::error::{NodeError, Result};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Where control sockets of nodes on block devices live.
pub const RUN_DIR: &str = "/run/sluice";

/// The control socket a node on `data` listens on when none is configured:
/// `DATA.sock` next to a pool file, `/run/sluice/NAME.sock` for a pool on
/// a device (`/dev/sdb` -> `/run/sluice/sdb.sock`).
pub fn default_socket(data: &Path) -> PathBuf {
    let on_device = std::fs::metadata(data).is_ok_and(|m| !m.is_file());
    match data.file_name() {
        Some(name) if on_device => {
            Path::new(RUN_DIR).join(format!("{}.sock", name.to_string_lossy()))
        }
        _ => PathBuf::from(format!("{}.sock", data.display())),
    }
}

/// `addr` as a Unix socket path, if it names one: `unix:/path`, or a path
/// (starting with `/` or `.`); `HOST:PORT` is not one.
pub fn socket_path(addr: &str) -> Option<&Path> {
    if let Some(p) = addr.strip_prefix("unix:") {
        return Some(Path::new(p));
    }
    (addr.starts_with('/') || addr.starts_with('.')).then(|| Path::new(addr))
}

/// The control socket the CLI uses when no `--node` is given: the only
/// socket in [`RUN_DIR`], if there is exactly one.
pub fn find_default_socket() -> Result<PathBuf> {
    let socks: Vec<PathBuf> = std::fs::read_dir(RUN_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    match socks.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(NodeError::Invalid(format!(
            "no node control socket in {RUN_DIR}: give --node <SOCKET or HOST:PORT> (a node on a pool file listens on FILE.sock) or set SLUICE_NODE"
        ))),
        many => Err(NodeError::Invalid(format!(
            "{} control sockets in {RUN_DIR} ({}): give --node <SOCKET>",
            many.len(),
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Bind the control socket at `path`, readable and writable by its owner
/// (root) only. A stale socket file (nobody answers) is replaced.
pub fn bind_control_socket(path: &Path) -> Result<UnixListener> {
    let io = |what: &str| NodeError::io(format!("{what} control socket {}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if dir == Path::new(RUN_DIR) {
            std::fs::create_dir_all(dir).map_err(io("creating the folder of the"))?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(NodeError::Invalid(format!(
                "control socket {} is in use by a running node; give this node another (--control-socket)",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(io("removing the stale"))?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(io("binding the"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("restricting the"))?;
    Ok(listener)
}

/// Who is on the other end of a control socket connection, as the kernel
/// says (SO_PEERCRED): `uid=U pid=P`.
pub fn unix_peer(stream: &UnixStream) -> String {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given,
    // and the fd is open for the life of `stream`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        format!("uid={} pid={}", cred.uid, cred.pid)
    } else {
        "uid=? pid=?".into()
    }
}

/// Bytes of randomness in a token's secret.
pub const TOKEN_SECRET_BYTES: usize = 32;

/// A control credential: `NAME:HEX` in a file (one line), where NAME says
/// who holds it (the audit log names it) and HEX is the secret.
#[derive(Clone)]
pub struct Token {
    pub name: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({:?}, secret hidden)", self.name)
    }
}

fn valid_token_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
}

impl Token {
    /// Parse `NAME:HEX` (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Option<Token> {
        let (name, hex) = text.trim().split_once(':')?;
        if !valid_token_name(name) || hex.len() != 2 * TOKEN_SECRET_BYTES {
            return None;
        }
        let secret = (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|b| u8::from_str_radix(b, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()?;
        Some(Token {
            name: name.to_string(),
            secret,
        })
    }

    /// The one line a token file holds.
    pub fn to_line(&self) -> String {
        let hex: String = self.secret.iter().map(|b| format!("{b:02x}")).collect();
        format!("{}:{hex}", self.name)
    }

    /// Read a token file (`sluice token create` wrote it).
    pub fn read_file(path: &Path) -> Result<Token> {
        let text = std::fs::read_to_string(path).map_err(NodeError::io(format!(
            "reading token file {}",
            path.display()
        )))?;
        Token::parse(&text).ok_or_else(|| {
            NodeError::Invalid(format!(
                "token file {} does not hold NAME:HEX ({} hex digits); make one with `sluice token create NAME --out FILE`",
                path.display(),
                2 * TOKEN_SECRET_BYTES
            ))
        })
    }

    /// A new token named `name` from the kernel's randomness, written to
    /// `out` with mode 0600 (refused if `out` exists).
    pub fn create(name: &str, out: &Path) -> Result<Token> {
        if !valid_token_name(name) {
            return Err(NodeError::Invalid(format!(
                "token name {name:?}: 1 to 64 of A-Z a-z 0-9 - _ . @"
            )));
        }
        let token = Token {
            name: name.to_string(),
            secret: random_bytes(TOKEN_SECRET_BYTES)?,
        };
        write_new_secret_file(out, "token file", &token.to_line())?;
        Ok(token)
    }
}

/// Bytes of randomness in a peer secret [`create_peer_secret`] writes.
pub const PEER_SECRET_BYTES: usize = 32;

/// Write a new peer secret to `out`: [`PEER_SECRET_BYTES`] from
/// /dev/urandom as hex on one line, mode 0600, refused if `out` exists
/// (its folder is created, mode 0700, if missing).
pub fn create_peer_secret(out: &Path) -> Result<()> {
    let secret = random_bytes(PEER_SECRET_BYTES)?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(NodeError::io(format!(
                "creating the folder of peer secret file {}",
                out.display()
            )))?;
    }
    write_new_secret_file(out, "peer secret file", &hex)
}

/// `n` bytes from the kernel's randomness.
fn random_bytes(n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(NodeError::io("reading /dev/urandom"))?;
    Ok(b)
}

/// Write `line` to a new file `out` (mode 0600, refused if it exists),
/// synced before this returns; `what` names it in errors.
fn write_new_secret_file(out: &Path, what: &str, line: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(NodeError::io(format!("creating {what} {}", out.display())))?;
    writeln!(f, "{line}")
        .and_then(|_| f.sync_all())
        .map_err(NodeError::io(format!("writing {what} {}", out.display())))
}

/// Equal in time independent of where `a` and `b` differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(diff) == 0
}

/// The name of the accepted token `presented` is (`NAME:HEX`), if any:
/// every accepted token is compared, in constant time each.
pub fn check_token<'a>(accepted: &'a [Token], presented: &str) -> Option<&'a str> {
    let p = Token::parse(presented)?;
    let mut found = None;
    for t in accepted {
        let same = ct_eq(&t.secret, &p.secret) & (t.name == p.name);
        if same {
            found = Some(t.name.as_str());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_or_tcp() {
        assert_eq!(socket_path("unix:/a/b"), Some(Path::new("/a/b")));
        assert_eq!(socket_path("/a/b.sock"), Some(Path::new("/a/b.sock")));
        assert_eq!(socket_path("./x.sock"), Some(Path::new("./x.sock")));
        assert_eq!(socket_path("localhost:7000"), None);
        assert_eq!(socket_path("127.0.0.1:7000"), None);
    }

    #[test]
    fn tokens_round_trip_and_only_the_right_one_passes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ops.token");
        let t = Token::create("ops", &f).unwrap();
        assert!(Token::create("ops", &f).is_err(), "overwrote a token file");
        let meta = std::fs::metadata(&f).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let back = Token::read_file(&f).unwrap();
        assert_eq!(back.to_line(), t.to_line());
        let accepted = vec![back];
        assert_eq!(check_token(&accepted, &t.to_line()), Some("ops"));
        let mut wrong = t.to_line();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert_eq!(check_token(&accepted, &wrong), None);
        assert_eq!(check_token(&accepted, "ops:00"), None);
        assert_eq!(check_token(&accepted, "garbage"), None);
        assert!(Token::create("bad name", &dir.path().join("x")).is_err());
    }

    #[test]
    fn a_peer_secret_file_is_private_random_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let (f, g) = (dir.path().join("a.secret"), dir.path().join("b.secret"));
        create_peer_secret(&f).unwrap();
        create_peer_secret(&g).unwrap();
        assert!(create_peer_secret(&f).is_err(), "overwrote a secret file");
        let meta = std::fs::metadata(&f).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let (a, b) = (
            std::fs::read_to_string(&f).unwrap(),
            std::fs::read_to_string(&g).unwrap(),
        );
        assert_eq!(a.trim().len(), 2 * PEER_SECRET_BYTES);
        assert_ne!(a, b, "two secrets are the same");
    }

    #[test]
    fn default_next_to_a_pool_file() {
        assert_eq!(
            default_socket(Path::new("/tmp/nonexistent-x/p.img")),
            PathBuf::from("/tmp/nonexistent-x/p.img.sock")
        );
    }
}
