#!/usr/bin/env bash
# Side by side on one machine, in one go:
#
#   fsync      inletd, durability = "fsync", single events       (examples/load)
#   interval   inletd, durability = "interval", single events    (examples/load)
#   warp       a bare warp server answering 202 (the HTTP ceiling, examples/bare_warp)
#   redis      redis-server, appendonly yes + appendfsync always, XADD from
#              redis-benchmark at 50 clients (the seeds' durable buffer)
#   batch      inletd, durability = "fsync", batches of 100 events
#
# ROUNDS rounds (default 3) of all five, interleaved, each DURATION seconds
# (default 10) after WARMUP (default 2) at CONNS connections (default 64);
# then the medians and the ratios; then an open-loop sweep of inletd fsync
# single events at SWEEP_PCTS percent of the measured maximum, written to
# target/bench/sweep.csv and drawn into benches/latency.svg by benches/plot.py.
#
#   benches/compare.sh                   # about 7 minutes on 2 cores
#   ROUNDS=1 DURATION=3 SWEEP_PCTS="25 50 100" benches/compare.sh   # a smoke run
#
# Every run is also one JSON line in target/bench/results.jsonl; the summary
# table is in target/bench/summary.md. Needs cargo, python3, and
# redis-server + redis-benchmark (Debian: redis-server, redis-tools; installed
# with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
REDIS_CLIENTS=${REDIS_CLIENTS:-50}
SWEEP_PCTS=${SWEEP_PCTS:-"10 20 30 40 50 60 70 80 90 100"}
OUT=target/bench
B=target/release
LOAD=$B/examples/load

log() { printf '\n== %s\n' "$*" >&2; }

need_redis() {
  command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null && return
  log "installing redis-server and redis-tools (redis-benchmark)"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get install -y redis-server redis-tools >/dev/null ||
    { $sudo apt-get update >/dev/null && $sudo apt-get install -y redis-server redis-tools >/dev/null; }
}

command -v python3 >/dev/null || { echo "python3 is needed" >&2; exit 2; }
need_redis

log "building (release): inletd, examples/load, examples/bare_warp"
cargo build --release --bins --examples 2>&1 | tail -n 1 >&2

mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
SWEEP=$OUT/sweep.jsonl
: >"$RESULTS"
: >"$SWEEP"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/inletd-compare.XXXXXX")
CHILD=""
cleanup() {
  if [ -n "$CHILD" ]; then
    kill "$CHILD" 2>/dev/null || true
    wait "$CHILD" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# utime+stime ticks of a process.
ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)

# One JSON line from examples/load; also echoed in short to stderr.
show() {
  python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    g = lambda k: r.get(k)
    print("%10s: %9.0f req/s %9.0f ev/s  p50 %.2f  p99 %.2f ms  cpu server %s%% loadgen %s%% others %s%% steal %s%%  non2xx %s"
          % (g("label"), g("rps"), g("events_per_s"), g("p50_ms"), g("p99_ms"),
             g("server_cpu_pct"), g("loadgen_cpu_pct"), g("others_cpu_pct"), g("machine_steal_pct"), g("non2xx")), file=sys.stderr)
    sys.stdout.write(line)'
}

run_inletd() { # label durability batch
  "$LOAD" --spawn "$B/inletd" --durability "$2" --batch "$3" --connections "$CONNS" \
    --duration "$DURATION" --warmup "$WARMUP" --json --label "$1" | show >>"$RESULTS"
}

run_warp() {
  local port
  port=$(free_port)
  "$B/examples/bare_warp" --bind "127.0.0.1:$port" >"$WORK/warp.out" &
  CHILD=$!
  for _ in $(seq 50); do [ -s "$WORK/warp.out" ] && break; sleep 0.1; done
  "$LOAD" --url "http://127.0.0.1:$port" --pid "$CHILD" --connections "$CONNS" \
    --duration "$DURATION" --warmup "$WARMUP" --json --label warp | show >>"$RESULTS"
  kill "$CHILD"; wait "$CHILD" 2>/dev/null || true
  CHILD=""
}

