//! cargo-fuzz target: the frame decoder must return errors, never panic,
//! on any input; a decoded frame stays within its bounds, and persisted
//! lock tables are fed through the restore path too.
//! Run: `cd lockproto/fuzz && cargo +nightly fuzz run frame_decoder`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_lockproto::wire::{decode, MAX_BODY_LEN, MAX_PAYLOAD_LEN};
use sluice_lockproto::{LockNode, NodeConfig};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(d)) = decode(rest) {
        assert!(d.header.body_len <= MAX_BODY_LEN && d.header.payload_len <= MAX_PAYLOAD_LEN);
        assert!(d.consumed > 0 && d.consumed <= rest.len());
        rest = &rest[d.consumed..];
    }
    let _ = LockNode::from_bytes(NodeConfig::new("fuzz"), data);
});
