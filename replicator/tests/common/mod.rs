//! Test harness that plays the daemon: per node a file-backed pool, an
//! engine, a `Replicator` and an accept loop on 127.0.0.1 that hands every
//! connection to `handle_peer`. A node can be restarted on the same pool
//! file and port. Seeds and the fault-injecting TCP proxy come from
//! `sluice_testkit` (re-exported here).
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use sluice_engine::api::{Image, NsName, Reply, Request, SnapshotInfo};
use sluice_engine::device::uring::{UringDevice, UringOptions};
use sluice_engine::device::AlignedBuf;
use sluice_engine::shard::{Engine, EngineHandle, EngineOptions};
use sluice_engine::{FormatOptions, Pool};
use sluice_replicator::{Replicator, ReplicatorConfig};
#[allow(unused_imports)] // not every test file uses the proxy
pub use sluice_testkit::proxy::{Fault, Proxy};
#[allow(unused_imports)]
pub use sluice_testkit::{rng, seed};

pub const POOL_BYTES: u64 = 96 << 20;
pub const VOL_BYTES: u64 = 8 << 20;
pub const VOL_BLOCKS: u64 = VOL_BYTES / 4096;

type Slot = Arc<Mutex<Option<Arc<Replicator>>>>;

pub struct Node {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub engine: EngineHandle,
    pub repl: Arc<Replicator>,
    pub addr: String,
    slot: Slot,
    stop: Arc<AtomicBool>,
    pub cfg: ReplicatorConfig,
}

pub fn config(name: &str, secret: Option<&[u8]>) -> ReplicatorConfig {
    let mut c = ReplicatorConfig::new(name);
    c.peer_secret = secret.map(<[u8]>::to_vec);
    // Without a secret these nodes run in the explicit insecure mode (the
    // tests of the refusal without either build their own config).
    c.insecure_peers = secret.is_none();
    c.tick = Duration::from_millis(100);
    c.peer_timeout = Duration::from_secs(10);
    // Dense checkpoints so small test transfers have resume points.
    c.checkpoint = sluice_replicator::transfer::CheckpointPolicy {
        every_items: 32,
        every_bytes: 1 << 20,
    };
    c
}

impl Node {
    pub fn start(name: &str) -> Node {
        Node::with_config(config(name, None))
    }

