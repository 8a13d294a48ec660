//! `sluice-lockproto`: soft locks and the wire protocol, with no I/O.
//!
//! - [`model`]: the soft-lock record, its two views, lock sets, bounds, leases.
//! - [`node`]: [`LockNode`], the sans-IO propagation state machine (events in,
//!   actions out) and its persisted lock table.
//! - [`wire`]: frames, messages, codec (rkyv + bytecheck), auth helpers.
//! - [`error`]: [`LockError`], the crate's one error enum.
//!
//! See `docs/PROTOCOL.md` for the bytes and the connection states.
//!
//! How the replicator wires it (B pulls A's volume `v1` into its own `v1`,
//! as relationship `v1`; big sets travel in parts):
//!
//! ```
//! use sluice_lockproto::{Action, Event, LockKind, LockNode, Message, NodeConfig};
//! use sluice_lockproto::wire::{decode, encode, SetAssembler, WireLockSet};
//!
//! let mut a = LockNode::new(NodeConfig::new("A"));
//! let mut b = LockNode::new(NodeConfig::new("B"));
//! let snap = uuid::Uuid::from_u128(1);
//! let _ = a.handle(0, Event::SnapshotCreated { volume: "v1".into(), snapshot: snap });
//! // A serves its `v1` to B's relationship `v1`.
//! let _ = a.handle(0, Event::DownstreamAdded {
//!     downstream: "B".into(),
//!     relationship: "v1".into(),
//!     volume: "v1".into(),
//! });
//! let _ = b.handle(0, Event::UpstreamAdded {
//!     relationship: "v1".into(),
//!     upstream: "A".into(),
//!     source: "v1".into(),
//!     volume: "v1".into(),
//!     kind: LockKind::DestinationPath,
//! });
//! // ... transfer of `snap` through relationship `v1` committed:
//! let mut assembler = SetAssembler::default();
//! let max = a.config().bounds.max_locks_per_set;
//! for action in b.handle(1, Event::TransferFinished { relationship: "v1".into(), target: snap }) {
//!     if let Action::SendLockSet { relationship, upstream, set } = action {
//!         assert_eq!((relationship.as_str(), upstream.as_str()), ("v1", "A"));
//!         assert_eq!(set.volume, "v1", "the set locks A's volume v1");
//!         for part in WireLockSet::split(&set) {
//!             let frame = encode(&Message::LockSet(part), &[]).unwrap();
//!             // --- socket --- A's side:
//!             let got = decode(&frame).unwrap().unwrap();
//!             if let Message::LockSet(w) = got.msg {
//!                 if let Some(set) = assembler.push(w, max).unwrap() {
//!                     let _ = a.handle(2, Event::LockSetReceived { set });
//!                 }
//!             }
//!         }
//!     }
//! }
//! // A now refuses to delete B's base and names the holder.
//! let acts = a.handle(3, Event::DeleteRequested { volume: "v1".into(), snapshot: snap, force: false });
//! assert!(matches!(&acts[0], Action::DeleteRefused { volume, holders, .. }
//!     if volume == "v1" && holders[0].origin_node == "B" && holders[0].text == "B:v1"));
//! assert_eq!(a.holders("v1", snap)[0].via, Some(("B".to_string(), "v1".to_string())));
//! ```

pub mod error;
pub mod model;
pub mod node;
pub mod wire;

pub use error::{LockError, Result};
pub use model::{Bounds, DependencyView, LeasePolicy, LockKind, LockSet, SoftLock};
pub use node::{next_shared, Action, DownKey, Event, Held, LockNode, NodeConfig, ReleaseReason};
pub use wire::{decode, encode, encode_into, parse_header, Decoded, Header, Message};
