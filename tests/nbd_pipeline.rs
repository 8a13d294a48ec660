//! Many requests in flight on one connection with a tiny raw client: every
//! request answered exactly once, replies matched by handle (in whatever
//! order they come), data checked against a model; the error replies that
//! keep a connection usable (EINVAL, EPERM); several connections at once.

mod nbd_common;

use nbd_common::*;
use rand::{Rng, RngCore};
use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};

/// What the reply thread needs to know about a request: read length.
type Expect = Arc<Mutex<HashMap<u64, u32>>>;

/// Send every request at once (a reply thread drains concurrently), then
/// return `(handle, error, data)` in arrival order.
fn pipelined(
    client: &mut Client,
    reqs: &[(u16, u16, u64, u32, Vec<u8>)],
) -> Vec<(u64, u32, Vec<u8>)> {
    let expect: Expect = Arc::new(Mutex::new(HashMap::new()));
    for (i, (cmd, _, _, len, _)) in reqs.iter().enumerate() {
        let l = if *cmd == CMD_READ { *len } else { 0 };
        expect.lock().unwrap().insert(i as u64, l);
    }
    let mut rs = client.stream.try_clone().unwrap();
    let n = reqs.len();
    let e = expect.clone();
    let replies = std::thread::spawn(move || {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (err, handle) = read_reply(&mut rs);
            let len = e
                .lock()
                .unwrap()
                .remove(&handle)
                .expect("reply for an unknown or repeated handle");
            let mut data = vec![];
            if err == 0 && len > 0 {
                data = vec![0u8; len as usize];
                rs.read_exact(&mut data).unwrap();
            }
            out.push((handle, err, data));
        }
        out
    });
    for (i, (cmd, flags, offset, len, data)) in reqs.iter().enumerate() {
        client.send(*cmd, *flags, i as u64, *offset, *len, data);
    }
    let out = replies.join().expect("reply thread");
    assert!(expect.lock().unwrap().is_empty());
    out
}

