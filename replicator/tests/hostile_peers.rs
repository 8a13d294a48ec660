//! Hostile peers: random bytes, valid frames with random fields, in both
//! directions. Nothing panics, every bad input ends in an error, and the
//! node keeps serving real peers afterwards.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use rand::Rng;
use sluice_lockproto::wire::{ExtentHeader, SnapInfo, TransferRequest, TransferStart, WireLockSet};
use sluice_lockproto::Message;
use sluice_replicator::conn::Conn;

/// Up to two snapshots of random ids and digests, named `{prefix}{i}`,
/// with creation times at the edges of what a list may say.
fn evil_snaps(r: &mut impl Rng, prefix: &str) -> Vec<SnapInfo> {
    (0..r.gen_range(0..3))
        .map(|i| SnapInfo {
            id: r.gen(),
            name: format!("{prefix}{i}"),
            created_ms: [0, 4096, 1 << 20, r.gen::<u64>() & !4095, u64::MAX][r.gen_range(0..5)],
            content_digest: r.gen(),
        })
        .collect()
}

fn random_message(r: &mut impl Rng) -> (Message, Vec<u8>) {
    let id: [u8; 16] = r.gen();
    let s = |r: &mut dyn rand::RngCore| {
        let n = r.gen_range(0..12);
        (0..n)
            .map(|_| r.gen_range(b'a'..=b'z') as char)
            .collect::<String>()
    };
    match r.gen_range(0..11) {
        10 => (
            Message::WatchRequest {
                req_id: r.gen(),
                // (A longer wait holds the serving thread as long as an idle
                // connection would be, up to the peer timeout.)
                wait_ms: [0, 1, 50, 200][r.gen_range(0..4)],
                volumes: (0..r.gen_range(0..4))
                    .map(|_| sluice_lockproto::wire::WatchEntry {
                        volume: if r.gen() { "v".into() } else { s(r) },
                        qtree: if r.gen() { None } else { Some(s(r)) },
                        newest: r.gen(),
                    })
                    .collect(),
            },
            Vec::new(),
        ),
        8 => (
            Message::SnapshotPageRequest {
                req_id: r.gen(),
                volume: if r.gen() { "v".into() } else { s(r) },
                qtree: None,
                start: [0, 1, 2048, u32::MAX][r.gen_range(0..4)],
            },
            Vec::new(),
        ),
        0 => (
            Message::LockSet(WireLockSet {
                sender: s(r),
                relationship: s(r),
                volume: if r.gen() { "v".into() } else { s(r) },
                generation: r.gen(),
                lease_ms: r.gen(),
                locks: Vec::new(),
                gone_acks: vec![id],
                part: r.gen_range(0..3),
                parts: r.gen_range(0..3),
            }),
            Vec::new(),
        ),
        1 => (
            Message::SnapshotListRequest {
                req_id: r.gen(),
                volume: if r.gen() { "v".into() } else { s(r) },
                qtree: if r.gen() {
                    Some("@namespaces".into())
                } else {
                    None
                },
            },
            Vec::new(),
        ),
        2 => (
            Message::TransferRequest(TransferRequest {
                req_id: r.gen(),
                relationship: s(r),
                volume: "v".into(),
                qtree: None,
                base: if r.gen() { Some(id) } else { None },
                target: id,
                resume_from: r.gen(),
            }),
            Vec::new(),
        ),
        3 => {
            let len = r.gen_range(0..4u32);
            let mut p = vec![0u8; len as usize * 4096];
            r.fill(&mut p[..]);
            (
                Message::Extent(ExtentHeader {
                    req_id: r.gen(),
                    lba: r.gen(),
                    len: r.gen_range(0..300),
                    checksum_kind: r.gen(),
                    checksum: r.gen(),
                }),
                p,
            )
        }
        4 => (
            Message::Trim {
                req_id: r.gen(),
                lba: r.gen(),
                len: r.gen(),
            },
            Vec::new(),
        ),
        5 => (
            Message::Checkpoint {
                req_id: r.gen(),
                position: r.gen(),
            },
            Vec::new(),
        ),
        6 => (
            Message::TransferStart(TransferStart {
                req_id: r.gen(),
                target: SnapInfo {
                    id,
                    name: s(r),
                    created_ms: r.gen(),
                    content_digest: [0; 32],
                },
                base: None,
                extent_count: r.gen(),
                byte_count: r.gen(),
                volume_bytes: r.gen(),
                start_position: r.gen(),
            }),
            Vec::new(),
        ),
        7 => (
            Message::SnapshotList {
                req_id: r.gen(),
                snapshots: (0..r.gen_range(0..4))
                    .map(|_| SnapInfo {
                        id: r.gen(),
                        name: "x".into(),
                        created_ms: r.gen(),
                        content_digest: r.gen(),
                    })
                    .collect(),
            },
            Vec::new(),
        ),
        _ => (
            Message::TransferDone {
                req_id: r.gen(),
                content_digest: r.gen(),
            },
            Vec::new(),
        ),
    }
}

