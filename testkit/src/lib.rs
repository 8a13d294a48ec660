//! The test kit every Sluice test crate shares (a dev-dependency only;
//! nothing in production links it).
//!
//! It owns three things:
//! - replayable randomness: [`seed`] takes `SLUICE_SEED` or draws a fresh
//!   seed and always prints it, [`rng`] turns it into the one generator
//!   the tests use ([`rand::rngs::SmallRng`]);
//! - tool requirements: [`tool`] finds a program on `PATH`, [`skip`] is the
//!   one place a test gives up for want of a tool, root or a kernel
//!   feature. Where `SLUICE_REQUIRE_TOOLS` is set (CI, `.ci/run`) a skip is
//!   a failure, so nothing passes there without having run;
//! - [`proxy`]: the fault-injecting TCP proxy of the replication tests.
//!
//! Invariant: the same seed gives the same sequence on every machine (the
//! generator is seeded only from the printed seed).
//!
//! It depends on `sluice-lockproto` (the proxy re-encodes frames) and on
//! no other Sluice crate, so the engine's own tests can use it too.

pub mod faultdisk;
pub mod proxy;

use rand::SeedableRng;
use std::path::PathBuf;

/// The environment variable that replays a randomized test.
pub const SEED_VAR: &str = "SLUICE_SEED";
/// The environment variable that turns every skip into a failure.
pub const REQUIRE_TOOLS_VAR: &str = "SLUICE_REQUIRE_TOOLS";

/// The seed of a randomized test: `SLUICE_SEED` if set, else random.
/// Printed to stderr as `"{test}: SLUICE_SEED={s}"` so a failure can be
/// replayed. Panics if `SLUICE_SEED` is set but not a u64 (a replay that
/// silently ran another seed would mislead).
pub fn seed(test: &str) -> u64 {
    let s = match std::env::var(SEED_VAR) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_VAR}={v:?} is not a u64")),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: {SEED_VAR}={s}");
    s
}

/// The generator of a randomized test, from its printed seed.
pub fn rng(seed: u64) -> rand::rngs::SmallRng {
    rand::rngs::SmallRng::seed_from_u64(seed)
}

/// Is `SLUICE_REQUIRE_TOOLS` set (every test must run)?
pub fn tools_required() -> bool {
    std::env::var_os(REQUIRE_TOOLS_VAR).is_some()
}

/// Give up a test that cannot run here: print `"skipped: {why}"` and
/// return `None`, or panic where `SLUICE_REQUIRE_TOOLS` is set.
pub fn skip<T>(why: &str) -> Option<T> {
    if tools_required() {
        panic!("{why}, and {REQUIRE_TOOLS_VAR} says every test must run");
    }
    eprintln!("skipped: {why}");
    None
}

/// The path of program `name` on `PATH`, or [`skip`] (`None`, or a panic
/// where `SLUICE_REQUIRE_TOOLS` is set).
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p),
        None => skip(&format!("{name} not found")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let s = seed("the_same_seed_gives_the_same_sequence");
        let (mut a, mut b) = (rng(s), rng(s));
        for _ in 0..100 {
            assert_eq!(a.gen::<u64>(), b.gen::<u64>());
        }
    }
}
