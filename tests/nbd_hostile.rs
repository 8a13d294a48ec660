//! Hostile NBD clients: named violations (bad magic, oversized lengths,
//! unknown command, garbage, disconnect mid-request, a client that never
//! reads) and seeded random and mutated byte streams (from a recorded good
//! session). Each connection is closed by the server; nothing panics; a
//! good client works throughout and afterwards.
//! `SLUICE_SEED=<n>` replays a run.

mod nbd_common;

use nbd_common::*;
use rand::{Rng, RngCore};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

/// The client's bytes of a complete good session on export `vol`.
fn good_session() -> Vec<u8> {
    let mut b = go_bytes(VOL);
    b.extend(request(CMD_WRITE, 0, 1, 4096, 8192));
    b.extend(vec![0xa5; 8192]);
    b.extend(request(CMD_READ, 0, 2, 0, 4096));
    b.extend(request(CMD_WRITE, FLAG_FUA, 3, 5000, 100));
    b.extend(vec![0x5a; 100]);
    b.extend(request(CMD_FLUSH, 0, 4, 0, 0));
    b.extend(request(CMD_TRIM, 0, 5, 8192, 4096));
    b.extend(request(CMD_WRITE_ZEROES, 0, 6, 10_000, 3));
    b.extend(request(CMD_READ, 0, 7, 0, 12_288));
    b.extend(request(CMD_DISC, 0, 8, 0, 0));
    b
}

/// Send `bytes`, close our sending side, and read until the server closes.
/// Returns what the server sent. Panics if the server keeps the connection
/// open (it must close after EOF, DISC or a violation).
fn play(addr: SocketAddr, bytes: &[u8], what: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let data = bytes.to_vec();
    let sender = std::thread::spawn(move || {
        // The server may close first: errors here are expected.
        let _ = w.write_all(&data);
        let _ = w.shutdown(Shutdown::Write);
    });
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{what}: the server did not close the connection: {e}"),
        }
    }
    sender.join().unwrap();
    got
}

fn check_good_client(node: &Node, round: u64) {
    let mut c = Client::connect(node.nbd_addr, VOL).expect("good client connects");
    let block = 1000 + round % 1000;
    let data = vec![(round as u8) | 1; 4096];
    assert_eq!(c.call(CMD_WRITE, 0, block * 4096, 4096, &data).0, 0);
    let (err, got) = c.call(CMD_READ, 0, block * 4096, 4096, &[]);
    assert_eq!(err, 0);
    assert!(got == data, "good client read back other data");
    c.disconnect();
}

#[test]
fn the_good_session_works() {
    let node = Node::start();
    let got = play(node.nbd_addr, &good_session(), "good session");
    // Greeting, three option replies (export, block size, ACK), then 7
    // simple replies (DISC has none) and 4096 + 12288 bytes of read data.
    let option_replies = 3 * 20 + 12 + 14;
    assert_eq!(got.len(), 18 + option_replies + 7 * 16 + 4096 + 12_288);
    assert_eq!(node.metrics.protocol_errors(), 0);
    node.stop();
}

