//! Wire codec tests: golden bytes for every message, round trips, version
//! refusal, zero-copy payloads, auth, and random/mutated frames (errors
//! only, never a panic, never an allocation past the bound). Seeded:
//! replay with `SLUICE_SEED`.
// Tests and benchmarks may panic (the crate denies it elsewhere).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod sim;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice_lockproto::wire::{
    self, ExtentHeader, Hello, Message, SnapInfo, TransferRequest, TransferStart, WireLock,
    WireLockSet,
};
use sluice_lockproto::{decode, encode, encode_into, parse_header, LockError};

fn samples() -> Vec<(&'static str, Message)> {
    let lock = WireLock {
        snapshot: [7; 16],
        kind: 2,
        text: "/vol/c".into(),
        origin_node: "C".into(),
        hop_path: vec!["C".into(), "B".into()],
        created_ms: 1,
        renewed_ms: 2,
        lease_ms: 60_000,
        dataset: "C/c".into(),
    };
    let snap = SnapInfo {
        id: [9; 16],
        name: "hourly.0".into(),
        created_ms: 1_700_000_000_000,
        content_digest: [0xAB; 32],
    };
    vec![
        (
            "hello",
            Message::Hello(Hello {
                node_id: "A".into(),
                major: wire::VERSION_MAJOR,
                minor: 0,
                nonce: [1; 32],
                auth: Some([2; 32]),
            }),
        ),
        (
            "lockset",
            Message::LockSet(WireLockSet {
                sender: "B".into(),
                relationship: "v1".into(),
                volume: "v1".into(),
                generation: 42,
                lease_ms: 60_000,
                locks: vec![lock],
                gone_acks: vec![[3; 16]],
                part: 0,
                parts: 1,
            }),
        ),
        (
            "snapshot_list_request",
            Message::SnapshotListRequest {
                req_id: 1,
                volume: "v1".into(),
                qtree: Some("q".into()),
            },
        ),
        (
            "snapshot_list",
            Message::SnapshotList {
                req_id: 1,
                snapshots: vec![snap.clone()],
            },
        ),
        (
            "transfer_request",
            Message::TransferRequest(TransferRequest {
                req_id: 2,
                relationship: "v1".into(),
                volume: "v1".into(),
                qtree: None,
                base: Some([4; 16]),
                target: [5; 16],
                resume_from: 4096,
            }),
        ),
        (
            "transfer_start",
            Message::TransferStart(TransferStart {
                req_id: 2,
                target: snap,
                base: None,
                extent_count: 10,
                byte_count: 40960,
                volume_bytes: 1 << 30,
                start_position: 0,
            }),
        ),
        (
            "extent",
            Message::Extent(ExtentHeader {
                req_id: 2,
                lba: 100,
                len: 8,
                checksum_kind: wire::CHECKSUM_CRC32C,
                checksum: 0xDEAD_BEEF,
            }),
        ),
        (
            "trim",
            Message::Trim {
                req_id: 2,
                lba: 200,
                len: 16,
            },
        ),
        (
            "checkpoint",
            Message::Checkpoint {
                req_id: 2,
                position: 77,
            },
        ),
        (
            "checkpoint_ack",
            Message::CheckpointAck {
                req_id: 2,
                position: 77,
            },
        ),
        (
            "transfer_done",
            Message::TransferDone {
                req_id: 2,
                content_digest: [6; 32],
            },
        ),
        (
            "snapshot_gone",
            Message::SnapshotGone {
                snapshot: [8; 16],
                holders_text: "C:/vol/c".into(),
            },
        ),
        (
            "error",
            Message::Error {
                req_id: 3,
                code: wire::codes::NO_COMMON_BASE,
                text: "no common snapshot".into(),
            },
        ),
        ("ping", Message::Ping { nonce: 5 }),
        ("pong", Message::Pong { nonce: 5 }),
        (
            "snapshot_page_request",
            Message::SnapshotPageRequest {
                req_id: 6,
                volume: "vol".into(),
                qtree: None,
                start: 2048,
            },
        ),
        (
            "snapshot_page",
            Message::SnapshotPage {
                req_id: 6,
                start: 2048,
                total: 2049,
                list_hash: 0x1234_5678,
                snapshots: vec![SnapInfo {
                    id: [7; 16],
                    name: "s2048".into(),
                    created_ms: 99,
                    content_digest: [8; 32],
                }],
            },
        ),
        (
            "watch_request",
            Message::WatchRequest {
                req_id: 7,
                wait_ms: 10_000,
                volumes: vec![wire::WatchEntry {
                    volume: "vol".into(),
                    qtree: Some("q".into()),
                    newest: [9; 16],
                }],
            },
        ),
        (
            "watch_reply",
            Message::WatchReply {
                req_id: 7,
                changed: vec![0],
            },
        ),
    ]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn golden_bytes_pin_every_message() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/wire_v2.txt");
    let mut now = String::new();
    for (name, m) in samples() {
        let payload: &[u8] = if matches!(m, Message::Extent(_)) {
            b"DATA"
        } else {
            b""
        };
        now.push_str(&format!(
            "{name} {}\n",
            hex(&encode(&m, payload).expect("encode"))
        ));
    }
    if std::env::var("SLUICE_BLESS").is_ok() {
        std::fs::write(path, &now).expect("write golden");
    }
    let golden = std::fs::read_to_string(path).expect("golden file (create with SLUICE_BLESS=1)");
    assert_eq!(
        now, golden,
        "wire encoding changed: bump VERSION_MAJOR/MINOR and re-bless"
    );
    assert_eq!(
        samples().len(),
        usize::from(wire::MAX_TYPE_CODE),
        "every message type is pinned"
    );
}

