//! Replicators on a simulated network: seeded, virtual time, with delay, loss,
//! duplication, reordering and partitions. Whatever happens, once the network heals every
//! DC must hold every stream completely, having applied each entry exactly once, in order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use chinwag_core::{DcName, Epoch};
use proptest::prelude::*;

use super::*;

/// xorshift64*: small, seeded, good enough for choosing delays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug)]
enum Event {
    Deliver { from: usize, to: usize, msg: Wire },
    Tick(usize),
    Write(usize),
    Applied { dc: usize, stream: StreamId, through: u64 },
}

struct Dc {
    name: DcName,
    stream: StreamId,
    replicator: Replicator,
    /// The log: own and relayed entries, minus truncated prefixes.
    log: BTreeMap<StreamId, BTreeMap<u64, Vec<u8>>>,
    /// Everything ever applied, per stream, in order: what the checker compares.
    state: BTreeMap<StreamId, Vec<Vec<u8>>>,
}

impl Dc {
    /// A DC with nothing applied, starting at `now`.
    fn empty(cfg: Config, now: u64) -> Self {
        Dc {
            name: cfg.me.clone(),
            stream: cfg.stream.clone(),
            replicator: Replicator::new(cfg, VersionVector::default(), VersionVector::default(), now),
            log: BTreeMap::new(),
            state: BTreeMap::new(),
        }
    }
}

/// Small windows and batches, so that a few hundred writes exercise them.
fn config(stream: StreamId, names: &[DcName], net: &Net) -> Config {
    let mut cfg = Config::wan(stream.dc.clone(), stream, names.to_vec());
    cfg.max_batch_entries = 8;
    cfg.window_entries = 32;
    cfg.max_held = 16;
    if let Some(ms) = net.decommission_after_ms {
        cfg.decommission_after_ms = ms;
    }
    if let Some(max) = net.max_log_entries {
        cfg.max_log_entries = max;
    }
    if net.decommission_after_ms.is_some() || net.max_log_entries.is_some() {
        // Tests that end in a snapshot should not wait the WAN preset's 30 s for a retry.
        cfg.snapshot_retry_ms = 2_000;
    }
    cfg
}

struct LogView<'a>(&'a BTreeMap<StreamId, BTreeMap<u64, Vec<u8>>>);

impl Log for LogView<'_> {
    fn read(&self, stream: &StreamId, from: u64, max_entries: usize, _max_bytes: usize) -> Vec<Vec<u8>> {
        let Some(log) = self.0.get(stream) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut seq = from;
        while out.len() < max_entries {
            match log.get(&seq) {
                Some(e) => out.push(e.clone()),
                None => break,
            }
            seq += 1;
        }
        out
    }
}

struct Net {
    /// Percent of messages lost / duplicated.
    loss: u64,
    dup: u64,
    /// One-way delay range in ms.
    min_delay: u64,
    max_delay: u64,
    /// Cut links (both directions), by DC index pair, until the given time.
    cut_until: BTreeMap<(usize, usize), u64>,
    /// `decommission_after_ms` of every replicator (defaults to the WAN preset).
    decommission_after_ms: Option<u64>,
    /// `max_log_entries` of every replicator (defaults to the WAN preset).
    max_log_entries: Option<u64>,
}

impl Net {
    /// No loss, duplication or cuts, one-way delays of `min_delay..=max_delay` ms, and
    /// the WAN preset's limits.
    fn clean(min_delay: u64, max_delay: u64) -> Self {
        Net {
            loss: 0,
            dup: 0,
            min_delay,
            max_delay,
            cut_until: BTreeMap::new(),
            decommission_after_ms: None,
            max_log_entries: None,
        }
    }
}

struct Sim {
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: BTreeMap<usize, Event>,
    dcs: Vec<Dc>,
    net: Net,
    written: Vec<u64>,
    snapshots: usize,
}

