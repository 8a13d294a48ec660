//! The cascade simulator's parts: the world (clock, network: `net`) and
//! nodes that each run a real engine on a `SimDevice` and a real
//! `Replicator` with `background: false`, crash (the device freezes, only
//! its durable image survives) and restart from that image.
#![allow(dead_code)]

pub mod net;

use std::sync::Arc;

use sluice_engine::api::{Image, NsName, Reply, Request, SnapshotName};
use sluice_engine::device::sim::{CrashMode, SimDevice, SimHandle};
use sluice_engine::shard::{Engine, EngineHandle};
use sluice_engine::{FormatOptions, Pool};
use sluice_replicator::{Replicator, ReplicatorConfig};

pub use net::{Cut, NodeEnv, Pause, Slow, World};

/// Blocks of every node's pool (sparse: only what is written costs memory).
pub const POOL_BLOCKS: u64 = 16 << 10;

enum State {
    Up {
        sim: SimHandle,
        engine: EngineHandle,
        repl: Arc<Replicator>,
    },
    Down {
        image: SimDevice,
    },
    Lost,
}

/// One simulated node.
pub struct SimNode {
    pub name: String,
    pub addr: String,
    pub cfg: ReplicatorConfig,
    world: Arc<World>,
    state: State,
}

impl SimNode {
    /// A node with a freshly formatted pool, attached to the network.
    pub fn new(world: &Arc<World>, name: &str, mut cfg: ReplicatorConfig) -> SimNode {
        cfg.env = Arc::new(NodeEnv::new(world.clone(), name));
        cfg.background = false;
        let dev = SimDevice::new(POOL_BLOCKS);
        let sim = dev.handle();
        let pool = Pool::format(dev, FormatOptions::default()).expect("format a sim pool");
        let mut n = SimNode {
            name: name.into(),
            addr: format!("sim-{name}:7000"),
            cfg,
            world: world.clone(),
            state: State::Lost,
        };
        n.boot(sim, pool);
        n
    }

    fn boot(&mut self, sim: SimHandle, pool: Pool<SimDevice>) {
        let engine = Engine::start_inline(pool);
        let repl = Replicator::start(engine.clone(), self.cfg.clone()).expect("replicator start");
        self.world.attach(&self.addr, &self.name, repl.clone());
        self.state = State::Up { sim, engine, repl };
    }

    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up { .. })
    }

    pub fn is_lost(&self) -> bool {
        matches!(self.state, State::Lost)
    }

    pub fn repl(&self) -> Option<&Arc<Replicator>> {
        match &self.state {
            State::Up { repl, .. } => Some(repl),
            _ => None,
        }
    }

    pub fn engine(&self) -> Option<&EngineHandle> {
        match &self.state {
            State::Up { engine, .. } => Some(engine),
            _ => None,
        }
    }

    /// Freeze the device after `ops` more writes/flushes (a crash inside
    /// whatever runs next).
    pub fn arm_crash(&self, ops: u64) {
        if let State::Up { sim, .. } = &self.state {
            sim.crash_after_ops(ops);
        }
    }

    /// True when an armed crash has frozen the device.
    pub fn frozen(&self) -> bool {
        match &self.state {
            State::Up { sim, .. } => sim.is_frozen(),
            _ => false,
        }
    }

    /// Power cut now: only the durable image survives.
    pub fn crash(&mut self) {
        let State::Up { sim, engine, repl } = std::mem::replace(&mut self.state, State::Lost)
        else {
            return;
        };
        self.world.detach(&self.addr);
        sim.crash_after_ops(0);
        // Nothing reaches the medium from here on: the shutdown's writes
        // fail on the frozen device.
        repl.shutdown();
        let _ = engine.shutdown();
        drop(repl);
        self.world.settle();
        let image = sim.crash_image(CrashMode::DropAll, 0);
        self.state = State::Down { image };
    }

    /// Restart a crashed node from its durable image.
    pub fn restart(&mut self) {
        let State::Down { image } = std::mem::replace(&mut self.state, State::Lost) else {
            return;
        };
        let sim = image.handle();
        let pool = Pool::open(image).expect("a crashed sim pool opens");
        self.boot(sim, pool);
    }

    /// Crash for good.
    pub fn lose(&mut self) {
        self.crash();
        self.state = State::Lost;
    }

    /// Stop at the end of a scenario.
    pub fn stop(&mut self) {
        if let State::Up { engine, repl, .. } = std::mem::replace(&mut self.state, State::Lost) {
            self.world.detach(&self.addr);
            repl.shutdown();
            let _ = engine.shutdown();
        }
    }

    pub fn call(&self, req: Request) -> Option<sluice_engine::Result<Reply>> {
        self.engine().map(|e| e.call(req))
    }

    /// Snapshots of `vol`, oldest first (empty when down or missing): the
    /// name listing, which walks no plane.
    pub fn snaps(&self, vol: &str) -> Vec<SnapshotName> {
        match self.call(Request::ListSnapshotNames { volume: vol.into() }) {
            Some(Ok(Reply::SnapshotNames(s))) => s,
            _ => Vec::new(),
        }
    }

    /// The image of `ns` at snapshot `snap`, `blocks` long.
    pub fn read(&self, ns: &NsName, snap: &str, blocks: u64) -> Option<Vec<u8>> {
        match self.call(Request::Read {
            image: Image {
                ns: ns.clone(),
                snapshot: Some(snap.into()),
            },
            lba: 0,
            len_blocks: blocks as u32,
        })? {
            Ok(Reply::Data(d)) => Some(d.as_slice().to_vec()),
            _ => None,
        }
    }
}
