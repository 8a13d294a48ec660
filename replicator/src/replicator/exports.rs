//! Export lists: which peers may pull a volume, and lock its snapshots.
//!
//! Owns: the persisted export table (volume -> peer names, `*` = any
//! authenticated peer; pool attribute [`keys::EXPORTS`]) and the one check
//! every peer request for a volume passes ([`may_serve`]).
//!
//! Invariants kept: a snapshot list, a transfer and a lock set that holds
//! anything are served for a volume only to a peer its list names (or
//! `*`), or, on a node without `exports_required`, for a volume without a
//! list. An empty lock set (a release) is always taken: a peer whose export
//! ended can still let go of what it holds. Lists are checked at `vol
//! export`: the volume exists, every name is a valid node name.

use super::*;

/// Whether `peer` may pull `volume` under `exports` (pure).
pub(crate) fn may_serve(
    exports: &BTreeMap<String, BTreeSet<String>>,
    required: bool,
    peer: &str,
    volume: &str,
) -> bool {
    match exports.get(volume) {
        Some(peers) => peers.contains(peer) || peers.contains("*"),
        None => !required,
    }
}

impl Replicator {
    /// Set the peers that may pull `volume` (`*`: any authenticated peer);
    /// `None` drops its list (the node's default applies again).
    pub fn set_export(&self, volume: &str, peers: Option<Vec<String>>) -> Result<()> {
        volume_info(&self.engine, volume)?;
        let peers: Option<BTreeSet<String>> = match peers {
            None => None,
            Some(v) => {
                if v.is_empty() {
                    return Err(ReplError::Invalid(format!(
                        "an export list of {volume} names no peer; name at least one node (or `*`), or drop the list"
                    )));
                }
                for p in &v {
                    if p.is_empty()
                        || p.len() > crate::conn::NODE_NAME_MAX
                        || p.chars()
                            .any(|c| c.is_control() || c.is_whitespace() || c == ',')
                    {
                        return Err(ReplError::Invalid(format!(
                            "export of {volume}: {p:?} is not a node name (1 to {} bytes, no spaces, commas or control characters), nor `*`",
                            crate::conn::NODE_NAME_MAX
                        )));
                    }
                }
                Some(v.into_iter().collect())
            }
        };
        let ((), acts) = self.change(|t| {
            match &peers {
                Some(p) => t.exports_mut().insert(volume.to_string(), p.clone()),
                None => t.exports_mut().remove(volume),
            };
            Ok(())
        })?;
        self.perform(acts, None);
        self.flush()?;
        tracing::info!(%volume, peers = ?peers, "export list set");
        Ok(())
    }

    /// Whether a volume without a list is closed to peers.
    pub fn exports_required(&self) -> bool {
        self.cfg.exports_required
    }

    /// Every volume's export list.
    pub fn exports(&self) -> BTreeMap<String, BTreeSet<String>> {
        lock(&self.st).exports().clone()
    }

    /// Whether `peer` may pull `volume` here.
    pub(super) fn may_serve(&self, peer: &str, volume: &str) -> bool {
        may_serve(
            lock(&self.st).exports(),
            self.cfg.exports_required,
            peer,
            volume,
        )
    }

    /// The refusal a peer hears for a volume not exported to it.
    pub(super) fn not_exported(&self, peer: &str, volume: &str) -> String {
        format!(
            "volume {volume} on {} is not exported to node {peer}: on {}, run `sluice vol export {volume} --to {peer}`",
            self.cfg.node_name, self.cfg.node_name
        )
    }
}

/// Load the persisted export lists.
pub(super) fn load_exports(e: &EngineHandle) -> Result<BTreeMap<String, BTreeSet<String>>> {
    match get_attr(e, keys::EXPORTS)? {
        Some(b) => serde_json::from_slice(&b).map_err(|err| ReplError::Persisted {
            key: keys::EXPORTS.into(),
            detail: err.to_string(),
        }),
        None => Ok(BTreeMap::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::may_serve;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn a_list_names_who_may_pull() {
        let mut e = BTreeMap::new();
        e.insert("v".to_string(), BTreeSet::from(["B".to_string()]));
        e.insert("w".to_string(), BTreeSet::from(["*".to_string()]));
        for required in [false, true] {
            assert!(may_serve(&e, required, "B", "v"));
            assert!(!may_serve(&e, required, "C", "v"));
            assert!(may_serve(&e, required, "C", "w"));
            assert_eq!(may_serve(&e, required, "C", "x"), !required);
        }
    }
}
