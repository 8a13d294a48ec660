//! The writers: per namespace, several threads over disjoint stripes of its
//! blocks (writer w owns the lbas with lba % writers == w), each on its own
//! NBD connection to the source node, writing seeded patterns with a FUA
//! write now and then and a flush every few writes, and keeping the model
//! (`model::Namespace`) up to date: a block is durable at the generation
//! its FUA write or the flush after it acknowledged.
//!
//! Invariants: the generation is set in the model before the write is
//! sent, so a write cut by a fault is still covered by `[durable, last]`;
//! a write whose answer was lost is re-read when the writer reconnects and
//! the model takes what the node really holds (it must lie in that range).

use super::model::{decode, pattern, Namespace, BLOCK_BYTES};
use super::report::Tally;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice::nbd_client::NbdClient as Nbd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const NBD_TIMEOUT: Duration = Duration::from_secs(40);

pub struct Writer {
    pub ns: Arc<Namespace>,
    pub index: u64,
    pub writers: u64,
    pub nbd_addr: String,
    pub seed: u64,
    pub rng_seed: u64,
    pub tally: Arc<Tally>,
    pub stop: Arc<AtomicBool>,
    /// The source node is up (else the writer waits instead of connecting).
    pub source_up: Arc<AtomicBool>,
}

impl Writer {
    pub fn run(self) {
        let mut rng = SmallRng::seed_from_u64(self.rng_seed);
        let mut conn: Option<Nbd> = None;
        let mut dirty: Vec<u64> = Vec::new();
        let mut uncertain: Vec<u64> = Vec::new();
        let mut until_flush = rng.gen_range(4..32u32);
        let stripe = self.ns.span_blocks / self.writers;
        while !self.stop.load(Ordering::SeqCst) {
            if conn.is_none() {
                if !self.source_up.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                match Nbd::open_with_timeout(&self.nbd_addr, &self.ns.export, NBD_TIMEOUT) {
                    Ok(c) => {
                        self.tally.add("nbd.connects", 1);
                        conn = Some(c);
                    }
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(300));
                        continue;
                    }
                }
                if !self.resolve(conn.as_mut(), &mut uncertain) {
                    // The node answers but cannot read (its disk fails):
                    // retry later, not in a tight loop.
                    conn = None;
                    std::thread::sleep(Duration::from_millis(300));
                    continue;
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            let lba = self.index + self.writers * rng.gen_range(0..stripe);
            let fua = rng.gen_bool(0.1);
            let gate = self.ns.gate.read().unwrap_or_else(|p| p.into_inner());
            let gen = {
                let mut b = self.ns.blocks();
                let e = &mut b[lba as usize];
                e.next += 1;
                e.last = e.next;
                e.next
            };
            let data = pattern(self.seed, self.ns.id, lba, gen);
            let at = lba * BLOCK_BYTES as u64;
            let r = if fua {
                c.write_fua(at, &data)
            } else {
                c.write(at, &data)
            };
            match r {
                Ok(()) => {
                    self.tally.add("writes", 1);
                    if fua {
                        self.tally.add("writes.fua", 1);
                        let mut b = self.ns.blocks();
                        let e = &mut b[lba as usize];
                        if e.last == gen {
                            e.durable = gen;
                        }
                    } else {
                        dirty.push(lba);
                    }
                }
                Err(_) => {
                    self.tally.add("writes.failed", 1);
                    uncertain.push(lba);
                    conn = None;
                }
            }
            drop(gate);
            until_flush = until_flush.saturating_sub(1);
            if until_flush == 0 {
                if let Some(c) = conn.as_mut() {
                    let gate = self.ns.gate.read().unwrap_or_else(|p| p.into_inner());
                    if c.flush().is_ok() {
                        self.tally.add("flushes", 1);
                        let mut b = self.ns.blocks();
                        for l in dirty.drain(..) {
                            let e = &mut b[l as usize];
                            e.durable = e.last;
                        }
                    } else {
                        self.tally.add("flushes.failed", 1);
                        conn = None;
                    }
                    drop(gate);
                }
                until_flush = rng.gen_range(4..32u32);
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(3..15)));
        }
        if let Some(mut c) = conn {
            let _ = c.flush();
        }
    }

    /// Re-read the blocks whose write lost its answer; the model takes
    /// what the node holds. False: the connection failed again.
    fn resolve(&self, conn: Option<&mut Nbd>, uncertain: &mut Vec<u64>) -> bool {
        let Some(c) = conn else { return false };
        while let Some(&lba) = uncertain.last() {
            let gate = self.ns.gate.read().unwrap_or_else(|p| p.into_inner());
            let Ok(block) = c.read(lba * BLOCK_BYTES as u64, BLOCK_BYTES as u32) else {
                return false;
            };
            let mut b = self.ns.blocks();
            let e = &mut b[lba as usize];
            match decode(self.seed, self.ns.id, lba, &block) {
                Ok(g) if g >= e.durable && g <= e.next => e.last = g,
                Ok(g) => self.tally.violation(
                    "flushed-writes",
                    format!(
                        "{} lba {lba}: after a failed write it holds gen {g}, durable was {} (sent up to {})",
                        self.ns.export, e.durable, e.next
                    ),
                ),
                Err(why) => self
                    .tally
                    .violation("flushed-writes", format!("{} lba {lba}: {why}", self.ns.export)),
            }
            drop(b);
            drop(gate);
            uncertain.pop();
        }
        true
    }
}
