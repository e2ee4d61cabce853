#!/usr/bin/env python3
"""One `chinwag bench` pairs run, seen second by second from the server's side.

Starts a fresh node (pinned to core 0) and the generator (core 1), and while they run
samples, every 100 ms: each server thread's CPU time (/proc/PID/task/*/stat), the store's
commit-time histogram and engine queues (/metrics) and the store's new table and journal
files. Prints the generator's summary, then one line per second of sending: messages
delivered and their latency p99 (from the generator's `latency_by_second_ms`), commits,
commits slower than 12.8 / 51.2 ms, CPU ticks (1/100 s) per thread, the most sealed
memtables and level-0 runs of any keyspace and the longest writer queue seen, the
compaction time in the second (it can exceed 1,000 ms with two compactions at once), and
files the store created. Seconds
are aligned with the generator's to within a quarter of a second.

    tools/perf/per_second.py --bin target/release/chinwag --config bench.toml \
        --data /tmp/benchnode/data --rate 10000 --duration 30

The config must listen on --listen and keep its data in --data (as in
docs/performance.md). Linux only.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import threading
import time
import urllib.request

THREADS = {"tokio-rt-worker": "tokio", "chinwag-store-w": "writer", "fjall:worker": "fjall", "chinwag-spill": "spill"}


def thread_ticks(pid):
    """CPU ticks (user + system) per thread role."""
    ticks = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            comm = open(f"{task}/comm").read().strip()
            fields = open(f"{task}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        role = THREADS.get(comm, "other")
        ticks[(role, task)] = int(fields[11]) + int(fields[12])
    return ticks


def scrape(listen):
    """From /metrics: cumulative store commits (all, slower than 12.8 ms, slower than
    51.2 ms), and the engine's queues now: the most sealed memtables and level-0 runs of
    any keyspace, the writer's queue, and compaction time so far (µs)."""
    text = urllib.request.urlopen(f"http://{listen}/metrics", timeout=1).read().decode()
    buckets, engine = {}, {"sealed": 0, "l0": 0, "queue": 0, "compacting": 0}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{")[0]
        if name == "chinwag_store_commit_seconds_bucket":
            buckets[series.split('"')[1]] = float(value)
        elif name in ENGINE:
            engine[ENGINE[name]] = max(engine[ENGINE[name]], int(float(value)))
    total = buckets["+Inf"]
    return (total, total - buckets["0.0128"], total - buckets["0.0512"]), engine


ENGINE = {
    "chinwag_store_sealed_memtables": "sealed",
    "chinwag_store_level0_runs": "l0",
    "chinwag_store_writer_queue": "queue",
    "chinwag_store_compaction_microseconds_total": "compacting",
}


def store_files(data):
    store = os.path.join(data, "store")
    found = glob.glob(f"{store}/keyspaces/*/tables/*") + glob.glob(f"{store}/*.jnl")
    return {os.path.relpath(f, store) for f in found}


class Sampler:
    def __init__(self, pid, listen, data):
        self.pid, self.listen, self.data = pid, listen, data
        self.samples = []  # (time, ticks by role since last, commit counters, new files)
        self.seen = store_files(data)
        self.prev = thread_ticks(pid)

    def sample(self):
        now, cur = time.time(), thread_ticks(self.pid)
        by_role = {}
        for key, value in cur.items():
            by_role[key[0]] = by_role.get(key[0], 0) + value - self.prev.get(key, value)
        self.prev = cur
        try:
            commits, engine = scrape(self.listen)
        except (OSError, KeyError):
            commits, engine = None, None
        files = store_files(self.data)
        new, self.seen = sorted(files - self.seen), self.seen | files
        self.samples.append((now, by_role, commits, new, engine))


def follow_progress(stderr, started):
    """Marks when sending began, from the generator's progress line (printed every 0.5 s:
    the mark is placed a quarter second before the first line that shows a send)."""
    line = b""
    while chunk := stderr.read(1):
        if chunk in b"\r\n":
            sent = re.search(rb"sent\s+(\d+)", line)
            if started[0] is None and sent and int(sent.group(1)) > 0:
                started[0] = time.time() - 0.25
            line = b""
        else:
            line += chunk


def per_second(samples, start, second):
    """The samples of one second of sending, and the commit counters at its bounds."""
    inside = [s for s in samples if second <= s[0] - start < second + 1]
    counters = [s[2] for s in samples if s[2] and s[0] - start < second + 1]
    before = [s[2] for s in samples if s[2] and s[0] - start < second]
    last, first = (counters or [(0, 0, 0)])[-1], (before or [(0, 0, 0)])[-1]
    return inside, [a - b for a, b in zip(last, first)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--listen", default="127.0.0.1:7790")
    ap.add_argument("--rate", help="messages/s offered; omit for saturation")
    ap.add_argument("--duration", type=int, default=30, help="seconds of sending")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--numbered", action="store_true", help="senders number their sends (`bench --numbered`)")
    ap.add_argument("--log", help="write the server's log here (with a debug level in the config, the store's "
                    "spill and checkpoint timings); the first line printed after the summary is the time "
                    "sending began, in Unix seconds, to place the log's lines in the seconds below")
    args = ap.parse_args()

    subprocess.run(["rm", "-rf", args.data], check=True)
    os.makedirs(args.data)
    subprocess.run([args.bin, "token", "--user", "x", "--data", args.data], check=True, stdout=subprocess.DEVNULL)
    server = subprocess.Popen(["taskset", "-c", "0", args.bin, "serve", "--config", args.config],
                              stdout=subprocess.DEVNULL,
                              stderr=open(args.log, "w") if args.log else subprocess.DEVNULL)
    try:
        time.sleep(1)
        bench = ["taskset", "-c", "1", args.bin, "bench", "--server", f"ws://{args.listen}", "--data", args.data,
                 "--pid", str(server.pid), "--json", "--scenario", "pairs", "--users", str(args.users),
                 "--duration", f"{args.duration}s"] + (["--rate", args.rate] if args.rate else []) + (["--numbered"] if args.numbered else [])
        generator = subprocess.Popen(bench, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started = [None]
        threading.Thread(target=follow_progress, args=(generator.stderr, started), daemon=True).start()
        # Read the report while the run goes on: for long runs it exceeds a pipe's buffer,
        # and the generator would block writing it.
        output = []
        reader = threading.Thread(target=lambda: output.append(generator.stdout.read()), daemon=True)
        reader.start()
        sampler = Sampler(server.pid, args.listen, args.data)
        while generator.poll() is None:
            time.sleep(0.1)
            sampler.sample()
        reader.join()
        report = json.loads(output[0])
    finally:
        server.kill()
        server.wait()

    lat = report["latency_ms"]
    print(f"delivered/s {report['delivered_per_sec']:.0f}  p50 {lat['p50']:.1f}  p99 {lat['p99']:.1f}  "
          f"p999 {lat['p999']:.1f} ms  lost {report['lost']}  duplicated {report['duplicated']}  "
          f"sending-phase CPU {report.get('server_load_cpu_percent')} %")
    if started[0] is None:
        return
    if args.log:
        print(f"sending began at {started[0]:.3f}")
    by_second = {s["second"]: s for s in report.get("latency_by_second_ms", [])}
    for second in range(args.duration):
        inside, (commits, slow13, slow51) = per_second(sampler.samples, started[0], second)
        ticks = {role: sum(s[1].get(role, 0) for s in inside) for role in ("tokio", "writer", "fjall", "spill")}
        files = [f for s in inside for f in s[3]]
        engine = [s[4] for s in inside if s[4]]
        most = {key: max((e[key] for e in engine), default=0) for key in ("sealed", "l0", "queue")}
        compacting = (engine[-1]["compacting"] - engine[0]["compacting"]) // 1000 if engine else 0
        this = by_second.get(second, {})
        print(f"{second:3d}  delivered {this.get('messages', 0):6d}  p99 {this.get('p99', 0):7.1f} ms  commits {commits:5.0f}  "
              f">12.8ms {slow13:3.0f}  >51.2ms {slow51:3.0f}  "
              + "  ".join(f"{role} {t:3d}" for role, t in ticks.items())
              + f"  sealed {most['sealed']}  l0 {most['l0']:2d}  queue {most['queue']:4d}  compacting {compacting:4d} ms"
              + (f"  new {' '.join(files)}" if files else ""))


if __name__ == "__main__":
    main()