/// Serve one connection on our own thread so a panic would be seen.
fn serve_one(node: &Node) -> (String, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let r = node.repl.clone();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        r.handle_peer(s);
    });
    (addr, h)
}

#[test]
fn hostile_downstreams_cannot_crash_a_source() {
    let seed = seed("hostile_downstreams_cannot_crash_a_source");
    let mut r = rng(seed);
    let a = Node::start("A");
    a.create_volume("v");
    a.churn(
        &sluice_engine::api::NsName::volume("v"),
        VOL_BLOCKS,
        20,
        &mut r,
    );
    a.snap("v", "s1");
    for round in 0..150 {
        let (addr, h) = serve_one(&a);
        let mut s = TcpStream::connect(&addr).unwrap();
        if round % 3 == 0 {
            // Raw garbage, sometimes starting with the magic.
            let mut junk = vec![0u8; r.gen_range(1..200)];
            r.fill(&mut junk[..]);
            if r.gen() {
                let n = 4.min(junk.len());
                junk[..n].copy_from_slice(&b"SLCE"[..n]);
            }
            let _ = s.write_all(&junk);
            let _ = s.shutdown(std::net::Shutdown::Write);
        } else {
            let mut c = Conn::new(Box::new(s), Duration::from_secs(5)).unwrap();
            c.handshake("X", None).unwrap();
            for _ in 0..r.gen_range(1..6) {
                let (m, p) = random_message(&mut r);
                if c.send(&m, &p).is_err() {
                    break;
                }
            }
            c.close();
        }
        assert!(
            h.join().is_ok(),
            "round {round}: handle_peer panicked (seed {seed})"
        );
    }
    // Still a working source.
    let b = Node::start("B");
    assert_eq!(
        b.repl.mirror_create(spec("v", &a, "v")).unwrap().kind,
        "full"
    );
    for n in [a, b] {
        n.shutdown();
    }
}

