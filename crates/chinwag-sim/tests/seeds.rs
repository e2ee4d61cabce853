//! The simulation in CI: a fixed set of seeds with every fault on must show no violation,
//! and a seed must replay exactly.

use chinwag_sim::{Faults, Scenario, run_seed};

fn scenario(faults: Faults) -> Scenario {
    let mut sc = Scenario::new(5, 200, 100, faults);
    sc.users = 8;
    sc.sends = 60;
    sc
}

#[test]
fn fixed_seeds_with_every_fault_show_no_violation() {
    let sc = scenario(Faults::all());
    for seed in 1..=12 {
        let r = run_seed(&sc, seed).expect("run");
        assert_eq!(
            r.verdict.violations(),
            0,
            "seed {seed}: {:#?}\ntrace:\n{}",
            r.verdict.problems,
            r.trace_tail.join("\n")
        );
        assert!(r.verdict.acknowledged > 0, "seed {seed} sent nothing");
    }
}

#[test]
fn a_seed_replays_the_same_trace() {
    let sc = scenario(Faults::all());
    let a = run_seed(&sc, 7).expect("run");
    let b = run_seed(&sc, 7).expect("run");
    assert_eq!(a.fingerprint, b.fingerprint);
    assert_eq!(a.verdict, b.verdict);
    assert_eq!(a.latencies.online_cross_dc, b.latencies.online_cross_dc);
    let c = run_seed(&sc, 8).expect("run");
    assert_ne!(a.fingerprint, c.fingerprint, "different seeds should differ");
}

#[test]
fn a_clean_network_delivers_in_one_hop() {
    let r = run_seed(&scenario(Faults::default()), 3).expect("run");
    assert_eq!(r.verdict.violations(), 0);
    // 200 ms one way, no processing time in the simulation: every online delivery across
    // DCs takes exactly one hop.
    assert!(!r.latencies.online_cross_dc.is_empty());
    assert!(
        r.latencies.online_cross_dc.iter().all(|&ms| ms == 200),
        "{:?}",
        r.latencies.online_cross_dc
    );
}
