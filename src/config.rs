//! `sluice serve` settings: from the command line, from a TOML file
//! (`--config`), or both (the command line wins). Unknown keys in the file
//! are errors, so a typo is never silently ignored.
//!
//! ```toml
//! data = "/dev/loop0"          # pool device or file (sluice init first)
//! listen = "127.0.0.1:7000"    # peers and /metrics (never the control API)
//! control_socket = "/run/sluice/a.sock"  # control API (Unix, 0600); default DATA.sock
//! control_listen = "10.0.0.1:7001"        # control API on TCP too (off by default) ...
//! control_tokens = ["/etc/sluice/ops.token"]  # ... for clients presenting one of these
//! nbd = "127.0.0.1:10809"      # NBD exports (optional)
//! name = "node-a"              # node name, stored in the pool at first start
//! checkpoint_interval_ms = 5000
//! direct_io = true
//! pin_shards = true            # pin engine shard i to core i (pools of several shards)
//! peer_secret = "/etc/sluice/secret"  # peers prove it (HMAC), then Noise-encrypted
//! peer_secrets = { node-b = "/etc/sluice/ab.secret" }  # one secret per peer (its identity)
//! max_locks_per_peer = 262144  # locks one downstream node may hold here, all its sets
//! exports_required = false     # true: peers pull only volumes `vol export`ed to them (default: true with peer_secrets)
//! insecure_peers = false       # true: no secret, any peer, clear text (trusted networks)
//! throttle = "100M"            # node-wide replication receive rate, bytes/s
//! lease_ms = 60000             # lease on the lock sets this node sends
//! lease_policy = "keep"        # stale locks: "keep" (report) or "release"
//! lease_grace_ms = 60000       # with "release": how long after going stale
//! checkpoint_items = 8192      # transfers served here: a resume point every N items
//! checkpoint_bytes = 67108864  # ... or every N payload bytes, whichever first
//! max_transfers = 4            # scheduled (`--every`) transfers at once, 1..=64
//! retention = { vol0 = 24 }    # keep the newest N snapshots of a volume
//! control_timeout_ms = 300000  # a control connection's wait for one request line
//! peer_timeout_ms = 30000      # peer sockets: per read/write, and the whole handshake
//! ```

use crate::error::{NodeError, Result};
use crate::units::parse_rate;
use serde::Deserialize;
use sluice_replicator::transfer::CheckpointPolicy;
use sluice_replicator::{LeasePolicy, TRANSFERS_MAX};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub data: Option<PathBuf>,
    pub listen: Option<String>,
    pub control_socket: Option<PathBuf>,
    pub control_listen: Option<String>,
    pub control_tokens: Option<Vec<PathBuf>>,
    pub nbd: Option<String>,
    pub name: Option<String>,
    pub checkpoint_interval_ms: Option<u64>,
    pub direct_io: Option<bool>,
    pub pin_shards: Option<bool>,
    pub peer_secret: Option<PathBuf>,
    pub peer_secrets: Option<BTreeMap<String, PathBuf>>,
    pub max_locks_per_peer: Option<usize>,
    pub exports_required: Option<bool>,
    pub insecure_peers: Option<bool>,
    pub throttle: Option<String>,
    pub lease_ms: Option<u64>,
    pub lease_policy: Option<String>,
    pub lease_grace_ms: Option<u64>,
    pub checkpoint_items: Option<u64>,
    pub checkpoint_bytes: Option<u64>,
    pub max_transfers: Option<usize>,
    pub retention: Option<BTreeMap<String, usize>>,
    pub control_timeout_ms: Option<u64>,
    pub peer_timeout_ms: Option<u64>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let err = |reason: String| NodeError::Config {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        toml::from_str(&text).map_err(|e| err(e.to_string().replace('\n', " ")))
    }
}

