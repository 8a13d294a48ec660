//! What the randomized engine tests share: a small seeded generator and the
//! seed, taken from `SLUICE_SEED` to replay a run, else from the clock, and
//! printed either way.

/// xorshift64: fast, and the same sequence for the same seed everywhere.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The run's seed: `SLUICE_SEED` if set, else the clock; printed so a
/// failing run can be replayed.
pub fn seed() -> u64 {
    let s = std::env::var("SLUICE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("SLUICE_SEED={s}");
    s
}