impl Sim {
    fn new(n: usize, seed: u64, net: Net) -> Self {
        let names: Vec<DcName> = (0..n).map(|i| DcName::parse(&format!("dc{i}")).unwrap()).collect();
        let dcs = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let stream = StreamId::new(name.clone(), Epoch(i as u32 + 1));
                Dc::empty(config(stream, &names, &net), 0)
            })
            .collect();
        let mut sim = Sim {
            rng: Rng(seed | 1),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            dcs,
            net,
            written: vec![0; n],
            snapshots: 0,
        };
        for a in 0..n {
            for b in 0..n {
                if a != b {
                    let name = sim.dcs[b].name.clone();
                    sim.dcs[a].replicator.on_connected(&name, 0);
                }
            }
            sim.drain(a);
            let jitter = sim.rng.below(100);
            sim.at(jitter, Event::Tick(a));
        }
        sim
    }

    fn at(&mut self, delay: u64, event: Event) {
        self.seq += 1;
        let id = self.seq as usize;
        self.events.insert(id, event);
        self.queue.push(Reverse((self.now + delay, self.seq, id)));
    }

    fn index(&self, name: &DcName) -> usize {
        self.dcs.iter().position(|d| d.name == *name).unwrap()
    }

    fn cut(&self, a: usize, b: usize) -> bool {
        let key = (a.min(b), a.max(b));
        self.net.cut_until.get(&key).is_some_and(|&t| self.now < t)
    }

    /// Carries out a DC's actions.
    fn drain(&mut self, dc: usize) {
        while let Some(action) = self.dcs[dc].replicator.poll_action() {
            match action {
                Action::Send { to, msg } => {
                    let to = self.index(&to);
                    if self.cut(dc, to) || self.rng.chance(self.net.loss) {
                        continue;
                    }
                    let copies = if self.rng.chance(self.net.dup) { 2 } else { 1 };
                    for _ in 0..copies {
                        let delay = self.net.min_delay + self.rng.below(self.net.max_delay - self.net.min_delay + 1);
                        self.at(
                            delay,
                            Event::Deliver {
                                from: dc,
                                to,
                                msg: msg.clone(),
                            },
                        );
                    }
                }
                Action::Apply { stream, first, entries } => {
                    let d = &mut self.dcs[dc];
                    let state = d.state.entry(stream.clone()).or_default();
                    assert_eq!(
                        first,
                        state.len() as u64 + 1,
                        "{} applied {stream} out of order",
                        d.name
                    );
                    let log = d.log.entry(stream.clone()).or_default();
                    for (i, e) in entries.iter().enumerate() {
                        log.insert(first + i as u64, e.clone());
                    }
                    state.extend(entries);
                    let through = state.len() as u64;
                    // Applying takes a moment (the store's commit).
                    let delay = 1 + self.rng.below(3);
                    self.at(delay, Event::Applied { dc, stream, through });
                }
                Action::Truncate { stream, through } => {
                    if let Some(log) = self.dcs[dc].log.get_mut(&stream) {
                        log.retain(|&seq, _| seq > through);
                    }
                }
                Action::Forget { .. } => {}
                Action::SendSnapshot { to } => {
                    self.snapshots += 1;
                    // The whole state, one item per stream, in one part.
                    let d = &self.dcs[dc];
                    let items = d
                        .state
                        .iter()
                        .map(|(stream, entries)| postcard::to_stdvec(&(stream, entries)).unwrap())
                        .collect();
                    // What the items hold, as the store reads both from one snapshot of
                    // its tables: entries whose apply is still in flight included, which
                    // the replicator does not count as applied yet.
                    let mut applied = d.replicator.applied().clone();
                    for (stream, entries) in &d.state {
                        applied.advance(stream, entries.len() as u64);
                    }
                    let msg = Wire::Snapshot {
                        applied,
                        items,
                        last: true,
                    };
                    self.dcs[dc].replicator.out_for_test(to, msg);
                }
                Action::MergeSnapshot { applied, items, .. } => {
                    let d = &mut self.dcs[dc];
                    for item in items {
                        let (stream, entries): (StreamId, Vec<Vec<u8>>) = postcard::from_bytes(&item).unwrap();
                        let state = d.state.entry(stream.clone()).or_default();
                        if entries.len() > state.len() {
                            assert_eq!(
                                &entries[..state.len()],
                                &state[..],
                                "snapshot disagrees with what {} applied",
                                d.name
                            );
                            *state = entries;
                        }
                    }
                    d.replicator.on_snapshot_merged(&applied, &LogView(&d.log));
                }
            }
        }
    }

    fn step(&mut self) -> bool {
        let Some(Reverse((time, _, id))) = self.queue.pop() else {
            return false;
        };
        self.now = time;
        // Events of a DC's earlier life are gone (see `rebuild`).
        let Some(event) = self.events.remove(&id) else {
            return true;
        };
        let dc = match event {
            Event::Deliver { from, to, msg } => {
                let from_name = self.dcs[from].name.clone();
                let d = &mut self.dcs[to];
                d.replicator.on_message(&from_name, msg, self.now, &LogView(&d.log));
                to
            }
            Event::Tick(dc) => {
                let d = &mut self.dcs[dc];
                d.replicator.on_tick(self.now, &LogView(&d.log));
                self.at(100, Event::Tick(dc));
                dc
            }
            Event::Write(dc) => {
                self.written[dc] += 1;
                let seq = self.written[dc];
                let d = &mut self.dcs[dc];
                let own = d.stream.clone();
                let entry = format!("{}#{seq}", d.name).into_bytes();
                d.log.entry(own.clone()).or_default().insert(seq, entry.clone());
                d.state.entry(own).or_default().push(entry);
                d.replicator.on_local(seq, &LogView(&d.log));
                dc
            }
            Event::Applied { dc, stream, through } => {
                let d = &mut self.dcs[dc];
                d.replicator.on_applied(&stream, through, &LogView(&d.log));
                dc
            }
        };
        self.drain(dc);
        true
    }

    /// DC `i` loses its data and starts again empty, writing a new stream (a new epoch):
    /// what was in flight to or from it is lost with its links, which come back up.
    fn rebuild(&mut self, i: usize) {
        let names: Vec<DcName> = self.dcs.iter().map(|d| d.name.clone()).collect();
        let old = &self.dcs[i].stream;
        let stream = StreamId::new(old.dc.clone(), Epoch(old.epoch().0 + 100));
        self.dcs[i] = Dc::empty(config(stream, &names, &self.net), self.now);
        self.written[i] = 0;
        self.events.retain(|_, e| match e {
            Event::Deliver { from, to, .. } => *from != i && *to != i,
            Event::Applied { dc, .. } => *dc != i,
            Event::Tick(_) | Event::Write(_) => true,
        });
        for j in (0..self.dcs.len()).filter(|&j| j != i) {
            let (name_i, name_j) = (names[i].clone(), names[j].clone());
            self.dcs[j].replicator.on_disconnected(&name_i);
            self.dcs[j].replicator.on_connected(&name_i, self.now);
            self.dcs[i].replicator.on_connected(&name_j, self.now);
            self.drain(j);
        }
        self.drain(i);
    }

    fn run_until(&mut self, t: u64) {
        while self.queue.peek().is_some_and(|Reverse((time, _, _))| *time <= t) {
            self.step();
        }
        self.now = t;
    }

    fn converged(&self) -> bool {
        let first = &self.dcs[0].state;
        self.dcs.iter().all(|d| d.state == *first)
            && self
                .dcs
                .iter()
                .enumerate()
                .all(|(i, _)| first.get(&self.dcs[i].stream).map_or(0, Vec::len) as u64 == self.written[i])
    }
}