/// Everything `serve` needs, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    pub data: PathBuf,
    /// Peers (and /metrics); the control API is never served here.
    pub listen: String,
    /// The control API's Unix socket (root-only).
    pub control_socket: PathBuf,
    /// The control API on TCP, for clients with a token; off when `None`.
    pub control_listen: Option<String>,
    /// Token files whose tokens the TCP control API accepts.
    pub control_tokens: Vec<PathBuf>,
    pub nbd: Option<String>,
    /// Node name; `None`: the one stored in the pool (or a new random one).
    pub name: Option<String>,
    pub checkpoint_interval: Duration,
    pub direct_io: bool,
    /// Pin engine shard `i` to core `i % ncpus` (pools of several shards).
    pub pin_shards: bool,
    /// The file of the secret peers prove; without it (and without
    /// `insecure_peers`) the node refuses every peer.
    pub peer_secret: Option<PathBuf>,
    /// Files of the secrets shared with one peer each, by node name: that
    /// peer proves its own secret (its identity) instead of `peer_secret`.
    pub peer_secrets: BTreeMap<String, PathBuf>,
    /// Locks one downstream node may hold here over all its sets.
    pub max_locks_per_peer: Option<usize>,
    /// Peers pull only volumes exported to them (`vol export`).
    pub exports_required: bool,
    /// The operator's explicit insecure mode: no secret, any peer, clear text.
    pub insecure_peers: bool,
    pub throttle_bps: Option<u64>,
    pub lease_ms: Option<u64>,
    pub lease_policy: LeasePolicy,
    /// Demonstration switch: soft locks are not propagated.
    pub propagate_locks: bool,
    /// Resume points of the transfers this node serves.
    pub checkpoint: CheckpointPolicy,
    /// Scheduled transfers running at once.
    pub max_transfers: usize,
    /// Retention by count per volume, set at start (over what the pool
    /// keeps from `vol retain`).
    pub retention: BTreeMap<String, usize>,
    /// How long a control connection may take to send one request line
    /// (idle time between requests included) before it is closed.
    pub control_timeout: Duration,
    /// Peer sockets: each read and write, and a whole handshake.
    pub peer_timeout: Duration,
}

/// Flags of `serve` that override the file.
#[derive(Debug, Default, Clone)]
pub struct ServeFlags {
    pub data: Option<PathBuf>,
    pub listen: Option<String>,
    pub control_socket: Option<PathBuf>,
    pub nbd: Option<String>,
    pub name: Option<String>,
    pub peer_secret: Option<PathBuf>,
    pub insecure_peers: bool,
    pub throttle: Option<String>,
    pub max_transfers: Option<usize>,
    pub no_lock_propagation: bool,
}

