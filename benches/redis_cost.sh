#!/usr/bin/env bash
# What sharing keys through Redis costs intake: inletd alone against inletd
# with `[redis]` on, side by side, interleaved, in one run.
#
#   alone        inletd, durability = "fsync"
#   redis        the same, with [redis] url set: each group commit claims
#                its keys (one Lua call) and confirms them (one pipeline)
#
# both with single events and with batches of 100 (`examples/load`, closed
# loop, CONNS connections, default 64). ROUNDS rounds (default 3), each
# DURATION seconds (default 8) after WARMUP (default 2). The Redis is a
# local redis-server without persistence on a free port (keys only: the
# persistence of Redis is not on intake's path). Prints the medians; every
# run is one JSON line in target/bench/redis_cost.jsonl.
#
# BASELINE=path/to/an/older/inletd adds its runs with Redis on to each
# round (labels base-single, base-batch100): what a change costs, side by
# side in one run.
#
#   benches/redis_cost.sh        # about 3 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
OUT=target/bench/redis_cost.jsonl

command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install -y redis-server)"; exit 2; }
cargo build --release --quiet --bin inletd --example load
mkdir -p target/bench
: > "$OUT"
: > "$OUT.redis"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REDIS_DIR=$(mktemp -d)
redis-server --port "$PORT" --bind 127.0.0.1 --dir "$REDIS_DIR" --save "" --appendonly no \
  --daemonize no --logfile "$REDIS_DIR/redis.log" &
REDIS_PID=$!
trap 'kill $REDIS_PID 2>/dev/null; rm -rf "$REDIS_DIR"' EXIT
sleep 0.5

redis_cpu_ticks() { awk '{print $14 + $15}' "/proc/$REDIS_PID/stat"; }

run() { # label batch extra-config [binary]
  local before after started ended
  before=$(redis_cpu_ticks); started=$(date +%s.%N)
  target/release/examples/load --spawn "${4:-target/release/inletd}" --durability fsync \
    --connections "$CONNS" --batch "$2" --duration "$DURATION" --warmup "$WARMUP" \
    --mode closed --label "$1" --config-extra "$3" --json >> "$OUT"
  after=$(redis_cpu_ticks); ended=$(date +%s.%N)
  # redis-server's CPU over the whole run (warm-up and start included).
  echo "$1 $before $after $started $ended" >> "$OUT.redis"
}

REDIS_CONFIG=$(printf '[redis]\nurl = "redis://127.0.0.1:%s/"\ninstance = "bench"\n' "$PORT")
for round in $(seq "$ROUNDS"); do
  echo "round $round of $ROUNDS"
  run alone-single 1 ""
  run redis-single 1 "$REDIS_CONFIG"
  [ -n "${BASELINE:-}" ] && run base-single 1 "$REDIS_CONFIG" "$BASELINE"
  run alone-batch100 100 ""
  run redis-batch100 100 "$REDIS_CONFIG"
  [ -n "${BASELINE:-}" ] && run base-batch100 100 "$REDIS_CONFIG" "$BASELINE"
done

python3 - "$OUT" "$(getconf CLK_TCK)" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
tick = float(sys.argv[2])
redis_cpu = {}
for line in open(sys.argv[1] + ".redis"):
    label, before, after, started, ended = line.split()
    pct = (float(after) - float(before)) / tick / (float(ended) - float(started)) * 100
    redis_cpu.setdefault(label, []).append(pct)
def med(label, key):
    v = [r[key] for r in runs if r["label"] == label and r.get(key) is not None]
    return statistics.median(v) if v else float("nan")
print(f"{'run':<16} {'events/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU %':>7} {'µs CPU/event':>13} {'redis CPU %':>12} {'non-2xx':>8}")
labels = ["alone-single", "redis-single", "base-single", "alone-batch100", "redis-batch100", "base-batch100"]
for label in [l for l in labels if any(r["label"] == l for r in runs)]:
    eps, cpu = med(label, "events_per_s"), med(label, "server_cpu_pct")
    errors = sum(r["non2xx"] + r["errors"] for r in runs if r["label"] == label)
    rc = statistics.median(redis_cpu.get(label, [0.0]))
    print(f"{label:<16} {eps:>10.0f} {med(label,'p50_ms'):>8.2f} {med(label,'p99_ms'):>8.2f} {cpu:>7.1f} {cpu*1e4/eps:>13.1f} {rc:>12.1f} {errors:>8}")
for kind in ["single", "batch100"]:
    a, r = med(f"alone-{kind}", "events_per_s"), med(f"redis-{kind}", "events_per_s")
    print(f"{kind}: with redis / alone = {r/a:.2f}")
    if any(x["label"] == f"base-{kind}" for x in runs):
        b = med(f"base-{kind}", "events_per_s")
        print(f"{kind}: with redis, this build / baseline = {r/b:.2f}")
PY