fn run(seed: u64, n: usize, writes: u64, net: Net) -> Sim {
    let mut sim = Sim::new(n, seed, net);
    for _ in 0..writes {
        let dc = sim.rng.below(n as u64) as usize;
        let when = sim.rng.below(5_000);
        sim.at(when, Event::Write(dc));
    }
    // Faults stop by 10 s; then everything must converge within 20 s more.
    sim.run_until(30_000);
    sim
}

fn assert_converged(sim: &Sim, seed: u64) {
    assert!(
        sim.converged(),
        "seed {seed}: not converged: {:?}",
        sim.dcs
            .iter()
            .map(|d| d.replicator.applied().clone())
            .collect::<Vec<_>>()
    );
}

#[test]
fn converges_on_a_clean_network() {
    let net = Net::clean(20, 20);
    let sim = run(1, 3, 200, net);
    assert_converged(&sim, 1);
}

#[test]
fn truncates_logs_once_everyone_has_them() {
    let net = Net::clean(5, 50);
    let sim = run(3, 3, 300, net);
    assert_converged(&sim, 3);
    for d in &sim.dcs {
        let left: usize = d.log.values().map(BTreeMap::len).sum();
        assert_eq!(left, 0, "{} kept {left} entries everyone has", d.name);
    }
}

#[test]
fn a_partitioned_pair_converges_through_a_third_dc() {
    // dc0 and dc1 cannot talk for the whole run; dc2 relays.
    let net = Net {
        cut_until: BTreeMap::from([((0, 1), u64::MAX)]),
        ..Net::clean(50, 50)
    };
    let sim = run(5, 3, 200, net);
    assert_converged(&sim, 5);
}

#[test]
fn a_dc_back_after_being_decommissioned_catches_up_from_a_snapshot() {
    // dc2 is cut off from everyone for 9 s; after 2 s the others stop keeping logs for it.
    let net = Net {
        cut_until: BTreeMap::from([((0, 2), 9_000), ((1, 2), 9_000)]),
        decommission_after_ms: Some(2_000),
        ..Net::clean(20, 40)
    };
    let sim = run(11, 3, 200, net);
    assert_converged(&sim, 11);
    assert!(sim.snapshots > 0, "the returning DC was never sent a snapshot");
}