REDIS_RPS=0
run_redis() {
  local port dir pid n t0 t1 hwm
  port=$(free_port)
  dir=$(mktemp -d "$WORK/redis.XXXXXX")
  redis-server --port "$port" --bind 127.0.0.1 --appendonly yes --appendfsync always \
    --save '' --dir "$dir" --daemonize no --logfile "$dir/log" &
  CHILD=$!
  pid=$CHILD
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  # Warm-up, which also sizes the measured run to about DURATION seconds.
  n=$(python3 -c "print(max(20000, int(${REDIS_RPS%.*} * $WARMUP)))")
  redis-benchmark -p "$port" -c "$REDIS_CLIENTS" -n "$n" --csv XADD stream '*' field value >"$WORK/redis.csv"
  local warm
  warm=$(python3 -c 'import csv,sys; print(float(list(csv.DictReader(open(sys.argv[1])))[0]["rps"]))' "$WORK/redis.csv")
  [ "${REDIS_RPS%.*}" -gt 0 ] || REDIS_RPS=$warm
  n=$(python3 -c "print(int(max($REDIS_RPS, $warm) * $DURATION))")
  t0=$(ticks "$pid")
  head -n 1 /proc/stat >"$WORK/stat0"
  local TIMEFORMAT='%R %U %S'
  { time redis-benchmark -p "$port" -c "$REDIS_CLIENTS" -n "$n" --csv XADD stream '*' field value >"$WORK/redis.csv"; } 2>"$WORK/redis.time"
  t1=$(ticks "$pid")
  head -n 1 /proc/stat >"$WORK/stat1"
  hwm=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || kill "$pid"
  wait "$pid" 2>/dev/null || true
  CHILD=""
  rm -rf "$dir"
  python3 - "$WORK/redis.csv" "$WORK/redis.time" "$t0" "$t1" "$TCK" "$hwm" "$REDIS_CLIENTS" "$WORK/stat0" "$WORK/stat1" <<'EOF' | show >>"$RESULTS"
import csv, json, os, sys
row = list(csv.DictReader(open(sys.argv[1])))[0]
wall, user, sys_ = map(float, open(sys.argv[2]).read().split())
t0, t1, tck, hwm, clients = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
rps = float(row["rps"])
s0, s1 = ([int(x) for x in open(f).read().split()[1:9]] for f in sys.argv[8:10])
d = [b - a for a, b in zip(s0, s1)]
cores = os.cpu_count()
busy = (sum(d) - d[3] - d[4] - d[7]) / sum(d) * cores * 100
print(json.dumps({
    "label": "redis", "mode": "closed", "connections": clients, "batch": 1,
    "duration_s": round(wall, 2), "rps": rps, "events_per_s": rps,
    "p50_ms": float(row["p50_latency_ms"]), "p99_ms": float(row["p99_latency_ms"]),
    "p999_ms": None, "max_ms": float(row["max_latency_ms"]), "non2xx": 0,
    "server_cpu_pct": round((t1 - t0) / tck / wall * 100, 1),
    "loadgen_cpu_pct": round((user + sys_) / wall * 100, 1),
    "peak_rss_mib": round(hwm / 1024, 1),
    "machine_busy_pct": round(busy, 1), "machine_iowait_pct": round(d[4] / sum(d) * cores * 100, 1),
    "machine_steal_pct": round(d[7] / sum(d) * cores * 100, 1),
    "others_cpu_pct": round(max(0.0, busy - (t1 - t0) / tck / wall * 100 - (user + sys_) / wall * 100), 1),
}))
EOF
  REDIS_RPS=$(tail -n 1 "$RESULTS" | python3 -c 'import json, sys; print(json.load(sys.stdin)["rps"])')
}

for round in $(seq "$ROUNDS"); do
  log "round $round of $ROUNDS (${DURATION} s each after ${WARMUP} s warm-up, $CONNS connections)"
  run_inletd fsync fsync 1
  run_inletd interval interval 1
  run_warp
  run_redis
  run_inletd batch fsync 100
done

log "medians of $ROUNDS rounds"
python3 - "$RESULTS" "$ROUNDS" "$CONNS" "$REDIS_CLIENTS" "$DURATION" >"$OUT/summary.md" <<'EOF'
import json, os, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rounds, conns, rclients, duration = sys.argv[2:6]
def med(label, key):
    v = [r[key] for r in rows if r["label"] == label and r.get(key) is not None]
    return statistics.median(v) if v else None
def runs(label, key):
    return " · ".join(f"{r[key]:,.0f}" for r in rows if r["label"] == label)
def fmt(v, spec=",.0f"):
    return "–" if v is None else format(v, spec)
