"""Draws the simulation figures in docs/img from chinwag-sim JSON output.

    cargo run --release -p chinwag-sim -- --seeds 100 --faults none  --json > none.json
    cargo run --release -p chinwag-sim -- --seeds 100 --faults loss  --json > loss.json
    cargo run --release -p chinwag-sim -- --seeds 100 --faults split --json > split.json
    cargo run --release -p chinwag-sim -- --dissemination 5,20,100,1000 --seeds 10 > rounds.json
    python3 tools/plots/sim_plots.py none.json loss.json split.json rounds.json docs/img
"""

import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

none, loss, split, rounds, out = sys.argv[1:6]
runs = [("no faults", json.load(open(none))), ("1% loss", json.load(open(loss))), ("east-west cut", json.load(open(split)))]
metrics = [
    ("online_cross_dc_ms", "online cross-DC"),
    ("critical_case_ms", "critical case"),
    ("coordinate_convergence_ms", "coordinates everywhere"),
    ("mailbox_replication_ms", "mailbox entry everywhere"),
    ("between_first_two_ms", "east to west"),
]

fig, ax = plt.subplots(figsize=(9, 4.2))
width = 0.26
for i, (label, run) in enumerate(runs):
    xs = [m + (i - 1) * width for m in range(len(metrics))]
    p50 = [run[key]["p50"] for key, _ in metrics]
    p99 = [run[key]["p99"] for key, _ in metrics]
    ax.bar(xs, p99, width, label=f"{label} p99", alpha=0.45)
    ax.scatter(xs, p50, marker="_", s=200, color="black")
ax.axhline(1200, color="red", linestyle="--", linewidth=1)
ax.text(len(metrics) - 0.5, 1220, "article's estimate, 1.2 s", color="red", ha="right", fontsize=8)
ax.set_xticks(range(len(metrics)), [name for _, name in metrics], fontsize=8)
ax.set_ylabel("milliseconds (bars: p99, ticks: p50)")
ax.set_title("5 DCs, 200 ms one way, anti-entropy every 100 ms (100 seeds each)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(f"{out}/sim-latency.png", dpi=110)

data = json.load(open(rounds))
ns = [r["dcs"] for r in data]
fig, ax = plt.subplots(figsize=(6, 3.6))
ax.plot(ns, [r["mean_rounds"] for r in data], "o-", label="measured, push-pull gossip, fanout 1 (mean)")
ax.plot(ns, [r["max_rounds"] for r in data], "s:", label="measured (worst of runs)")
grid = [5 * 1.2**k for k in range(0, 36)]
grid = [n for n in grid if n <= 1000]
ax.plot(grid, [math.log2(n) + math.log(n) for n in grid], "--", label="log2 N + ln N")
ax.set_xscale("log")
ax.set_xlabel("DCs (N)")
ax.set_ylabel("rounds until every DC has it")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(f"{out}/sim-rounds.png", dpi=110)
