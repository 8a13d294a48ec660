//! Shared setup of the NBD end-to-end tests: a node serving NBD on
//! 127.0.0.1, and a tiny raw NBD client.
//!
//! Today the node is in-process: a real engine on a temp file (io_uring,
//! O_DIRECT where the filesystem allows) and `NbdServer::start` on
//! 127.0.0.1:0. Everything the tests need from "the node" goes through
//! [`Node`] (create volumes, qtrees, snapshots; its NBD address), so
//! switching it to a spawned `sluice serve` daemon changes this file only.
#![allow(dead_code)]

use sluice::nbd::{NbdMetrics, NbdServer};
use sluice_engine::api::{Image, NsName, Reply, Request};
use sluice_engine::device::uring::{UringDevice, UringOptions};
use sluice_engine::device::AlignedBuf;
use sluice_engine::pool::{FormatOptions, Pool};
use sluice_engine::shard::{Engine, EngineHandle, EngineOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;

pub const POOL_BYTES: u64 = 512 << 20;
/// The volume every test gets, and its qtree.
pub const VOL: &str = "vol";
pub const VOL_BYTES: u64 = 64 << 20;
pub const QTREE: &str = "qt";
pub const QTREE_BYTES: u64 = 16 << 20;

/// The seed of a randomized test: `SLUICE_SEED` or fresh, printed.
pub fn seed() -> u64 {
    let s = std::env::var("SLUICE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("SLUICE_SEED={s}");
    s
}

/// The path of a qemu tool, or `None` after printing that the test skips.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        eprintln!("skipped: {name} not found");
    }
    found
}

/// A node serving NBD: volume [`VOL`] with qtree [`QTREE`].
pub struct Node {
    pub nbd_addr: SocketAddr,
    pub metrics: Arc<NbdMetrics>,
    engine: EngineHandle,
    server: Option<NbdServer>,
    _dir: tempfile::TempDir,
}

impl Node {
    pub fn start() -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let dev = UringDevice::create(
            &dir.path().join("pool.img"),
            POOL_BYTES,
            UringOptions::default(),
        )
        .expect("pool file");
        let pool = Pool::format(dev, FormatOptions::default()).expect("format");
        let engine = Engine::start(pool, EngineOptions::default());
        let metrics = Arc::new(NbdMetrics::new());
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let server =
            NbdServer::start(listener, engine.clone(), metrics.clone()).expect("NBD server");
        let node = Node {
            nbd_addr: server.local_addr(),
            metrics,
            engine,
            server: Some(server),
            _dir: dir,
        };
        node.create_volume(VOL, VOL_BYTES);
        node.create_qtree(VOL, QTREE, QTREE_BYTES);
        node
    }

    fn call(&self, req: Request) -> Reply {
        let what = format!("{req:?}");
        self.engine
            .call(req)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    pub fn create_volume(&self, name: &str, size_bytes: u64) {
        self.call(Request::CreateVolume {
            name: name.into(),
            size_bytes,
        });
    }

    pub fn create_qtree(&self, volume: &str, name: &str, size_bytes: u64) {
        self.call(Request::CreateQtree {
            volume: volume.into(),
            name: name.into(),
            size_bytes,
        });
    }

    pub fn snapshot(&self, volume: &str, name: &str) {
        self.call(Request::CreateSnapshot {
            volume: volume.into(),
            name: name.into(),
            id: None,
            created_unix_ms: None,
        });
    }

    /// Whole-block write straight into the engine (test setup, not NBD).
    pub fn write_direct(&self, ns: &NsName, lba: u64, data: &[u8]) {
        self.call(Request::Write {
            ns: ns.clone(),
            lba,
            data: AlignedBuf::from_slice(data),
            fua: false,
            replica: false,
        });
    }

    /// Read straight from the engine (checking, not NBD).
    pub fn read_direct(&self, image: &Image, lba: u64, len_blocks: u32) -> Vec<u8> {
        match self.call(Request::Read {
            image: image.clone(),
            lba,
            len_blocks,
        }) {
            Reply::Data(b) => b.as_slice().to_vec(),
            other => panic!("read answered {other:?}"),
        }
    }

    /// qemu's `--image-opts` for an export.
    pub fn image_opts(&self, export: &str) -> String {
        format!(
            "driver=nbd,server.type=inet,server.host={},server.port={},export={export}",
            self.nbd_addr.ip(),
            self.nbd_addr.port()
        )
    }

    pub fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
        self.engine.shutdown().expect("engine shutdown");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
        let _ = self.engine.shutdown();
    }
}