#[test]
fn every_message_round_trips() {
    for (name, m) in samples() {
        let payload: &[u8] = if matches!(m, Message::Extent(_)) {
            b"DATA"
        } else {
            b""
        };
        let f = encode(&m, payload).expect("encode");
        let d = decode(&f).expect(name).expect("whole frame");
        assert_eq!(d.msg, m, "{name}");
        assert_eq!(d.payload, payload);
        assert_eq!(d.consumed, f.len());
        assert_eq!(
            decode(&f[..f.len() - 1]).expect("partial"),
            None,
            "{name}: partial frame waits"
        );
    }
}

#[test]
fn extent_payload_is_borrowed_not_copied() {
    let data = vec![0x5Au8; 64 * 1024];
    let mut head = Vec::new();
    encode_into(
        &Message::Extent(ExtentHeader {
            req_id: 1,
            lba: 0,
            len: 16,
            checksum_kind: wire::CHECKSUM_CRC32C,
            checksum: u64::from(crc32c::crc32c(&data)),
        }),
        data.len() as u32,
        &mut head,
    )
    .expect("encode header");
    // What the socket would deliver after writev(head, data):
    let mut buf = head.clone();
    buf.extend_from_slice(&data);
    let d = decode(&buf).expect("decode").expect("whole");
    let off = head.len();
    assert_eq!(
        d.payload.as_ptr(),
        buf[off..].as_ptr(),
        "payload points into the read buffer"
    );
    assert_eq!(d.payload.len(), data.len());
}

#[test]
fn unknown_major_version_gets_a_clear_error_frame() {
    assert_eq!(wire::VERSION_MAJOR, 2);
    // A newer peer (major 3) and a peer still speaking 1 (sets keyed by
    // node, no relationship or volume) are both refused with a clear answer.
    for major in [wire::VERSION_MAJOR + 1, 1] {
        let mut f = encode(&Message::Ping { nonce: 1 }, &[]).expect("encode");
        f[4..6].copy_from_slice(&major.to_le_bytes());
        let err = decode(&f).expect_err("refused");
        assert!(
            matches!(err, LockError::UnsupportedVersion { major: m, our_major: 2, .. } if m == major),
            "{err}"
        );
        let reply = wire::error_frame(0, &err).expect("error frame");
        match decode(&reply).expect("decodable").expect("whole").msg {
            Message::Error { code, text, .. } => {
                assert_eq!(code, wire::codes::VERSION);
                assert!(text.contains("version"), "{text}");
            }
            other => panic!("expected an error frame, got {other:?}"),
        }
    }
}

#[test]
fn lengths_are_refused_before_allocation() {
    let mut f = encode(&Message::Ping { nonce: 1 }, &[]).expect("encode");
    f[12..16].copy_from_slice(&(wire::MAX_BODY_LEN + 1).to_le_bytes());
    let e = parse_header(&f).expect_err("body bound");
    assert!(
        e.to_string().contains("body") && e.to_string().contains(&wire::MAX_BODY_LEN.to_string()),
        "{e}"
    );
    // decode refuses from the header alone: it does not wait for 1 MiB.
    assert!(decode(&f).is_err());
    let mut g = encode(
        &Message::Extent(ExtentHeader {
            req_id: 0,
            lba: 0,
            len: 0,
            checksum_kind: 1,
            checksum: 0,
        }),
        &[],
    )
    .expect("encode");
    g[16..20].copy_from_slice(&(wire::MAX_PAYLOAD_LEN + 1).to_le_bytes());
    assert!(matches!(
        parse_header(&g),
        Err(LockError::TooLong {
            what: "payload",
            ..
        })
    ));
    let mut p = encode(&Message::Ping { nonce: 1 }, &[]).expect("encode");
    p[16] = 1;
    assert!(
        matches!(parse_header(&p), Err(LockError::BadPayload { .. })),
        "only extents carry payload"
    );
}

#[test]
fn hmac_challenge_response() {
    let secret = b"shared secret";
    let nonce = [7u8; wire::NONCE_LEN];
    let r = wire::auth_response(secret, &nonce, "A", "B").expect("hmac");
    wire::verify_auth(secret, &nonce, "A", "B", &r).expect("good response");
    assert!(wire::verify_auth(b"wrong", &nonce, "A", "B", &r).is_err());
    assert!(
        wire::verify_auth(secret, &[8; 32], "A", "B", &r).is_err(),
        "replay with another nonce"
    );
    assert!(
        wire::verify_auth(secret, &nonce, "A", "C", &r).is_err(),
        "bound to node ids"
    );
}