names = {
    "fsync": f"inletd `fsync`, single events, {conns} conns",
    "interval": f"inletd `interval`, single events, {conns} conns",
    "warp": f"bare warp 202 (HTTP ceiling), {conns} conns",
    "redis": f"Redis XADD, `appendfsync always`, {rclients} clients",
    "batch": f"inletd `fsync`, batches of 100, {conns} conns",
}
print(f"Medians of {rounds} rounds, {duration} s each. CPU: 100 % = one core; the machine has {os.cpu_count()}.\n")
print("| contender | runs (requests/s) | requests/s | events/s | p50 ms | p99 ms | p999 ms | server CPU | load-gen CPU | other processes' CPU | iowait / steal | server peak RSS |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for label, name in names.items():
    print(f"| {name} | {runs(label, 'rps')} | **{fmt(med(label, 'rps'))}** | {fmt(med(label, 'events_per_s'))} "
          f"| {fmt(med(label, 'p50_ms'), '.2f')} | {fmt(med(label, 'p99_ms'), '.2f')} | {fmt(med(label, 'p999_ms'), '.2f')} "
          f"| {fmt(med(label, 'server_cpu_pct'))} % | {fmt(med(label, 'loadgen_cpu_pct'))} % | {fmt(med(label, 'others_cpu_pct'))} % | {fmt(med(label, 'machine_iowait_pct'))} / {fmt(med(label, 'machine_steal_pct'))} % | {fmt(med(label, 'peak_rss_mib'), '.1f')} MiB |")
bad = sum(r.get("non2xx", 0) + r.get("errors", 0) for r in rows)
print(f"\nnon-2xx answers and connection errors over all runs: {bad}\n")
def ratio(a, b):
    a, b = med(*a), med(*b)
    return None if not a or not b else a / b
lines = [
    ("inletd fsync / Redis XADD (goal ≥ 1.5)", ratio(("fsync", "rps"), ("redis", "rps"))),
    ("inletd fsync / bare warp (goal ≥ 0.5)", ratio(("fsync", "rps"), ("warp", "rps"))),
    ("inletd interval / inletd fsync", ratio(("interval", "rps"), ("fsync", "rps"))),
    ("inletd fsync batches, events/s / 200,000 (goal ≥ 1)", (med("batch", "events_per_s") or 0) / 200000),
    ("inletd fsync batches / single events, events/s", ratio(("batch", "events_per_s"), ("fsync", "events_per_s"))),
]
print("| ratio | value |\n|---|---|")
for name, v in lines:
    print(f"| {name} | **{fmt(v, '.2f')}** |")
srv = [(r["label"], r.get("server_latency_ms"), r.get("queue_depth")) for r in rows if r.get("server_latency_ms")]
print("\ninletd's own `/stats/summary` at the end of each run (ack = receipt→answer since start; p50/p99 = receipt→processed, bucket upper bounds):\n")
for label, lat, depth in srv:
    print(f"- {label}: {json.dumps(lat, sort_keys=True)}, queue_depth {depth}")
EOF
cat "$OUT/summary.md"

MAX=$(python3 -c '
import json, statistics, sys
v = [json.loads(l)["rps"] for l in open(sys.argv[1]) if json.loads(l)["label"] == "fsync"]
print(int(statistics.median(v)))' "$RESULTS")
log "open-loop sweep, inletd fsync single events, max $MAX requests/s: ${SWEEP_PCTS}%"
for pct in $SWEEP_PCTS; do
  rate=$((MAX * pct / 100))
  "$LOAD" --spawn "$B/inletd" --durability fsync --mode open --rate "$rate" --connections "$CONNS" \
    --duration "$DURATION" --warmup "$WARMUP" --json --label "sweep-$pct" | show >>"$SWEEP"
done
python3 - "$SWEEP" "$MAX" >"$OUT/sweep.csv" <<'EOF'
import json, sys
print("pct_of_max,offered_rps,achieved_rps,p50_ms,p99_ms,p999_ms,service_p99_ms,server_ack_p99_ms,server_cpu_pct,loadgen_cpu_pct,others_cpu_pct,machine_steal_pct,unsent")
for line in open(sys.argv[1]):
    r = json.loads(line)
    ack = (r.get("server_latency_ms") or {}).get("ack_p99")
    print(",".join(str(x) for x in [r["label"].split("-")[1], r["offered_rps"], r["rps"], r["p50_ms"], r["p99_ms"], r["p999_ms"],
                                   r["service_p99_ms"], ack, r["server_cpu_pct"], r["loadgen_cpu_pct"], r.get("others_cpu_pct"), r.get("machine_steal_pct"), r["unsent"]]))
EOF
log "sweep ($OUT/sweep.csv)"
column -s, -t <"$OUT/sweep.csv" >&2 || cat "$OUT/sweep.csv" >&2
python3 benches/plot.py "$OUT/sweep.csv" benches/latency.svg
log "plot: benches/latency.svg"
