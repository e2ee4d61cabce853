#!/usr/bin/env bash
# A soak at a steady rate: one node pinned to core 0, `chinwag bench` on core 1, 1,000
# users in 500 pairs. Prints the bench's JSON (lost, duplicated, latency, the node's RSS
# before, after and over time). Usage: scripts/soak.sh [DURATION] [MSGS_PER_S] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10m}
rate=${2:-2000}
out=${3:-$(mktemp -d)}
cargo build --release -q -p chinwag
bin=$PWD/target/release/chinwag
mkdir -p "$out"
rm -rf "$out/data"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$out/soak.toml" <<TOML
listen = "127.0.0.1:$port"
data = "$out/data"
[log]
level = "warn"
TOML
taskset -c 0 "$bin" serve --config "$out/soak.toml" > "$out/serve.out" 2> "$out/serve.err" &
node=$!
trap 'kill $node 2>/dev/null || true' EXIT
until grep -q "chinwag listening" "$out/serve.out" 2>/dev/null; do sleep 0.1; done
taskset -c 1 "$bin" bench --server "ws://127.0.0.1:$port" --data "$out/data" --pid "$node" --json \
    --scenario pairs --users 1000 --rate "$rate" --duration "$duration" > "$out/soak.json" 2> "$out/bench.err"
kill -TERM "$node"
wait "$node"
echo "node exited cleanly; results in $out/soak.json" >&2
cat "$out/soak.json"