#[test]
fn random_and_mutated_frames_only_error() {
    let seed = sim::run_seed("wire_fuzz");
    let mut rng = SmallRng::seed_from_u64(seed);
    let frames: Vec<Vec<u8>> = samples()
        .iter()
        .map(|(_, m)| {
            encode(
                m,
                if matches!(m, Message::Extent(_)) {
                    b"DATA"
                } else {
                    b""
                },
            )
            .expect("encode")
        })
        .collect();
    let (mut ok, mut err) = (0u32, 0u32);
    for i in 0..20_000u32 {
        let mut f = if i % 4 == 0 {
            let n = rng.gen_range(0..256);
            let mut v: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if rng.gen_bool(0.5) && v.len() >= 8 {
                v[..4].copy_from_slice(b"SLCE");
                v[4..6].copy_from_slice(&wire::VERSION_MAJOR.to_le_bytes());
            }
            v
        } else {
            frames[rng.gen_range(0..frames.len())].clone()
        };
        for _ in 0..rng.gen_range(1..4) {
            if f.is_empty() {
                break;
            }
            match rng.gen_range(0..4) {
                0 => {
                    let k = rng.gen_range(0..f.len());
                    f[k] ^= 1 << rng.gen_range(0..8);
                }
                1 => {
                    let k = rng.gen_range(0..f.len());
                    f.truncate(k);
                }
                2 => {
                    let k = rng.gen_range(0..f.len());
                    f[k] = rng.gen();
                }
                _ => {
                    // Fix the crc so mutations reach bytecheck.
                    if f.len() >= wire::HEADER_LEN {
                        let body_len = u32::from_le_bytes([f[12], f[13], f[14], f[15]]) as usize;
                        let end = (wire::HEADER_LEN + body_len).min(f.len());
                        let crc = crc32c::crc32c_append(
                            crc32c::crc32c(&f[..20]),
                            &f[wire::HEADER_LEN..end],
                        );
                        f[20..24].copy_from_slice(&crc.to_le_bytes());
                    }
                }
            }
        }
        match decode(&f) {
            Ok(Some(d)) => {
                assert!(d.consumed <= f.len());
                assert!(
                    d.header.body_len <= wire::MAX_BODY_LEN
                        && d.header.payload_len <= wire::MAX_PAYLOAD_LEN
                );
                ok += 1
            }
            Ok(None) => {}
            Err(e) => {
                assert!(!e.to_string().is_empty());
                err += 1
            }
        }
    }
    eprintln!("wire_fuzz: 20000 frames, {ok} decoded, {err} refused");
    assert!(err > 1_000);
}

/// A set too big for one frame travels in parts: each part is a frame of
/// its own within the body bound, carries the set's sender, relationship,
/// volume and generation, and converts to a set only whole (a part alone is
/// refused, not taken as the whole set).
#[test]
fn lock_set_parts_round_trip_and_a_part_is_not_a_set() {
    let set = sluice_lockproto::LockSet {
        sender: "B".into(),
        relationship: "qv/db".into(),
        volume: "db".into(),
        generation: 7,
        lease_ms: 60_000,
        locks: (0..10_000u32)
            .map(|i| sluice_lockproto::SoftLock {
                snapshot: uuid::Uuid::from_u128(u128::from(i % 97)),
                kind: sluice_lockproto::LockKind::OwnerName,
                text: format!("backup-job-{i:06}"),
                origin_node: "C".into(),
                hop_path: vec!["C".into(), "B".into()],
                created_ms: 1,
                renewed_ms: 2,
                lease_ms: 60_000,
                dataset: "C/qv".into(),
            })
            .collect(),
        gone_acks: vec![uuid::Uuid::from_u128(5)],
    };
    let whole = WireLockSet::from_model(&set);
    assert_eq!((whole.part, whole.parts), (0, 1));
    assert_eq!(whole.to_model().expect("whole"), set);
    let parts = WireLockSet::split(&set);
    assert!(parts.len() > 1, "{} parts", parts.len());
    let mut locks = 0;
    for (i, p) in parts.iter().enumerate() {
        let f = encode(&Message::LockSet(p.clone()), &[]).expect("encode part");
        assert!(f.len() <= wire::HEADER_LEN + wire::MAX_BODY_LEN as usize);
        let d = decode(&f).expect("decode").expect("whole frame");
        assert_eq!(d.msg, Message::LockSet(p.clone()));
        assert_eq!(
            (
                p.sender.as_str(),
                p.relationship.as_str(),
                p.volume.as_str(),
                p.generation
            ),
            ("B", "qv/db", "db", 7)
        );
        assert_eq!((p.part, p.parts), (i as u32, parts.len() as u32));
        assert_eq!(p.gone_acks.is_empty(), i > 0, "gone acks ride in part 0");
        assert!(matches!(
            p.to_model(),
            Err(LockError::BadField {
                field: "set.part",
                ..
            })
        ));
        locks += p.locks.len();
    }
    assert_eq!(locks, set.locks.len(), "every lock in exactly one part");
}