#[test]
fn a_peer_too_far_behind_no_longer_holds_the_logs_and_catches_up_from_a_snapshot() {
    // dc2 is cut off for 9 s, far from decommissioned, while the others write 200
    // entries; they keep no more than 20 of each stream for it.
    let max = 20;
    let net = Net {
        cut_until: BTreeMap::from([((0, 2), 9_000), ((1, 2), 9_000)]),
        max_log_entries: Some(max),
        ..Net::clean(20, 40)
    };
    let mut sim = Sim::new(3, 31, net);
    for _ in 0..200 {
        let dc = sim.rng.below(2) as usize;
        let when = sim.rng.below(5_000);
        sim.at(when, Event::Write(dc));
    }
    sim.run_until(6_000);
    for d in &sim.dcs[..2] {
        for (stream, log) in &d.log {
            // Truncation runs each tick: what arrived since the last one may be extra.
            assert!(
                log.len() <= 2 * max as usize,
                "{} kept {} entries of {stream}",
                d.name,
                log.len()
            );
        }
    }
    sim.run_until(30_000);
    assert_converged(&sim, 31);
    assert!(sim.snapshots > 0, "the DC left behind was never sent a snapshot");
}

/// 100 writes at random DCs over the 5 s from `from` on.
fn write_for_5s(sim: &mut Sim, from: u64) {
    for _ in 0..100 {
        let dc = sim.rng.below(3) as usize;
        let when = from + sim.rng.below(5_000) - sim.now;
        sim.at(when, Event::Write(dc));
    }
}

/// dc2 loses its data at 10 s and starts again empty; writes go on everywhere.
fn rebuild_dc2_at_10s(seed: u64, cut_until: BTreeMap<(usize, usize), u64>) -> Sim {
    let net = Net {
        cut_until,
        ..Net::clean(20, 40)
    };
    let mut sim = Sim::new(3, seed, net);
    write_for_5s(&mut sim, 0);
    sim.run_until(10_000);
    sim.rebuild(2);
    write_for_5s(&mut sim, 10_000);
    sim.run_until(50_000);
    assert_converged(&sim, seed);
    let old = StreamId::new(sim.dcs[2].name.clone(), Epoch(3));
    assert!(sim.dcs[2].state.get(&old).is_some_and(|s| !s.is_empty()));
    sim
}

#[test]
fn a_dc_rebuilt_from_nothing_catches_up_from_a_snapshot() {
    // By 10 s everyone has everything and every log is truncated: the rebuilt DC needs a
    // snapshot, which also brings back its own old stream.
    let sim = rebuild_dc2_at_10s(21, BTreeMap::new());
    assert!(sim.snapshots > 0, "the rebuilt DC was never sent a snapshot");
}

#[test]
fn a_dc_rebuilt_from_nothing_gets_its_old_stream_from_the_logs() {
    // dc1 is cut off until 20 s, so dc0 still keeps every log when dc2 comes back
    // empty, its own old stream included: that must be sent to it like any other.
    let cut = BTreeMap::from([((0, 1), 20_000), ((1, 2), 20_000)]);
    let sim = rebuild_dc2_at_10s(23, cut);
    assert_eq!(sim.snapshots, 0, "the logs were enough");
}

#[test]
fn a_peer_not_yet_heard_from_at_start_keeps_its_log() {
    // Real clocks start far from zero: a configured peer is counted silent from the
    // replicator's start, not from the epoch, so its log is kept until it is heard.
    let (a, b) = (DcName::parse("a").unwrap(), DcName::parse("b").unwrap());
    let stream = StreamId::new(a.clone(), Epoch(1));
    let mut applied = VersionVector::default();
    applied.advance(&stream, 3);
    let log = BTreeMap::from([(stream.clone(), (1..=3).map(|seq| (seq, vec![seq as u8])).collect())]);
    let start = 1_800_000_000_000;
    let cfg = Config::wan(a.clone(), stream, vec![a, b]);
    let decommission = cfg.decommission_after_ms;
    let mut replicator = Replicator::new(cfg, applied, VersionVector::default(), start);
    let truncated =
        |r: &mut Replicator| std::iter::from_fn(|| r.poll_action()).any(|a| matches!(a, Action::Truncate { .. }));
    replicator.on_tick(start + 1_000, &LogView(&log));
    assert!(
        !truncated(&mut replicator),
        "the log was dropped before its peer was heard from"
    );
    // Once it has been silent for the decommissioning time, the log goes.
    replicator.on_tick(start + decommission, &LogView(&log));
    assert!(truncated(&mut replicator));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn converges_despite_loss_duplication_reordering_and_partitions(
        seed in any::<u64>(),
        n in 2usize..5,
        loss in 0u64..30,
        dup in 0u64..20,
        cuts in proptest::collection::vec((0usize..4, 0usize..4, 0u64..10_000), 0..4),
    ) {
        let cut_until = cuts
            .into_iter()
            .filter(|(a, b, _)| a != b && *a < n && *b < n)
            .map(|(a, b, until)| ((a.min(b), a.max(b)), until))
            .collect();
        let net = Net { loss, dup, cut_until, ..Net::clean(1, 300) };
        let sim = run(seed, n, 150, net);
        assert_converged(&sim, seed);
    }
}