#[test]
fn named_violations_close_the_connection() {
    let node = Node::start();
    let addr = node.nbd_addr;
    let go = go_bytes(VOL);
    let with = |tail: Vec<u8>| [go.clone(), tail].concat();
    let mut bad_magic = request(CMD_READ, 0, 1, 0, 4096);
    bad_magic[0] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage instead of client flags",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ),
        ("old-style client flags", vec![0, 0, 0, 0]),
        (
            "bad option magic",
            [vec![0, 0, 0, 3], b"IHAVEOPX".to_vec(), vec![0; 8]].concat(),
        ),
        (
            "1 GiB option",
            [
                vec![0, 0, 0, 3],
                b"IHAVEOPT".to_vec(),
                vec![0, 0, 0, 7, 0x40, 0, 0, 0],
            ]
            .concat(),
        ),
        ("bad request magic", with(bad_magic)),
        (
            "oversized write",
            with(request(CMD_WRITE, 0, 1, 0, (32 << 20) + 1)),
        ),
        ("oversized read", with(request(CMD_READ, 0, 1, 0, u32::MAX))),
        ("unknown command", with(request(77, 0, 1, 0, 0))),
        (
            "cut in a header",
            with(request(CMD_READ, 0, 1, 0, 4096)[..10].to_vec()),
        ),
        (
            "cut in a payload",
            with([request(CMD_WRITE, 0, 1, 0, 4096), vec![1; 100]].concat()),
        ),
        ("cut in option data", [go[..go.len() - 3].to_vec()].concat()),
    ];
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let before = node.metrics.protocol_errors();
        play(addr, bytes, what);
        // The server counts it as a protocol error once the connection is
        // gone; wait for that (it is asynchronous to our EOF).
        let mut spins = 0;
        while node.metrics.protocol_errors() == before {
            spins += 1;
            assert!(spins < 6000, "{what}: not counted as a protocol error");
            std::thread::sleep(Duration::from_millis(5));
        }
        check_good_client(&node, i as u64);
    }
    node.stop();
}

#[test]
fn a_client_that_never_reads_does_not_stop_others() {
    let node = Node::start();
    let mut bad = Client::connect(node.nbd_addr, VOL).unwrap();
    bad.stream
        .set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for h in 0..2000u64 {
        let r = request(CMD_READ, 0, h, 0, 1 << 20);
        if bad.stream.write_all(&r).is_err() {
            break;
        }
    }
    for round in 0..20 {
        check_good_client(&node, round);
    }
    drop(bad);
    check_good_client(&node, 99);
    node.stop();
}

#[test]
fn random_and_mutated_streams() {
    let s = seed("random_and_mutated_streams");
    let mut rng = rng(s);
    let node = Node::start();
    let good = good_session();
    let rounds = 1000u64;
    for round in 0..rounds {
        let kind = rng.gen_range(0..6);
        let bytes = match kind {
            // Pure noise.
            0 => {
                let mut b = vec![0u8; rng.gen_range(0..4096)];
                rng.fill_bytes(&mut b);
                b
            }
            // Noise after a valid handshake.
            1 => {
                let mut b = vec![0u8; rng.gen_range(0..4096)];
                rng.fill_bytes(&mut b);
                [go_bytes(VOL), b].concat()
            }
            // Flipped bytes.
            2 => {
                let mut b = good.clone();
                for _ in 0..rng.gen_range(1..8) {
                    let i = rng.gen_range(0..b.len());
                    b[i] ^= 1 << rng.gen_range(0..8);
                }
                b
            }
            // Truncated.
            3 => good[..rng.gen_range(0..good.len())].to_vec(),
            // Garbage inserted.
            4 => {
                let mut b = good.clone();
                let at = rng.gen_range(0..b.len());
                let mut g = vec![0u8; rng.gen_range(1..64)];
                rng.fill_bytes(&mut g);
                b.splice(at..at, g);
                b
            }
            // A 4-byte word overwritten with an extreme value (lengths,
            // magics, command types, offsets).
            _ => {
                let mut b = good.clone();
                let at = rng.gen_range(0..b.len() - 4);
                let v: u32 = [0, u32::MAX, 1 << 31, 32 << 20, (32 << 20) + 1][rng.gen_range(0..5)];
                b[at..at + 4].copy_from_slice(&v.to_be_bytes());
                b
            }
        };
        play(
            node.nbd_addr,
            &bytes,
            &format!("seed {s} round {round} kind {kind}"),
        );
        if round % 50 == 0 {
            check_good_client(&node, round);
        }
    }
    check_good_client(&node, rounds);
    eprintln!(
        "seed {s}: {rounds} hostile streams, {} closed as protocol errors",
        node.metrics.protocol_errors()
    );
    assert!(node.metrics.protocol_errors() > 0);
    node.stop();
}