// ------------------------------------------------------------------------
// A tiny raw NBD client (written from the spec, independent of the server's
// codec so the two check each other).
// ------------------------------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;
pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const FLAG_READ_ONLY: u16 = 1 << 1;

/// The client's side of a handshake choosing `export` with NBD_OPT_GO,
/// as bytes (used to record sessions).
pub fn go_bytes(export: &str) -> Vec<u8> {
    let mut b = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&3u16.to_be_bytes()); // NBD_INFO_BLOCK_SIZE
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&(d.len() as u32).to_be_bytes());
    b.extend_from_slice(&d);
    b
}

pub fn request(cmd: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// A connected client in the transmission phase.
pub struct Client {
    pub stream: TcpStream,
    pub size: u64,
    pub flags: u16,
}

impl Client {
    /// Connect and GO; `Err` carries the server's option error message.
    pub fn connect(addr: SocketAddr, export: &str) -> Result<Client, String> {
        let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g).map_err(|e| e.to_string())?;
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&go_bytes(export)).map_err(|e| e.to_string())?;
        let (mut size, mut flags) = (None, 0);
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).map_err(|e| e.to_string())?;
            assert_eq!(&h[..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
            let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut d = vec![0u8; len];
            s.read_exact(&mut d).map_err(|e| e.to_string())?;
            match typ {
                1 => break,
                3 if d.len() >= 12 && d[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap()));
                    flags = u16::from_be_bytes(d[10..12].try_into().unwrap());
                }
                3 => {}
                t if t & (1 << 31) != 0 => {
                    return Err(String::from_utf8_lossy(&d).into_owned());
                }
                t => panic!("unexpected option reply type {t}"),
            }
        }
        Ok(Client {
            stream: s,
            size: size.expect("NBD_INFO_EXPORT before the ACK"),
            flags,
        })
    }

    pub fn send(&mut self, cmd: u16, flags: u16, handle: u64, offset: u64, len: u32, data: &[u8]) {
        let mut b = request(cmd, flags, handle, offset, len);
        b.extend_from_slice(data);
        self.stream.write_all(&b).expect("send request");
    }

    /// Read one simple reply header: (error, handle).
    pub fn reply(&mut self) -> (u32, u64) {
        read_reply(&mut self.stream)
    }

    /// One request, one reply; the read data if any.
    pub fn call(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> (u32, Vec<u8>) {
        self.send(cmd, flags, 0xfeed, offset, len, data);
        let (err, handle) = self.reply();
        assert_eq!(handle, 0xfeed);
        let mut d = Vec::new();
        if cmd == CMD_READ && err == 0 {
            d = vec![0u8; len as usize];
            self.stream.read_exact(&mut d).expect("read data");
        }
        (err, d)
    }

    pub fn disconnect(mut self) {
        self.send(CMD_DISC, 0, 0, 0, 0, &[]);
        let mut rest = Vec::new();
        let _ = self.stream.read_to_end(&mut rest);
        assert!(rest.is_empty(), "bytes after DISC");
    }
}

pub fn read_reply(s: &mut impl Read) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).expect("reply header");
    assert_eq!(&r[..4], &0x6744_6698u32.to_be_bytes(), "reply magic");
    (
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
    )
}