    pub fn with_config(cfg: ReplicatorConfig) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pool.img");
        let dev =
            UringDevice::create(&path, POOL_BYTES, UringOptions::default()).expect("pool file");
        let pool = Pool::format(dev, FormatOptions::default()).expect("format");
        let engine = Engine::start(pool, EngineOptions::default());
        let repl = Replicator::start(engine.clone(), cfg.clone()).expect("replicator start");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let slot: Slot = Arc::new(Mutex::new(Some(repl.clone())));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let slot = slot.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for s in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(s) = s else { continue };
                    let r = slot.lock().unwrap().clone();
                    if let Some(r) = r {
                        std::thread::spawn(move || r.handle_peer(s));
                    }
                }
            });
        }
        Node {
            name: cfg.node_name.clone(),
            dir,
            engine,
            repl,
            addr,
            slot,
            stop,
            cfg,
        }
    }

    fn pool_path(&self) -> PathBuf {
        self.dir.path().join("pool.img")
    }

    /// Stop the replicator and the engine, reopen the same pool file and
    /// start a new replicator behind the same port.
    pub fn restart(&mut self) {
        self.restart_with(self.cfg.clone());
    }

    pub fn restart_with(&mut self, cfg: ReplicatorConfig) {
        self.restart_editing(cfg, |_| {});
    }

    /// Restart, running `edit` on the engine between the replicator's
    /// shutdown and the engine's (what a crash could have left).
    pub fn restart_editing(&mut self, cfg: ReplicatorConfig, edit: impl FnOnce(&EngineHandle)) {
        *self.slot.lock().unwrap() = None;
        self.repl.shutdown();
        edit(&self.engine);
        self.engine.shutdown().expect("engine shutdown");
        let dev = UringDevice::open(&self.pool_path(), UringOptions::default()).expect("reopen");
        let pool = Pool::open(dev).expect("pool open");
        self.engine = Engine::start(pool, EngineOptions::default());
        self.repl = Replicator::start(self.engine.clone(), cfg.clone()).expect("restart");
        self.cfg = cfg;
        *self.slot.lock().unwrap() = Some(self.repl.clone());
    }

    pub fn create_volume(&self, vol: &str) {
        self.engine
            .call(Request::CreateVolume {
                name: vol.into(),
                size_bytes: VOL_BYTES,
            })
            .expect("create volume");
    }

    pub fn create_qtree(&self, vol: &str, q: &str, size: u64) {
        self.engine
            .call(Request::CreateQtree {
                volume: vol.into(),
                name: q.into(),
                size_bytes: size,
            })
            .expect("create qtree");
    }

    /// Write `n` random blocks (random content, some trims) into `ns`.
    pub fn churn(&self, ns: &NsName, blocks: u64, n: u64, r: &mut impl Rng) {
        for _ in 0..n {
            let lba = r.gen_range(0..blocks);
            if r.gen_ratio(1, 12) {
                let len = r.gen_range(1..8).min(blocks - lba);
                self.engine
                    .call(Request::Trim {
                        ns: ns.clone(),
                        lba,
                        len_blocks: len,
                        replica: false,
                    })
                    .expect("trim");
                continue;
            }
            let len = r.gen_range(1..4u64).min(blocks - lba);
            let mut b = AlignedBuf::zeroed(len as usize);
            r.fill(b.as_mut_slice());
            self.engine
                .call(Request::Write {
                    ns: ns.clone(),
                    lba,
                    data: b,
                    fua: false,
                    replica: false,
                })
                .expect("write");
        }
    }

    /// Write one random block at every `stride`-th lba: many separate extents.
    pub fn sparse(&self, ns: &NsName, blocks: u64, stride: u64, r: &mut impl Rng) {
        let mut lba = r.gen_range(0..stride);
        while lba < blocks {
            let mut b = AlignedBuf::zeroed(1);
            r.fill(b.as_mut_slice());
            self.engine
                .call(Request::Write {
                    ns: ns.clone(),
                    lba,
                    data: b,
                    fua: false,
                    replica: false,
                })
                .expect("write");
            lba += stride;
        }
    }

    pub fn snap(&self, vol: &str, name: &str) -> SnapshotInfo {
        self.repl.snap_create(vol, name).expect("snap create")
    }

    pub fn snaps(&self, vol: &str) -> Vec<SnapshotInfo> {
        match self
            .engine
            .call(Request::ListSnapshots { volume: vol.into() })
        {
            Ok(Reply::Snapshots(s)) => s,
            other => panic!("list snapshots of {vol}: {other:?}"),
        }
    }

    pub fn snap_names(&self, vol: &str) -> Vec<String> {
        self.snaps(vol).into_iter().map(|s| s.name).collect()
    }

    /// Whole image of a namespace (live or snapshot) as bytes.
    pub fn read_all(&self, ns: &NsName, snapshot: Option<&str>, blocks: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity((blocks * 4096) as usize);
        let mut lba = 0;
        while lba < blocks {
            let n = (blocks - lba).min(1024);
            match self.engine.call(Request::Read {
                image: Image {
                    ns: ns.clone(),
                    snapshot: snapshot.map(str::to_string),
                },
                lba,
                len_blocks: n as u32,
            }) {
                Ok(Reply::Data(d)) => out.extend_from_slice(d.as_slice()),
                other => panic!("read {ns}: {other:?}"),
            }
            lba += n;
        }
        out
    }

    pub fn shutdown(self) {
        self.stop.store(true, Ordering::SeqCst);
        *self.slot.lock().unwrap() = None;
        self.repl.shutdown();
        let _ = TcpStream::connect(&self.addr);
        let _ = self.engine.shutdown();
    }
}

pub fn spec(dst: &str, src: &Node, vol: &str) -> sluice_replicator::MirrorSpec {
    sluice_replicator::MirrorSpec {
        dst_volume: dst.into(),
        source_addr: src.addr.clone(),
        source_volume: vol.into(),
        source_qtree: None,
        dst_qtree: None,
        every: None,
        follow: false,
        throttle_bps: None,
        keep: None,
    }
}

/// Poll `f` until it holds (a correctness wait, not a timing assertion).
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < end, "gave up waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn noprog(_: sluice_replicator::Progress) {}
