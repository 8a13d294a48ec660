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
//! How the replicator wires it (B pulls from A):
//!
//! ```
//! use sluice_lockproto::{Action, Event, LockKind, LockNode, Message, NodeConfig};
//! use sluice_lockproto::wire::{decode, encode, WireLockSet};
//!
//! let mut a = LockNode::new(NodeConfig::new("A"));
//! let mut b = LockNode::new(NodeConfig::new("B"));
//! let snap = uuid::Uuid::from_u128(1);
//! a.handle(0, Event::DownstreamAdded { downstream: "B".into() });
//! a.handle(0, Event::SnapshotCreated { snapshot: snap });
//! b.handle(0, Event::UpstreamAdded { upstream: "A".into(), relationship: "/vol/b".into(), kind: LockKind::DestinationPath });
//! // ... transfer of `snap` from A to B committed:
//! for action in b.handle(1, Event::TransferFinished { upstream: "A".into(), target: snap }) {
//!     if let Action::SendLockSet { upstream, set } = action {
//!         assert_eq!(upstream, "A");
//!         let frame = encode(&Message::LockSet(WireLockSet::from_model(&set)), &[]).unwrap();
//!         // --- socket --- A's side:
//!         let got = decode(&frame).unwrap().unwrap();
//!         if let Message::LockSet(w) = got.msg {
//!             a.handle(2, Event::LockSetReceived { set: w.to_model().unwrap() });
//!         }
//!     }
//! }
//! // A now refuses to delete B's base and names the holder.
//! let acts = a.handle(3, Event::DeleteRequested { snapshot: snap, force: false });
//! assert!(matches!(&acts[0], Action::DeleteRefused { holders, .. } if holders[0].origin_node == "B"));
//! ```

pub mod error;
pub mod model;
pub mod node;
pub mod wire;

pub use error::{LockError, Result};
pub use model::{Bounds, DependencyView, LeasePolicy, LockKind, LockSet, SoftLock};
pub use node::{Action, Event, LockNode, NodeConfig, ReleaseReason};
pub use wire::{decode, encode, encode_into, parse_header, Decoded, Header, Message};