#[test]
fn many_requests_in_flight_matched_by_handle() {
    let s = seed("many_requests_in_flight_matched_by_handle");
    let mut rng = rng(s);
    let node = Node::start();
    let mut c = Client::connect(node.nbd_addr, VOL).unwrap();
    assert_eq!(c.size, VOL_BYTES);
    let mut model = vec![0u8; VOL_BYTES as usize];

    // Phase 1: 600 writes to disjoint 64 KiB slots, aligned and not, FUA
    // on some, all in flight together.
    let slot = 64 << 10;
    let mut reqs = Vec::new();
    let mut regions = Vec::new();
    for i in 0..600u64 {
        let (off, len) = if i % 4 == 3 {
            (
                i * slot + rng.gen_range(0..slot / 2),
                rng.gen_range(1..slot / 2),
            )
        } else {
            (
                i * slot + rng.gen_range(0..8) * 4096,
                rng.gen_range(1..8) * 4096,
            )
        };
        let mut data = vec![0u8; len as usize];
        rng.fill_bytes(&mut data);
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
        let flags = if i % 5 == 0 { FLAG_FUA } else { 0 };
        reqs.push((CMD_WRITE, flags, off, len as u32, data));
        regions.push((off, len as u32));
    }
    let out = pipelined(&mut c, &reqs);
    assert!(
        out.iter().all(|(_, e, _)| *e == 0),
        "seed {s}: a write failed"
    );

    // Phase 2: read each region back, plus odd ones, all in flight.
    let mut reqs: Vec<_> = regions
        .iter()
        .map(|&(off, len)| (CMD_READ, 0, off, len, vec![]))
        .collect();
    let big = 32u32 << 20; // the largest read: split into engine parts
    reqs.push((CMD_READ, 0, 4096 + 7, big, vec![]));
    reqs.push((CMD_READ, 0, 0, 0, vec![])); // zero length
    reqs.push((CMD_READ, 0, VOL_BYTES - 10, 11, vec![])); // past the end
    reqs.push((CMD_CACHE, 0, 0, 4096, vec![])); // known, not advertised
    reqs.push((CMD_FLUSH, 0, 0, 0, vec![]));
    reqs.push((CMD_WRITE, 0, VOL_BYTES, 0, vec![])); // zero length at the end
    let extra = regions.len();
    let out = pipelined(&mut c, &reqs);
    let mut in_order = 0;
    for (pos, (h, err, data)) in out.iter().enumerate() {
        in_order += (*h == pos as u64) as usize;
        let (cmd, _, off, len, _) = &reqs[*h as usize];
        let h = *h as usize;
        if h < extra {
            assert_eq!(*err, 0);
            let want = &model[*off as usize..(*off + *len as u64) as usize];
            assert!(data == want, "seed {s}: read {off}+{len} differs");
            continue;
        }
        match h - extra {
            0 => {
                assert_eq!(*err, 0);
                assert!(data == &model[*off as usize..*off as usize + big as usize]);
            }
            1 => assert_eq!((*err, data.len()), (0, 0)),
            2 => assert_eq!(*err, EINVAL, "read past the end"),
            3 => assert_eq!(*err, EINVAL, "cmd {cmd}"),
            4 | 5 => assert_eq!(*err, 0),
            _ => unreachable!(),
        }
    }
    eprintln!(
        "{} of {} replies came in request order",
        in_order,
        out.len()
    );

    // Phase 3: write-zeroes and trim, unaligned and aligned, then a check.
    let z = [
        (10_000u64, 9_000u32),
        (65536 * 3, 65536),
        (65536 * 7 + 1, 1),
    ];
    let t = [(65536 * 11 + 100, 20_000u32)];
    let mut reqs = Vec::new();
    for &(off, len) in &z {
        reqs.push((CMD_WRITE_ZEROES, FLAG_FUA, off, len, vec![]));
        model[off as usize..(off + len as u64) as usize].fill(0);
    }
    for &(off, len) in &t {
        reqs.push((CMD_TRIM, 0, off, len, vec![]));
        // Only the whole blocks inside go; the edges keep their bytes.
        let first = off.div_ceil(4096) * 4096;
        let end = (off + len as u64) / 4096 * 4096;
        model[first as usize..end as usize].fill(0);
    }
    let out = pipelined(&mut c, &reqs);
    assert!(out.iter().all(|(_, e, _)| *e == 0), "seed {s}");
    let (err, got) = c.call(CMD_READ, 0, 0, 1 << 20, &[]);
    assert_eq!(err, 0);
    assert!(
        got == model[..1 << 20],
        "seed {s}: zeroes/trim result differs"
    );
    c.disconnect();
    // The metrics saw it all (600 + 1 writes, one read past the end).
    let mut text = String::new();
    node.metrics.render(&mut text);
    for line in [
        "sluice_nbd_requests_total{op=\"write\"} 601",
        "sluice_nbd_requests_total{op=\"write_zeroes\"} 3",
        "sluice_nbd_requests_total{op=\"trim\"} 1",
        "sluice_nbd_errors_total{op=\"read\"} 1",
        "sluice_nbd_connections_protocol_errors_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    node.stop();
}

#[test]
fn errors_keep_the_connection_usable() {
    let node = Node::start();
    let mut c = Client::connect(node.nbd_addr, VOL).unwrap();
    c.call(CMD_WRITE, 0, 0, 4096, &[5u8; 4096]);
    node.snapshot(VOL, "s1");
    let mut ro = Client::connect(node.nbd_addr, &format!("{VOL}@s1")).unwrap();
    assert_ne!(ro.flags & FLAG_READ_ONLY, 0);
    assert_eq!(c.flags & FLAG_READ_ONLY, 0);
    assert_eq!(ro.call(CMD_WRITE, 0, 0, 4, &[1, 2, 3, 4]).0, EPERM);
    assert_eq!(ro.call(CMD_TRIM, 0, 0, 4096, &[]).0, EPERM);
    assert_eq!(ro.call(CMD_WRITE_ZEROES, 0, 0, 4096, &[]).0, EPERM);
    assert_eq!(ro.call(CMD_FLUSH, 0, 0, 0, &[]).0, 0);
    let (err, d) = ro.call(CMD_READ, 0, 0, 4096, &[]);
    assert_eq!((err, d), (0, vec![5u8; 4096]));
    // Bad flags, out of range, overflow: EINVAL, the connection goes on.
    assert_eq!(c.call(CMD_WRITE, 1 << 1, 0, 4, &[0; 4]).0, EINVAL);
    assert_eq!(c.call(CMD_WRITE, 0, VOL_BYTES - 2, 4, &[0; 4]).0, EINVAL);
    assert_eq!(c.call(CMD_TRIM, 0, u64::MAX - 1, 4, &[]).0, EINVAL);
    let (err, d) = c.call(CMD_READ, 0, 4090, 12, &[]);
    assert_eq!(err, 0);
    assert_eq!(&d[..6], &[5u8; 6]);
    assert_eq!(&d[6..], &[0u8; 6]);
    // Unknown export: the server says so and names it.
    let e = Client::connect(node.nbd_addr, "nope").err().unwrap();
    assert!(e.contains("nope"), "{e}");
    let e = Client::connect(node.nbd_addr, &format!("{VOL}/nope"))
        .err()
        .unwrap();
    assert!(e.contains("no qtree named nope"), "{e}");
    c.disconnect();
    ro.disconnect();
    node.stop();
}

#[test]
fn several_connections_at_once() {
    let s = seed("several_connections_at_once");
    let node = Node::start();
    let addr = node.nbd_addr;
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng = rng(s ^ t);
                let mut c = Client::connect(addr, VOL).unwrap();
                // Each connection owns the blocks t, t+6, t+12, ...
                let mut reqs = Vec::new();
                let mut want = Vec::new();
                for i in 0..200u64 {
                    let mut d = vec![0u8; 4096];
                    rng.fill_bytes(&mut d);
                    reqs.push((CMD_WRITE, 0, (t + 6 * i) * 4096, 4096, d.clone()));
                    want.push(d);
                }
                let out = pipelined(&mut c, &reqs);
                assert!(out.iter().all(|(_, e, _)| *e == 0));
                let reqs: Vec<_> = (0..200u64)
                    .map(|i| (CMD_READ, 0, (t + 6 * i) * 4096, 4096u32, vec![]))
                    .collect();
                for (h, e, d) in pipelined(&mut c, &reqs) {
                    assert_eq!(e, 0);
                    assert!(d == want[h as usize], "seed {s}: conn {t} block {h}");
                }
                c.disconnect();
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    node.stop();
}

/// Four connections each own one quarter of every block in a range and
/// write only their quarter, unaligned, pipelined: the server's
/// read-modify-write must not lose any connection's bytes to another's.
#[test]
fn sub_block_writes_from_several_connections_do_not_clobber() {
    let node = Node::start();
    let addr = node.nbd_addr;
    let blocks = 64u64;
    let rounds = 15u8;
    let threads: Vec<_> = (0..4u64)
        .map(|q| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr, VOL).unwrap();
                for r in 1..=rounds {
                    let reqs: Vec<_> = (0..blocks)
                        .map(|b| {
                            let v = (q as u8) << 4 | r;
                            (CMD_WRITE, 0, b * 4096 + q * 1024, 1024u32, vec![v; 1024])
                        })
                        .collect();
                    assert!(pipelined(&mut c, &reqs).iter().all(|(_, e, _)| *e == 0));
                }
                c.disconnect();
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer thread");
    }
    let mut c = Client::connect(addr, VOL).unwrap();
    let (err, d) = c.call(CMD_READ, 0, 0, (blocks * 4096) as u32, &[]);
    assert_eq!(err, 0);
    for b in 0..blocks as usize {
        for q in 0..4usize {
            let want = (q as u8) << 4 | rounds;
            let part = &d[b * 4096 + q * 1024..b * 4096 + (q + 1) * 1024];
            assert!(
                part.iter().all(|&x| x == want),
                "block {b} quarter {q} lost its last write"
            );
        }
    }
    c.disconnect();
    node.stop();
}