impl ServeConfig {
    /// Merge command-line values over the file's.
    pub fn resolve(file: ConfigFile, flags: ServeFlags) -> Result<ServeConfig> {
        let ServeFlags {
            data,
            listen,
            control_socket,
            nbd,
            name,
            peer_secret,
            insecure_peers,
            throttle,
            max_transfers,
            no_lock_propagation,
        } = flags;
        let peer_secret = peer_secret.or(file.peer_secret);
        let insecure_peers = insecure_peers || file.insecure_peers.unwrap_or(false);
        if let (Some(p), true) = (&peer_secret, insecure_peers) {
            return Err(NodeError::Invalid(format!(
                "both peer_secret ({}) and insecure_peers are set: choose one (a secret authenticates and encrypts peers; insecure_peers accepts any peer in clear text)",
                p.display()
            )));
        }
        let peer_secrets = file.peer_secrets.clone().unwrap_or_default();
        // Authorization where names are proven: with one secret per peer a
        // peer pulls only what is exported to it; with a shared secret any
        // holder can claim any name, so export lists are opt-in.
        let exports_required = file.exports_required.unwrap_or(!peer_secrets.is_empty());
        if insecure_peers && !peer_secrets.is_empty() {
            return Err(NodeError::Invalid(
                "both peer_secrets and insecure_peers are set: choose one (secrets authenticate and encrypt peers; insecure_peers accepts any peer in clear text)".into(),
            ));
        }
        if let Some(n) = peer_secrets
            .keys()
            .find(|n| n.is_empty() || n.len() > sluice_replicator::conn::NODE_NAME_MAX)
        {
            return Err(NodeError::Invalid(format!(
                "peer_secrets: node name {n:?} must be 1 to {} bytes",
                sluice_replicator::conn::NODE_NAME_MAX
            )));
        }
        if file.max_locks_per_peer == Some(0) {
            return Err(NodeError::Invalid(
                "max_locks_per_peer must be at least 1".into(),
            ));
        }
        let max_transfers = max_transfers.or(file.max_transfers).unwrap_or(4);
        if !(1..=TRANSFERS_MAX).contains(&max_transfers) {
            return Err(NodeError::Invalid(format!(
                "max_transfers {max_transfers} must be 1..={TRANSFERS_MAX}"
            )));
        }
        let throttle_bps = match throttle.or(file.throttle) {
            Some(t) => Some(parse_rate(&t)?),
            None => None,
        };
        let lease_policy = match file.lease_policy.as_deref() {
            None | Some("keep") => LeasePolicy::Keep,
            Some("release") => LeasePolicy::ReleaseAfter {
                grace_ms: file.lease_grace_ms.unwrap_or(60_000),
            },
            Some(other) => {
                return Err(NodeError::Invalid(format!(
                    "lease_policy {other:?}: use \"keep\" or \"release\""
                )))
            }
        };
        if file.lease_ms == Some(0) {
            return Err(NodeError::Invalid(
                "lease_ms must be greater than zero".into(),
            ));
        }
        if file.checkpoint_items == Some(0) || file.checkpoint_bytes == Some(0) {
            return Err(NodeError::Invalid(
                "checkpoint_items and checkpoint_bytes must be greater than zero".into(),
            ));
        }
        let dflt = CheckpointPolicy::default();
        let checkpoint = CheckpointPolicy {
            every_items: file.checkpoint_items.unwrap_or(dflt.every_items),
            every_bytes: file.checkpoint_bytes.unwrap_or(dflt.every_bytes),
        };
        let data = data.or(file.data).ok_or_else(|| {
            NodeError::Invalid("serve needs --data <PATH> (or `data` in the config file)".into())
        })?;
        let listen = listen.or(file.listen).ok_or_else(|| {
            NodeError::Invalid(
                "serve needs --listen <ADDR> (or `listen` in the config file)".into(),
            )
        })?;
        let retention = file.retention.unwrap_or_default();
        if let Some((v, _)) = retention.iter().find(|(_, k)| **k == 0) {
            return Err(NodeError::Invalid(format!(
                "retention for volume {v:?} must keep at least 1 snapshot"
            )));
        }
        let control_ms = file.control_timeout_ms.unwrap_or(300_000);
        let peer_ms = file.peer_timeout_ms.unwrap_or(30_000);
        if control_ms == 0 || peer_ms == 0 {
            return Err(NodeError::Invalid(
                "control_timeout_ms and peer_timeout_ms must be greater than zero".into(),
            ));
        }
        let cp_ms = file.checkpoint_interval_ms.unwrap_or(5000);
        if cp_ms == 0 {
            return Err(NodeError::Invalid(
                "checkpoint_interval_ms must be greater than zero".into(),
            ));
        }
        let control_socket = control_socket
            .or(file.control_socket)
            .unwrap_or_else(|| crate::auth::default_socket(&data));
        let control_tokens = file.control_tokens.unwrap_or_default();
        if file.control_listen.is_some() && control_tokens.is_empty() {
            return Err(NodeError::Invalid(
                "control_listen needs control_tokens (files made by `sluice token create NAME --out FILE`): the TCP control API never runs without a credential".into(),
            ));
        }
        Ok(ServeConfig {
            name: name.or(file.name),
            data,
            listen,
            control_socket,
            control_listen: file.control_listen,
            control_tokens,
            nbd: nbd.or(file.nbd),
            checkpoint_interval: Duration::from_millis(cp_ms),
            direct_io: file.direct_io.unwrap_or(true),
            pin_shards: file.pin_shards.unwrap_or(true),
            peer_secret,
            peer_secrets,
            max_locks_per_peer: file.max_locks_per_peer,
            exports_required,
            insecure_peers,
            throttle_bps,
            lease_ms: file.lease_ms,
            lease_policy,
            propagate_locks: !no_lock_propagation,
            checkpoint,
            max_transfers,
            retention,
            control_timeout: Duration::from_millis(control_ms),
            peer_timeout: Duration::from_millis(peer_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags() {
        let f: ConfigFile = toml::from_str(
            "data = \"/tmp/p\"\nlisten = \"127.0.0.1:1\"\nnbd = \"127.0.0.1:2\"\ncheckpoint_interval_ms = 100\n",
        )
        .unwrap();
        let c = ServeConfig::resolve(f.clone(), ServeFlags::default()).unwrap();
        assert_eq!(c.name, None);
        assert_eq!(c.nbd.as_deref(), Some("127.0.0.1:2"));
        assert_eq!(c.checkpoint_interval, Duration::from_millis(100));
        let flags = ServeFlags {
            listen: Some("127.0.0.1:3".into()),
            name: Some("a".into()),
            ..ServeFlags::default()
        };
        let c = ServeConfig::resolve(f, flags).unwrap();
        assert_eq!(
            (c.listen.as_str(), c.name.as_deref()),
            ("127.0.0.1:3", Some("a"))
        );
    }

    #[test]
    fn typos_and_gaps_are_errors() {
        assert!(toml::from_str::<ConfigFile>("lisen = \"x\"").is_err());
        let e = ServeConfig::resolve(ConfigFile::default(), ServeFlags::default()).unwrap_err();
        assert!(e.to_string().contains("--data"));
    }

    #[test]
    fn peers_need_a_secret_or_the_explicit_insecure_mode_not_both() {
        let base = "data = \"/p\"\nlisten = \"x\"\n";
        let f: ConfigFile = toml::from_str(base).unwrap();
        let c = ServeConfig::resolve(f, ServeFlags::default()).unwrap();
        assert_eq!((c.peer_secret.as_deref(), c.insecure_peers), (None, false));
        let f: ConfigFile = toml::from_str(&format!("{base}insecure_peers = true\n")).unwrap();
        assert!(
            ServeConfig::resolve(f.clone(), ServeFlags::default())
                .unwrap()
                .insecure_peers
        );
        let flags = ServeFlags {
            peer_secret: Some("/s".into()),
            ..ServeFlags::default()
        };
        let e = ServeConfig::resolve(f, flags.clone()).unwrap_err();
        assert!(e.to_string().contains("choose one"), "{e}");
        let f: ConfigFile = toml::from_str(base).unwrap();
        let flags = ServeFlags {
            insecure_peers: true,
            ..flags
        };
        assert!(ServeConfig::resolve(f, flags).is_err());
    }

    #[test]
    fn checkpoint_policy_from_the_file() {
        let f: ConfigFile =
            toml::from_str("data = \"/p\"\nlisten = \"x\"\ncheckpoint_items = 32\n").unwrap();
        let c = ServeConfig::resolve(f, ServeFlags::default()).unwrap();
        assert_eq!(c.checkpoint.every_items, 32);
        assert_eq!(
            c.checkpoint.every_bytes,
            CheckpointPolicy::default().every_bytes
        );
        let f: ConfigFile = toml::from_str("checkpoint_bytes = 0\n").unwrap();
        assert!(ServeConfig::resolve(f, ServeFlags::default()).is_err());
    }

    #[test]
    fn max_transfers_from_the_file_or_the_flag() {
        let base = "data = \"/p\"\nlisten = \"x\"\n";
        let f: ConfigFile = toml::from_str(base).unwrap();
        let c = ServeConfig::resolve(f, ServeFlags::default()).unwrap();
        assert_eq!(c.max_transfers, 4, "default");
        let f: ConfigFile = toml::from_str(&format!("{base}max_transfers = 2\n")).unwrap();
        let c = ServeConfig::resolve(f.clone(), ServeFlags::default()).unwrap();
        assert_eq!(c.max_transfers, 2);
        let flags = ServeFlags {
            max_transfers: Some(7),
            ..ServeFlags::default()
        };
        assert_eq!(ServeConfig::resolve(f, flags).unwrap().max_transfers, 7);
        for bad in [0, TRANSFERS_MAX + 1] {
            let f: ConfigFile = toml::from_str(&format!("{base}max_transfers = {bad}\n")).unwrap();
            let e = ServeConfig::resolve(f, ServeFlags::default()).unwrap_err();
            assert!(e.to_string().contains("max_transfers"), "{e}");
        }
    }

    #[test]
    fn retention_from_the_file() {
        let f: ConfigFile =
            toml::from_str("data = \"/p\"\nlisten = \"x\"\nretention = { a = 3, b = 1 }\n")
                .unwrap();
        let c = ServeConfig::resolve(f, ServeFlags::default()).unwrap();
        assert_eq!(c.retention.get("a"), Some(&3));
        assert_eq!(c.retention.len(), 2);
        let f: ConfigFile =
            toml::from_str("data = \"/p\"\nlisten = \"x\"\nretention = { a = 0 }\n").unwrap();
        let e = ServeConfig::resolve(f, ServeFlags::default()).unwrap_err();
        assert!(e.to_string().contains("\"a\""), "{e}");
    }
}
