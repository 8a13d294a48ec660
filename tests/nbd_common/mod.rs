//! Shared setup of the NBD end-to-end tests: a real `sluice serve` process
//! (pool file in a temp folder, peers and NBD on 127.0.0.1 ports chosen
//! by the kernel), set up through the real CLI; and a tiny raw NBD client.
//! Metrics are read the way an operator reads them: `GET /metrics`.
#![allow(dead_code)]

/// The e2e harness (tests/common), for test files that need both it and
/// the raw client (a second `mod common;` beside this one would compile
/// it twice).
#[path = "../common/mod.rs"]
pub mod harness;

use harness::{init_pool, Daemon};
use sluice_engine::api::{Image, NsName};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

pub const POOL_SIZE: &str = "512M";
/// The volume every test gets, and its qtree.
pub const VOL: &str = "vol";
pub const VOL_BYTES: u64 = 64 << 20;
pub const QTREE: &str = "qt";
pub const QTREE_BYTES: u64 = 16 << 20;

/// Seeds, generators and tool lookups come from the shared test kit.
#[allow(unused_imports)] // not every test file uses every item
pub use sluice_testkit::{rng, seed, tool};

/// The daemon's metrics, scraped over HTTP.
pub struct Metrics {
    /// The peer address, where `/metrics` is served.
    listen: String,
}

impl Metrics {
    /// The whole `/metrics` body.
    pub fn scrape(&self) -> String {
        harness::without_node_label(&harness::scrape(&self.listen))
    }

    pub fn render(&self, out: &mut String) {
        out.push_str(&self.scrape());
    }

    fn value(&self, name: &str) -> u64 {
        self.scrape()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn protocol_errors(&self) -> u64 {
        self.value("sluice_nbd_connections_protocol_errors_total")
    }
}

/// A node serving NBD: volume [`VOL`] with qtree [`QTREE`].
pub struct Node {
    pub nbd_addr: SocketAddr,
    pub metrics: Metrics,
    daemon: Option<Daemon>,
    _dir: tempfile::TempDir,
}

fn export(image: &Image) -> String {
    let mut e = image.ns.volume.clone();
    if let Some(q) = &image.ns.qtree {
        e = format!("{e}/{q}");
    }
    if let Some(s) = &image.snapshot {
        e = format!("{e}@{s}");
    }
    e
}

impl Node {
    pub fn start() -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let pool = init_pool(dir.path(), "pool.img", POOL_SIZE);
        let daemon = Daemon::start(&pool);
        let node = Node {
            nbd_addr: daemon.nbd.parse().expect("NBD address"),
            metrics: Metrics {
                listen: daemon.listen.clone(),
            },
            daemon: Some(daemon),
            _dir: dir,
        };
        node.create_volume(VOL, VOL_BYTES);
        node.create_qtree(VOL, QTREE, QTREE_BYTES);
        node
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    pub fn create_volume(&self, name: &str, size_bytes: u64) {
        self.daemon()
            .ok(&["vol", "create", name, "--size", &size_bytes.to_string()]);
    }

    pub fn create_qtree(&self, volume: &str, name: &str, size_bytes: u64) {
        self.daemon().ok(&[
            "qtree",
            "create",
            volume,
            name,
            "--size",
            &size_bytes.to_string(),
        ]);
    }

    pub fn snapshot(&self, volume: &str, name: &str) {
        self.daemon().ok(&["snap", "create", volume, name]);
    }

    /// Whole-block write for test setup, through its own NBD connection.
    pub fn write_direct(&self, ns: &NsName, lba: u64, data: &[u8]) {
        let image = Image {
            ns: ns.clone(),
            snapshot: None,
        };
        let mut c = Client::connect(self.nbd_addr, &export(&image)).expect("connect");
        let (err, _) = c.call(CMD_WRITE, 0, lba * 4096, data.len() as u32, data);
        assert_eq!(err, 0, "setup write to {}", export(&image));
        c.disconnect();
    }

    /// Read for checking, through its own NBD connection.
    pub fn read_direct(&self, image: &Image, lba: u64, len_blocks: u32) -> Vec<u8> {
        let mut c = Client::connect(self.nbd_addr, &export(image)).expect("connect");
        let (err, data) = c.call(CMD_READ, 0, lba * 4096, len_blocks * 4096, &[]);
        assert_eq!(err, 0, "check read of {}", export(image));
        c.disconnect();
        data
    }

    /// qemu's `--image-opts` for an export.
    pub fn image_opts(&self, export: &str) -> String {
        format!(
            "driver=nbd,server.type=inet,server.host={},server.port={},export={export}",
            self.nbd_addr.ip(),
            self.nbd_addr.port()
        )
    }

    /// Graceful stop (SIGTERM): the daemon must exit 0.
    pub fn stop(mut self) {
        if let Some(d) = self.daemon.take() {
            let status = d.term();
            assert!(status.success(), "daemon exit: {status:?}");
        }
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
