//! `chinwag-sim`: runs the multi-DC simulation over many seeds and prints one summary.

use std::process::ExitCode;
use std::time::Duration;

use chinwag_sim::report::Summary;
use chinwag_sim::{Faults, Scenario, SeedResult, dissemination, run_seed};
use clap::{Parser, ValueEnum};

#[derive(Parser)]
#[command(name = "chinwag-sim", about = "Deterministic simulation of several chinwag DCs")]
struct Args {
    /// Number of DCs.
    #[arg(long, default_value_t = 5)]
    dcs: usize,
    /// One-way latency between every pair of DCs.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Anti-entropy interval.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Number of seeds to run.
    #[arg(long, default_value_t = 10)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 1)]
    seed_start: u64,
    #[arg(long, value_enum, default_value_t = FaultsArg::None)]
    faults: FaultsArg,
    /// Users (each with one or two devices) and messages per seed.
    #[arg(long, default_value_t = 12)]
    users: usize,
    #[arg(long, default_value_t = 120)]
    sends: usize,
    /// Worker threads (seeds run in parallel; each seed is deterministic on its own).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Instead: rounds to full dissemination by anti-entropy alone, for these cluster sizes.
    #[arg(long, value_delimiter = ',')]
    dissemination: Vec<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum FaultsArg {
    /// A clean network.
    None,
    /// 1% of messages lost.
    Loss,
    /// DCs 0 and 1 cannot talk at all; a third DC relays.
    Split,
    /// Loss, duplication, jitter and reordering, partitions (symmetric and one-way),
    /// clogged links, DC crashes and restarts.
    All,
}

impl FaultsArg {
    fn faults(self) -> Faults {
        match self {
            FaultsArg::None => Faults::default(),
            FaultsArg::Loss => Faults {
                loss_per_mille: 10,
                ..Faults::default()
            },
            FaultsArg::Split => Faults {
                split_pair: true,
                ..Faults::default()
            },
            FaultsArg::All => Faults::all(),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.dissemination.is_empty() {
        let rounds: Vec<_> = args
            .dissemination
            .iter()
            .map(|&n| dissemination::measure(n, 1, 20.min(args.seeds as usize).max(1)))
            .collect();
        println!("{}", serde_json::to_string_pretty(&rounds).expect("serialises"));
        return ExitCode::SUCCESS;
    }
    let mut scenario = Scenario::new(
        args.dcs,
        args.latency.as_millis() as u64,
        args.interval.as_millis() as u64,
        args.faults.faults(),
    );
    scenario.users = args.users;
    scenario.sends = args.sends;
    let seeds: Vec<u64> = (args.seed_start..args.seed_start + args.seeds).collect();
    let results = run_all(&scenario, &seeds, args.threads.max(1));
    let results = match results {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chinwag-sim: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    for r in results.iter().filter(|r| r.verdict.violations() > 0) {
        eprintln!("seed {}: {} violation(s)", r.seed, r.verdict.violations());
        for p in r.verdict.problems.iter().take(10) {
            eprintln!("  {p}");
        }
        eprintln!(
            "  trace (last lines; rerun with --seeds 1 --seed-start {} to reproduce):",
            r.seed
        );
        for line in &r.trace_tail {
            eprintln!("    {line}");
        }
    }
    let summary = Summary::from_results(&results);
    if args.json {
        println!("{}", serde_json::to_string(&summary).expect("serialises"));
    } else {
        println!("{}", serde_json::to_string_pretty(&summary).expect("serialises"));
    }
    if summary.violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

fn run_all(scenario: &Scenario, seeds: &[u64], threads: usize) -> anyhow::Result<Vec<SeedResult>> {
    let chunks: Vec<Vec<u64>> = (0..threads)
        .map(|t| seeds.iter().copied().skip(t).step_by(threads).collect())
        .collect();
    let mut results: Vec<SeedResult> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|seed| run_seed(scenario, seed))
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect::<anyhow::Result<Vec<Vec<_>>>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    results.sort_by_key(|r| r.seed);
    Ok(results)
}
