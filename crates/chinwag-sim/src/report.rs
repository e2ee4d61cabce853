//! Percentiles and the JSON summary.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    pub count: usize,
}

impl Percentiles {
    pub fn of(values: &[u64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut v = values.to_vec();
        v.sort_unstable();
        let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: *v.last().expect("not empty"),
            count: v.len(),
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub seeds: usize,
    pub violations: usize,
    pub acknowledged: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub unexpected: usize,
    pub reordered: usize,
    pub coordinate_mismatches: usize,
    pub twins: usize,
    pub failing_seeds: Vec<u64>,
    pub online_cross_dc_ms: Percentiles,
    /// Online delivery between the first two DCs (east and west); in the `split` scenario
    /// they cannot talk and a third DC relays.
    pub between_first_two_ms: Percentiles,
    pub critical_case_ms: Percentiles,
    pub coordinate_convergence_ms: Percentiles,
    pub mailbox_replication_ms: Percentiles,
    pub max_delivery_after_heal_ms: u64,
    pub idle_bytes_per_sec_per_pair: f64,
}

impl Summary {
    pub fn from_results(results: &[crate::SeedResult]) -> Self {
        let mut s = Summary {
            seeds: results.len(),
            ..Summary::default()
        };
        let (mut online, mut critical, mut coords, mut mailbox) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut first_two = Vec::new();
        for r in results {
            let v = &r.verdict;
            s.violations += v.violations();
            s.acknowledged += v.acknowledged;
            s.lost += v.lost;
            s.duplicated += v.duplicated;
            s.unexpected += v.unexpected;
            s.reordered += v.reordered;
            s.coordinate_mismatches += v.coordinate_mismatches;
            s.twins += v.twins;
            if v.violations() > 0 {
                s.failing_seeds.push(r.seed);
            }
            s.max_delivery_after_heal_ms = s.max_delivery_after_heal_ms.max(v.max_delivery_after_heal_ms);
            s.idle_bytes_per_sec_per_pair = s.idle_bytes_per_sec_per_pair.max(r.idle_bytes_per_sec);
            online.extend(&r.latencies.online_cross_dc);
            first_two.extend(&r.latencies.between_first_two);
            critical.extend(&r.latencies.critical_case);
            coords.extend(&r.latencies.coordinate_convergence);
            mailbox.extend(&r.latencies.mailbox_replication);
        }
        s.online_cross_dc_ms = Percentiles::of(&online);
        s.between_first_two_ms = Percentiles::of(&first_two);
        s.critical_case_ms = Percentiles::of(&critical);
        s.coordinate_convergence_ms = Percentiles::of(&coords);
        s.mailbox_replication_ms = Percentiles::of(&mailbox);
        s
    }
}
