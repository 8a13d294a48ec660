//! The fixed-newstyle negotiation on the wire, with raw bytes: old-style
//! NBD_OPT_EXPORT_NAME (with and without the 124 zero bytes), INFO then GO
//! on one connection, LIST, ABORT, unsupported options answered with
//! NBD_REP_ERR_UNSUP while the session goes on.

mod nbd_common;

use nbd_common::*;
use std::io::{Read, Write};
use std::net::TcpStream;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

fn open(node: &Node, client_flags: u32) -> TcpStream {
    let mut s = TcpStream::connect(node.nbd_addr).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    assert_eq!(&g[16..], &[0, 3], "FIXED_NEWSTYLE | NO_ZEROES");
    s.write_all(&client_flags.to_be_bytes()).unwrap();
    s
}

fn option(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// One option reply: (option, type, data).
fn reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
    let be = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().unwrap());
    let mut d = vec![0u8; be(16) as usize];
    s.read_exact(&mut d).unwrap();
    (be(8), be(12), d)
}

fn info_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&[0, 2, 0, 1, 0, 2]); // ask NAME and DESCRIPTION
    d
}

fn read_block_works(s: &mut TcpStream) {
    s.write_all(&request(CMD_READ, 0, 42, 0, 4096)).unwrap();
    let (err, handle) = read_reply(s);
    assert_eq!((err, handle), (0, 42));
    let mut d = vec![0u8; 4096];
    s.read_exact(&mut d).unwrap();
    s.write_all(&request(CMD_DISC, 0, 43, 0, 0)).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn export_name_old_style() {
    let node = Node::start();
    for (flags, zeroes) in [(1u32, 124usize), (3, 0)] {
        let mut s = open(&node, flags);
        option(&mut s, 1, VOL.as_bytes());
        let mut b = vec![0u8; 10 + zeroes];
        s.read_exact(&mut b).unwrap();
        assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), VOL_BYTES);
        let tflags = u16::from_be_bytes(b[8..10].try_into().unwrap());
        assert_eq!(
            tflags, 0x16d,
            "HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES MULTI_CONN"
        );
        assert!(b[10..].iter().all(|&x| x == 0));
        read_block_works(&mut s);
    }
    // An unknown export cannot be reported: the server hangs up.
    let mut s = open(&node, 3);
    option(&mut s, 1, b"nope");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    node.stop();
}

#[test]
fn info_list_unsupported_then_go() {
    let node = Node::start();
    node.snapshot(VOL, "s1");
    let mut s = open(&node, 3);
    // INFO on the qtree: export info, block sizes, name, description, ACK.
    option(&mut s, 6, &info_data("vol/qt"));
    let mut infos = Vec::new();
    loop {
        let (opt, typ, d) = reply(&mut s);
        assert_eq!(opt, 6);
        if typ == REP_ACK {
            break;
        }
        assert_eq!(typ, REP_INFO);
        infos.push(d);
    }
    let export = infos
        .iter()
        .find(|d| d[..2] == [0, 0])
        .expect("INFO_EXPORT");
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap()),
        QTREE_BYTES
    );
    let bs = infos
        .iter()
        .find(|d| d[..2] == [0, 3])
        .expect("INFO_BLOCK_SIZE");
    assert_eq!(&bs[2..], &[0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0]);
    let name = infos.iter().find(|d| d[..2] == [0, 1]).expect("INFO_NAME");
    assert_eq!(&name[2..], b"vol/qt");
    assert!(infos.iter().any(|d| d[..2] == [0, 2]), "INFO_DESCRIPTION");
    // INFO on an unknown export: an error with a message; the session goes on.
    option(&mut s, 6, &info_data("vol@nope"));
    let (_, typ, msg) = reply(&mut s);
    assert_eq!(typ, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("no snapshot named nope"));
    // LIST: every export, then ACK.
    option(&mut s, 3, &[]);
    let mut names = Vec::new();
    loop {
        let (_, typ, d) = reply(&mut s);
        if typ == REP_ACK {
            break;
        }
        assert_eq!(typ, REP_SERVER);
        let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
    }
    names.sort();
    assert_eq!(names, ["vol", "vol/qt", "vol/qt@s1", "vol@s1"]);
    // STARTTLS, STRUCTURED_REPLY, an unknown option: UNSUP, with data consumed.
    for opt in [5u32, 8, 9, 10, 1000] {
        option(&mut s, opt, b"some data");
        let (o, typ, _) = reply(&mut s);
        assert_eq!((o, typ), (opt, REP_ERR_UNSUP));
    }
    // GO on the snapshot: read-only flags, then transmission.
    option(&mut s, 7, &info_data("vol@s1"));
    let mut flags = None;
    loop {
        let (_, typ, d) = reply(&mut s);
        if typ == REP_ACK {
            break;
        }
        if d[..2] == [0, 0] {
            flags = Some(u16::from_be_bytes(d[10..12].try_into().unwrap()));
        }
    }
    assert_ne!(flags.unwrap() & FLAG_READ_ONLY, 0);
    read_block_works(&mut s);
    node.stop();
}

#[test]
fn abort_is_acknowledged() {
    let node = Node::start();
    let mut s = open(&node, 3);
    option(&mut s, 2, &[]);
    assert_eq!(reply(&mut s), (2, REP_ACK, vec![]));
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert_eq!(node.metrics.protocol_errors(), 0);
    node.stop();
}
