//! The simulated network between DCs: per-link one-way latency with jitter (which also
//! reorders), loss, duplication, symmetric and one-way partitions, and clogged links that
//! hold traffic until they are unclogged.

use std::collections::{BTreeMap, BTreeSet};

use chinwag_replication::{Wire, wire};

use crate::rng::Rng;

/// Bytes a message costs on a real link besides its encoding: the frame length prefix
/// and a TLS 1.3 record's header and tag.
pub const FRAMING_BYTES: u64 = 4 + 5 + 17;

#[derive(Debug, Clone, Copy, Default)]
pub struct NetConfig {
    pub latency_ms: u64,
    pub jitter_ms: u64,
    pub loss_per_mille: u64,
    pub dup_per_mille: u64,
}

pub struct Net {
    pub cfg: NetConfig,
    /// Directed links that drop everything.
    cut: BTreeSet<(usize, usize)>,
    /// Directed links that hold everything until unclogged.
    clogged: BTreeSet<(usize, usize)>,
    held: BTreeMap<(usize, usize), Vec<Wire>>,
    /// Bytes put on each directed link.
    pub bytes: BTreeMap<(usize, usize), u64>,
}

impl Net {
    pub fn new(cfg: NetConfig) -> Self {
        Self {
            cfg,
            cut: BTreeSet::new(),
            clogged: BTreeSet::new(),
            held: BTreeMap::new(),
            bytes: BTreeMap::new(),
        }
    }

    /// What becomes of one message: zero, one or two deliveries, each after a delay.
    pub fn transmit(&mut self, rng: &mut Rng, from: usize, to: usize, msg: Wire) -> Vec<(u64, Wire)> {
        let size = wire::encode(&msg).len() as u64 + FRAMING_BYTES;
        *self.bytes.entry((from, to)).or_default() += size;
        if self.cut.contains(&(from, to)) {
            return Vec::new();
        }
        if self.clogged.contains(&(from, to)) {
            self.held.entry((from, to)).or_default().push(msg);
            return Vec::new();
        }
        if rng.chance(self.cfg.loss_per_mille) {
            return Vec::new();
        }
        let copies = if rng.chance(self.cfg.dup_per_mille) { 2 } else { 1 };
        (0..copies).map(|_| (self.delay(rng), msg.clone())).collect()
    }

    pub fn delay(&self, rng: &mut Rng) -> u64 {
        self.cfg.latency_ms + rng.below(self.cfg.jitter_ms + 1)
    }

    pub fn cut(&mut self, from: usize, to: usize) {
        self.cut.insert((from, to));
    }

    pub fn heal(&mut self, from: usize, to: usize) {
        self.cut.remove(&(from, to));
    }

    pub fn clog(&mut self, from: usize, to: usize) {
        self.clogged.insert((from, to));
    }

    /// Releases what a clogged link held, in the order it was sent.
    pub fn unclog(&mut self, from: usize, to: usize) -> Vec<Wire> {
        self.clogged.remove(&(from, to));
        self.held.remove(&(from, to)).unwrap_or_default()
    }

    pub fn is_cut(&self, from: usize, to: usize) -> bool {
        self.cut.contains(&(from, to))
    }

    pub fn heal_all(&mut self) -> Vec<((usize, usize), Vec<Wire>)> {
        self.cut.clear();
        let clogged: Vec<(usize, usize)> = self.clogged.iter().copied().collect();
        clogged
            .into_iter()
            .map(|link| (link, self.unclog(link.0, link.1)))
            .collect()
    }
}
