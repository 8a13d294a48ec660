//! `sluice-lockproto`: soft locks and the wire protocol, with no I/O.
//!
//! - [`model`]: the soft-lock record, its two views, lock sets, bounds, leases.
//! - [`node`]: [`LockNode`], the sans-IO propagation state machine (events in,
//!   actions out) and its persisted lock table.
//! - [`wire`]: frames, messages, codec (rkyv + bytecheck), auth helpers.
//! - [`error`]: [`LockError`], the crate's one error enum.
//!
//! See `docs/PROTOCOL.md` for the bytes and the connection states.

pub mod error;
pub mod model;
pub mod node;
pub mod wire;

pub use error::{LockError, Result};
pub use model::{Bounds, DependencyView, LeasePolicy, LockKind, LockSet, SoftLock};
pub use node::{Action, Event, LockNode, NodeConfig, ReleaseReason};
pub use wire::{decode, encode, encode_into, parse_header, Decoded, Header, Message};
