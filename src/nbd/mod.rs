//! NBD server: the fixed-newstyle handshake and the transmission phase,
//! exporting volumes, qtrees and snapshots of the engine to real block
//! clients (`qemu-io`, `qemu-img`, `fio --ioengine=nbd`, the kernel).
//!
//! - [`proto`]: the sans-IO codec (byte layouts, bounds, option decisions).
//! - [`server`]: the socket shell ([`NbdServer`]): an accept thread, and per
//!   connection a reader thread (parse, submit to the engine) and a writer
//!   thread (send replies as completions arrive, out of order).
//! - [`metrics`]: [`NbdMetrics`], Prometheus text.
//!
//! Exports: `VOL` and `VOL/QTREE` read-write, unless they are a read-only
//! mirror destination (a volume mirror's volume, with its qtrees; a qtree
//! mirror's qtree): those are announced `NBD_FLAG_READ_ONLY` and refuse
//! writes, trims and write-zeroes with EPERM, as the engine does for a
//! client that writes after the flag was set. `VOL@SNAP` and
//! `VOL/QTREE@SNAP` read-only. Export size = namespace size.

pub mod metrics;
pub mod proto;
pub mod server;

pub use metrics::{NbdMetrics, NbdOp};
pub use server::{NbdOptions, NbdServer};
