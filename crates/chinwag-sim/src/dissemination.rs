//! How many anti-entropy rounds one new entry takes to reach every DC when nothing pushes
//! it: the real replicator in gossip mode (each tick a DC exchanges digests with `fanout`
//! random peers, push-pull, eager push off), N of them, on a fast network where one round
//! is one anti-entropy tick. The design article's estimate for gossip is about
//! log2 N + ln N rounds.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use chinwag_core::{DcName, Epoch};
use chinwag_replication::{Action, Config, Log, Replicator, StreamId, VersionVector, Wire};
use serde::Serialize;

use crate::rng::Rng;

const TICK_MS: u64 = 100;
const LATENCY_MS: u64 = 1;

#[derive(Debug, Serialize)]
pub struct Rounds {
    pub dcs: usize,
    pub fanout: usize,
    pub runs: usize,
    pub mean_rounds: f64,
    pub max_rounds: u64,
    /// log2 N + ln N.
    pub estimate: f64,
}

struct Node {
    replicator: Replicator,
    log: BTreeMap<u64, Vec<u8>>,
}

struct OneStream<'a>(&'a BTreeMap<u64, Vec<u8>>);

impl Log for OneStream<'_> {
    fn read(&self, _: &StreamId, from: u64, max: usize, _: usize) -> Vec<Vec<u8>> {
        self.0.range(from..).take(max).map(|(_, e)| e.clone()).collect()
    }
}

/// Ticks until every node has the entry origin 0 wrote at time 0.
fn run_once(n: usize, fanout: usize, seed: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let names: Vec<DcName> = (0..n)
        .map(|i| DcName::parse(&format!("dc{i}")).expect("valid"))
        .collect();
    let origin = StreamId::new(names[0].clone(), Epoch(1));
    let mut nodes: Vec<Node> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut cfg = Config::wan(name.clone(), StreamId::new(name.clone(), Epoch(1)), names.clone());
            cfg.eager_push = false;
            cfg.fanout = Some(fanout);
            cfg.gossip_seed = seed.wrapping_add(i as u64);
            cfg.tick_ms = TICK_MS;
            cfg.keepalive_ms = u64::MAX / 4;
            Node {
                replicator: Replicator::new(cfg, VersionVector::default(), VersionVector::default(), 0),
                log: BTreeMap::new(),
            }
        })
        .collect();
    for node in &mut nodes {
        for peer in &names {
            node.replicator.on_connected(peer, 0);
        }
        while node.replicator.poll_action().is_some() {}
    }
    nodes[0].log.insert(1, b"hello".to_vec());
    let n0 = &mut nodes[0];
    n0.replicator.on_local(1, &OneStream(&n0.log));
    let mut queue: BinaryHeap<Reverse<(u64, u64, usize)>> = BinaryHeap::new();
    let mut pending: BTreeMap<u64, (usize, usize, Wire)> = BTreeMap::new();
    let mut seq = 0;
    // Ticks start at random phases within the first round.
    for i in 0..n {
        seq += 1;
        queue.push(Reverse((rng.below(TICK_MS), seq, i)));
    }
    let mut have = 1;
    while let Some(Reverse((now, id, target))) = queue.pop() {
        if now > 1000 * TICK_MS {
            break;
        }
        let acting = match pending.remove(&id) {
            Some((from, to, msg)) => {
                let node = &mut nodes[to];
                node.replicator
                    .on_message(&names[from], msg, now, &OneStream(&node.log));
                to
            }
            None => {
                let node = &mut nodes[target];
                node.replicator.on_tick(now, &OneStream(&node.log));
                seq += 1;
                queue.push(Reverse((now + TICK_MS, seq, target)));
                target
            }
        };
        while let Some(action) = nodes[acting].replicator.poll_action() {
            match action {
                Action::Send { to, msg } => {
                    let to = names.iter().position(|x| *x == to).expect("known");
                    seq += 1;
                    pending.insert(seq, (acting, to, msg));
                    queue.push(Reverse((now + LATENCY_MS, seq, to)));
                }
                Action::Apply { first, entries, .. } => {
                    let node = &mut nodes[acting];
                    for (k, e) in entries.into_iter().enumerate() {
                        node.log.insert(first + k as u64, e);
                    }
                    let through = node.log.len() as u64;
                    node.replicator.on_applied(&origin, through, &OneStream(&node.log));
                    have += 1;
                    if have == n {
                        return now.div_ceil(TICK_MS);
                    }
                }
                _ => {}
            }
        }
    }
    u64::MAX
}

pub fn measure(n: usize, fanout: usize, runs: usize) -> Rounds {
    let results: Vec<u64> = (0..runs).map(|seed| run_once(n, fanout, seed as u64 + 1)).collect();
    let nf = n as f64;
    Rounds {
        dcs: n,
        fanout,
        runs,
        mean_rounds: results.iter().sum::<u64>() as f64 / runs as f64,
        max_rounds: *results.iter().max().expect("runs > 0"),
        estimate: nf.log2() + nf.ln(),
    }
}
