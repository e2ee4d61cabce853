//! A deterministic simulation of several chinwag DCs.
//!
//! Each DC runs the real store (on tmpfs), the real [`chinwag_replication::Replicator`]
//! and real client [`chinwag_core::Session`]s; the simulation supplies the network, the
//! clock, the clients and the faults, all from one seed. [`run_seed`] runs one scenario
//! and judges it; `chinwag-sim` (the binary) runs many seeds and prints the latency table.

pub mod dissemination;
pub mod history;
pub mod net;
pub mod report;
pub mod rng;
pub mod world;

pub use history::Verdict;
pub use world::{Faults, Scenario, World};

/// The outcome of one seed.
#[derive(Debug)]
pub struct SeedResult {
    pub seed: u64,
    pub verdict: Verdict,
    pub latencies: history::Latencies,
    pub fingerprint: u64,
    pub trace_tail: Vec<String>,
    /// Bytes per second on the busiest DC pair (both directions) while idle.
    pub idle_bytes_per_sec: f64,
}

/// How long the idle traffic is measured for, after the run.
const IDLE_MS: u64 = 10_000;

pub fn run_seed(scenario: &Scenario, seed: u64) -> anyhow::Result<SeedResult> {
    let mut world = World::new(scenario.clone(), seed)?;
    world.run();
    let verdict = world.history.verdict(
        &world.coordinate_views(),
        &world.live_coordinates(),
        &world.mailboxes(),
        world.last_heal_ms,
    );
    let before = world.bytes().clone();
    let start = world.now;
    world.run_until(start + IDLE_MS);
    let idle_bytes_per_sec = busiest_pair(&before, world.bytes(), world.dc_count()) * 1000.0 / IDLE_MS as f64;
    let history = std::mem::take(&mut world.history);
    Ok(SeedResult {
        seed,
        fingerprint: history.fingerprint(),
        trace_tail: history.tail(40).to_vec(),
        verdict,
        latencies: history.latencies,
        idle_bytes_per_sec,
    })
}

fn busiest_pair(
    before: &std::collections::BTreeMap<(usize, usize), u64>,
    after: &std::collections::BTreeMap<(usize, usize), u64>,
    n: usize,
) -> f64 {
    let sent = |a, b| after.get(&(a, b)).copied().unwrap_or(0) - before.get(&(a, b)).copied().unwrap_or(0);
    let mut max = 0;
    for a in 0..n {
        for b in a + 1..n {
            max = max.max(sent(a, b) + sent(b, a));
        }
    }
    max as f64
}