#[test]
fn hostile_source_cannot_crash_a_destination() {
    let seed = seed("hostile_source_cannot_crash_a_destination");
    let mut r = rng(seed);
    let b = Node::start("B");
    for round in 0..80 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let frames: Vec<(Message, Vec<u8>)> = (0..r.gen_range(1..8))
            .map(|_| random_message(&mut r))
            .collect();
        let evil_seed: u64 = r.gen();
        let h = std::thread::spawn(move || {
            // A plausible but lying source: answers requests with echoed ids
            // and random contents, then random frames.
            let mut r = rng(evil_seed);
            let (s, _) = l.accept().unwrap();
            let mut c = Conn::new(Box::new(s), Duration::from_secs(5)).unwrap();
            if c.handshake("EVIL", None).is_err() {
                return;
            }
            loop {
                let m = match c.recv() {
                    Ok(Some(m)) => m,
                    _ => return,
                };
                let reply = match m {
                    // A page that lies about where it is, how long the
                    // list is and whether it changed.
                    Message::SnapshotPageRequest { req_id, start, .. } => Message::SnapshotPage {
                        req_id,
                        start: if r.gen_bool(0.8) { start } else { r.gen() },
                        total: [0, 1, 3, 2049, u32::MAX][r.gen_range(0..5)],
                        list_hash: r.gen_range(0..2),
                        snapshots: evil_snaps(&mut r, "p"),
                    },
                    Message::SnapshotListRequest { req_id, .. } => Message::SnapshotList {
                        req_id,
                        snapshots: evil_snaps(&mut r, "e"),
                    },
                    Message::TransferRequest(t) => Message::TransferStart(TransferStart {
                        req_id: t.req_id,
                        target: SnapInfo {
                            id: t.target,
                            name: "e".into(),
                            created_ms: 0,
                            content_digest: r.gen(),
                        },
                        base: t.base,
                        extent_count: r.gen_range(0..5),
                        byte_count: r.gen(),
                        volume_bytes: [4096, 1 << 20, r.gen()][r.gen_range(0..3)],
                        start_position: t.resume_from,
                    }),
                    Message::Ping { nonce } => Message::Pong { nonce },
                    Message::LockSet(_) | Message::CheckpointAck { .. } => continue,
                    _ => return,
                };
                let is_start = matches!(reply, Message::TransferStart(_));
                if c.send(&reply, &[]).is_err() {
                    return;
                }
                if is_start {
                    for (m, p) in &frames {
                        if c.send(m, p).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let spec = sluice_replicator::MirrorSpec {
            dst_volume: format!("d{round}"),
            source_addr: addr,
            source_volume: "v".into(),
            source_qtree: None,
            dst_qtree: None,
            every: None,
            follow: false,
            throttle_bps: None,
            keep: None,
        };
        let res = std::thread::spawn({
            let repl = b.repl.clone();
            move || repl.mirror_create(spec)
        })
        .join();
        assert!(
            res.is_ok(),
            "round {round}: mirror_create panicked (seed {seed})"
        );
        assert!(
            res.unwrap().is_err(),
            "round {round}: garbage made a mirror"
        );
        h.join().unwrap();
    }
    b.shutdown();
}

/// B's lock set for relationship `rel` on `volume`: one lock, with text
/// `text`, on each snapshot of `snaps`.
fn b_set(rel: &str, volume: &str, generation: u64, snaps: &[[u8; 16]], text: &str) -> Message {
    Message::LockSet(WireLockSet {
        sender: "B".into(),
        relationship: rel.into(),
        volume: volume.into(),
        generation,
        lease_ms: 60_000,
        locks: snaps
            .iter()
            .map(|id| sluice_lockproto::wire::WireLock {
                snapshot: *id,
                kind: 2,
                text: text.into(),
                origin_node: "B".into(),
                hop_path: vec!["B".into()],
                created_ms: 0,
                renewed_ms: 0,
                lease_ms: 60_000,
                dataset: format!("B/{rel}"),
            })
            .collect(),
        gone_acks: Vec::new(),
        part: 0,
        parts: 1,
    })
}

/// A raw peer connection to `node`, authenticated as B (insecure mode).
fn connect_as_b(node: &Node) -> Conn {
    let s = TcpStream::connect(&node.addr).unwrap();
    let mut c = Conn::new(Box::new(s), Duration::from_secs(5)).unwrap();
    c.handshake("B", None).unwrap();
    c
}

/// A downstream that asks to hold more locks than its bound (over all its
/// sets) hears why (`Error` REFUSED, naming the bound), and holds what it
/// held before; another connection of the same node with a set that fits
/// is taken.
#[test]
fn a_peer_past_its_lock_bound_is_refused_and_told() {
    let mut cfg = config("A", None);
    cfg.max_locks_per_peer = 3;
    let a = Node::with_config(cfg);
    a.create_volume("v");
    let ids: Vec<[u8; 16]> = (1..=4)
        .map(|i| *a.snap("v", &format!("s{i}")).id.as_bytes())
        .collect();
    let set = |rel: &str, generation: u64, n: usize| {
        let snaps: Vec<[u8; 16]> = ids.iter().take(n).copied().collect();
        b_set(rel, "v", generation, &snaps, &format!("B:{rel}"))
    };
    let connect = || connect_as_b(&a);
    let ping = |c: &mut Conn| {
        c.send(&Message::Ping { nonce: 9 }, &[]).unwrap();
        c.recv()
    };
    let b_locks = || {
        a.repl
            .lock_list()
            .into_iter()
            // B's own locks (not this node's "base of mirror to" shares).
            .filter(|l| l.text.starts_with("B:"))
            .count()
    };
    let mut c = connect();
    c.send(&set("r1", 1, 2), &[]).unwrap();
    assert!(matches!(ping(&mut c), Ok(Some(Message::Pong { nonce: 9 }))));
    assert_eq!(b_locks(), 2);
    c.send(&set("r2", 1, 2), &[]).unwrap();
    match c.recv() {
        Ok(Some(Message::Error { code, text, .. })) => {
            assert_eq!(code, sluice_lockproto::wire::codes::REFUSED, "{text}");
            assert!(
                text.contains("max_locks_per_peer") && text.contains("4 locks"),
                "{text}"
            );
        }
        other => panic!("expected Error REFUSED, got {other:?}"),
    }
    assert_eq!(b_locks(), 2, "the refused set was taken");
    let mut c = connect();
    c.send(&set("r2", 2, 1), &[]).unwrap();
    assert!(matches!(ping(&mut c), Ok(Some(Message::Pong { nonce: 9 }))));
    assert_eq!(b_locks(), 3);
    a.shutdown();
}

/// A lock set on a volume not exported to its sender is refused, naming
/// the command that exports it; the same node's empty set (a release) is
/// taken, and a set on an exported volume is.
#[test]
fn a_lock_set_on_a_volume_not_exported_to_the_peer_is_refused() {
    let a = Node::start("A");
    a.create_volume("v");
    a.create_volume("w");
    let id = *a.snap("v", "s1").id.as_bytes();
    let wid = *a.snap("w", "s1").id.as_bytes();
    a.repl.set_export("v", Some(vec!["C".into()])).unwrap();
    a.repl.set_export("w", Some(vec!["B".into()])).unwrap();
    let set = |vol: &str, generation: u64, snap: Option<[u8; 16]>| {
        let snaps: Vec<[u8; 16]> = snap.into_iter().collect();
        b_set(&format!("r-{vol}"), vol, generation, &snaps, "B:r")
    };
    let connect = || connect_as_b(&a);
    let mut c = connect();
    c.send(&set("v", 1, Some(id)), &[]).unwrap();
    match c.recv() {
        Ok(Some(Message::Error { code, text, .. })) => {
            assert_eq!(code, sluice_lockproto::wire::codes::REFUSED, "{text}");
            assert!(text.contains("sluice vol export v --to B"), "{text}");
        }
        other => panic!("expected Error REFUSED, got {other:?}"),
    }
    let mut c = connect();
    c.send(&set("v", 2, None), &[]).unwrap();
    c.send(&set("w", 1, Some(wid)), &[]).unwrap();
    c.send(&Message::Ping { nonce: 4 }, &[]).unwrap();
    assert!(matches!(c.recv(), Ok(Some(Message::Pong { nonce: 4 }))));
    let held: Vec<_> = a
        .repl
        .lock_list()
        .into_iter()
        .filter(|l| l.text == "B:r")
        .map(|l| l.volume)
        .collect();
    assert_eq!(held, vec![Some("w".to_string())]);
    a.shutdown();
}

/// The snapshot watch (`--follow`): a source answers at once for a volume
/// whose newest snapshot is not the one named (or that it does not have),
/// holds the watch until a snapshot is taken, answers nothing when the wait
/// runs out, and refuses a watch of more volumes than the bound, saying so.
#[test]
fn a_watch_answers_what_changed_and_refuses_too_many_volumes() {
    use sluice_lockproto::wire::{WatchEntry, WATCH_VOLUMES_MAX};
    let a = Node::start("A");
    a.create_volume("v");
    let s1 = *a.snap("v", "s1").id.as_bytes();
    let entry = |volume: &str, newest: [u8; 16]| WatchEntry {
        volume: volume.into(),
        qtree: None,
        newest,
    };
    let mut c = connect_as_b(&a);
    let watch = |c: &mut Conn, req_id: u64, wait_ms: u32, volumes: Vec<WatchEntry>| {
        c.send(
            &Message::WatchRequest {
                req_id,
                wait_ms,
                volumes,
            },
            &[],
        )
        .unwrap();
        c.recv().unwrap()
    };
    let got = watch(
        &mut c,
        1,
        4_000,
        vec![
            entry("v", s1),
            entry("nosuch", [0; 16]),
            entry("v", [0; 16]),
        ],
    );
    assert_eq!(
        got,
        Some(Message::WatchReply {
            req_id: 1,
            changed: vec![1, 2]
        })
    );
    // Nothing new: the wait runs out with nothing changed.
    let got = watch(&mut c, 2, 50, vec![entry("v", s1)]);
    assert_eq!(
        got,
        Some(Message::WatchReply {
            req_id: 2,
            changed: vec![]
        })
    );
    // A snapshot taken while the watch is held ends it.
    let engine = a.engine.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        engine
            .call(sluice_engine::api::Request::CreateSnapshot {
                volume: "v".into(),
                name: "s2".into(),
                id: None,
                created_unix_ms: None,
            })
            .unwrap();
    });
    let got = watch(&mut c, 3, 20_000, vec![entry("v", s1)]);
    t.join().unwrap();
    assert_eq!(
        got,
        Some(Message::WatchReply {
            req_id: 3,
            changed: vec![0]
        })
    );
    let too_many = (0..=WATCH_VOLUMES_MAX).map(|_| entry("v", s1)).collect();
    match watch(&mut c, 4, 10, too_many) {
        Some(Message::Error { code, text, .. }) => {
            assert_eq!(code, sluice_lockproto::wire::codes::BAD_FRAME, "{text}");
            assert!(
                text.contains(&format!("at most {WATCH_VOLUMES_MAX}")),
                "{text}"
            );
        }
        other => panic!("expected Error BAD_FRAME, got {other:?}"),
    }
    a.shutdown();
}
