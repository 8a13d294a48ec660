//! Connection slots of one listener: at most `total` connections at once,
//! at most `per_source` of them from one source (an IP address, or the uid
//! of a Unix-socket client), so one address cannot take every slot. The
//! daemon's listeners (peer port, control socket, TCP control) and the NBD
//! server take their slots here.
//!
//! Invariants: a [`Slot`] is counted from [`Slots::take`] until it drops,
//! on whatever thread; counts never go below zero; a source's entry
//! disappears with its last slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Why a connection got no slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Full {
    /// Every slot of the listener is taken.
    Total(usize),
    /// The source holds its share already: (source, share).
    Source(String, usize),
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Full::Total(n) => write!(f, "too many connections ({n})"),
            Full::Source(s, n) => write!(f, "too many connections from {s} ({n})"),
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<String, usize>,
}

/// The slots of one listener; clone to share.
#[derive(Debug, Clone)]
pub struct Slots {
    total: usize,
    per_source: usize,
    counts: Arc<Mutex<Counts>>,
}

/// One connection's slot, released when dropped.
#[derive(Debug)]
pub struct Slot {
    source: String,
    counts: Arc<Mutex<Counts>>,
}

impl Slots {
    pub fn new(total: usize, per_source: usize) -> Slots {
        Slots {
            total,
            per_source,
            counts: Arc::default(),
        }
    }

    /// A slot for a connection from `source`, or why there is none.
    pub fn take(&self, source: &str) -> Result<Slot, Full> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.total {
            return Err(Full::Total(self.total));
        }
        let n = c.by_source.entry(source.to_string()).or_insert(0);
        if *n >= self.per_source {
            return Err(Full::Source(source.to_string(), self.per_source));
        }
        *n += 1;
        c.total += 1;
        Ok(Slot {
            source: source.to_string(),
            counts: self.counts.clone(),
        })
    }

    /// Connections holding a slot now.
    pub fn taken(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_takes_its_share_and_the_listener_its_total() {
        let s = Slots::new(3, 2);
        let a1 = s.take("a").unwrap();
        let _a2 = s.take("a").unwrap();
        assert_eq!(s.take("a").unwrap_err(), Full::Source("a".into(), 2));
        let _b1 = s.take("b").unwrap();
        assert_eq!(s.take("c").unwrap_err(), Full::Total(3));
        drop(a1);
        assert_eq!(s.taken(), 2);
        let _a3 = s.take("a").unwrap();
        assert_eq!(s.take("b").unwrap_err(), Full::Total(3));
    }
}
