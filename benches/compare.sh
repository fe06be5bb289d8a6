#!/usr/bin/env bash
# Side by side on one machine, in one go:
#
#   fsync      inletd, durability = "fsync", single events       (examples/load)
#   interval   inletd, durability = "interval", single events    (examples/load)
#   warp       a bare warp server answering 202 (the HTTP ceiling, examples/bare_warp)
#   warp_fsync the same server appending each body to a file and answering
#              after one fdatasync per group, inletd's group commit with
#              nothing else (the durable ceiling, bare_warp --group-fsync)
#   redis      redis-server, appendonly yes + appendfsync always, XADD from
#              redis-benchmark at 50 clients (the seeds' durable buffer)
#   redis_lua  the same redis-server, the seeds' accept step at the Redis level:
#              SET idem:<id> NX EX 86400 + XADD in one Lua call (EVALSHA of
#              benches/seed_stack/dedupe.lua), a fresh random key per call,
#              from redis-benchmark at 50 clients
#   seeds      the seeds' whole stack: FastAPI + redis-py doing that Lua call
#              per POST /webhook/events (benches/seed_stack/app.py), uvicorn
#              with 2 workers, against the same kind of redis-server
#              (examples/load, single events)
#   batch      inletd, durability = "fsync", batches of 100 events
#
# ROUNDS rounds (default 3) of all eight, interleaved, each DURATION seconds
# (default 10) after WARMUP (default 2) at CONNS connections (default 64);
# then the medians and the ratios; then an open-loop sweep of inletd fsync
# single events at SWEEP_PCTS percent of the measured maximum, written to
# target/bench/sweep.csv and drawn into benches/latency.svg by benches/plot.py.
#
#   benches/compare.sh                   # about 8 minutes on 2 cores
#   ROUNDS=1 DURATION=3 SWEEP_PCTS="25 50 100" benches/compare.sh   # a smoke run
#
# Every run is also one JSON line in target/bench/results.jsonl; the summary
# table is in target/bench/summary.md. Needs cargo, python3 (with venv), and
# redis-server + redis-benchmark (Debian: redis-server, redis-tools; installed
# with apt-get when missing). The seeds' stack is pip-installed from PyPI into
# a venv, target/bench/seed-venv (SEED_VENV), made once and reused while
# benches/seed_stack/requirements*.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
REDIS_CLIENTS=${REDIS_CLIENTS:-50}
SEED_WORKERS=${SEED_WORKERS:-2}
SWEEP_PCTS=${SWEEP_PCTS:-"10 20 30 40 50 60 70 80 90 100"}
OUT=target/bench
B=target/release
LOAD=$B/examples/load
SEED=benches/seed_stack
SEED_VENV=${SEED_VENV:-$OUT/seed-venv}

log() { printf '\n== %s\n' "$*" >&2; }

need_redis() {
  command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null && return
  log "installing redis-server and redis-tools (redis-benchmark)"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get install -y redis-server redis-tools >/dev/null ||
    { $sudo apt-get update >/dev/null && $sudo apt-get install -y redis-server redis-tools >/dev/null; }
}

# The seeds' stack in its own venv. Idempotent: kept while it still imports
# and was made from the requirements files as they are now; otherwise made
# again from scratch. uvloop and httptools are tried separately, so that the
# stack still runs (on asyncio + h11, and says so) where they do not install.
need_seed_venv() {
  local want stamp=$SEED_VENV/.requirements.sha256 pylog=${SEED_VENV%/}.pip.log
  want=$(cat "$SEED/requirements.txt" "$SEED/requirements-speedups.txt" | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] &&
    "$SEED_VENV/bin/python" -c 'import fastapi, uvicorn, redis' 2>/dev/null; then
    return
  fi
  log "making the seeds' stack venv: $SEED_VENV (pip install -r $SEED/requirements.txt; log: $pylog)"
  rm -rf "$SEED_VENV"
  python3 -m venv "$SEED_VENV" >"$pylog" 2>&1 || {
    echo "python3 -m venv $SEED_VENV failed (Debian: apt-get install python3-venv); $pylog:" >&2
    tail -n 20 "$pylog" >&2
    rm -rf "$SEED_VENV"
    exit 3
  }
  "$SEED_VENV/bin/pip" install --disable-pip-version-check -r "$SEED/requirements.txt" >>"$pylog" 2>&1 || {
    echo "pip could not install $SEED/requirements.txt into $SEED_VENV (is PyPI reachable?" \
      "no wheel for $(python3 -V)?); the end of $pylog:" >&2
    tail -n 20 "$pylog" >&2
    rm -rf "$SEED_VENV"
    exit 3
  }
  "$SEED_VENV/bin/pip" install --disable-pip-version-check -r "$SEED/requirements-speedups.txt" >>"$pylog" 2>&1 ||
    log "uvloop/httptools did not install (see $pylog): the seeds' stack runs on asyncio + h11"
  echo "$want" >"$stamp"
}

command -v python3 >/dev/null || { echo "python3 is needed" >&2; exit 2; }
need_redis
mkdir -p "$OUT"
need_seed_venv
# What uvicorn's "auto" would pick, named so that the results say it.
SEED_LOOP=asyncio
SEED_HTTP=h11
"$SEED_VENV/bin/python" -c 'import uvloop' 2>/dev/null && SEED_LOOP=uvloop
"$SEED_VENV/bin/python" -c 'import httptools' 2>/dev/null && SEED_HTTP=httptools

log "building (release): inletd, examples/load, examples/bare_warp"
cargo build --release --bins --examples 2>&1 | tail -n 1 >&2

RESULTS=$OUT/results.jsonl
SWEEP=$OUT/sweep.jsonl
: >"$RESULTS"
: >"$SWEEP"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/inletd-compare.XXXXXX")
# The servers running now (the seeds' stack is two at once: redis-server and
# uvicorn), stopped in reverse order on any exit.
CHILDREN=()
started() { CHILDREN+=("$1"); }
stopped() {
  local keep=() p
  for p in ${CHILDREN[@]+"${CHILDREN[@]}"}; do [ "$p" = "$1" ] || keep+=("$p"); done
  CHILDREN=(${keep[@]+"${keep[@]}"})
}
cleanup() {
  local i
  for ((i = ${#CHILDREN[@]} - 1; i >= 0; i--)); do
    kill "${CHILDREN[i]}" 2>/dev/null || true
    wait "${CHILDREN[i]}" 2>/dev/null || true
  done
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

run_warp() { # label [--group-fsync DIR]
  local port pid
  port=$(free_port)
  "$B/examples/bare_warp" --bind "127.0.0.1:$port" "${@:2}" >"$WORK/warp.out" &
  pid=$!
  started "$pid"
  for _ in $(seq 50); do [ -s "$WORK/warp.out" ] && break; sleep 0.1; done
  "$LOAD" --url "http://127.0.0.1:$port" --pid "$pid" --connections "$CONNS" \
    --duration "$DURATION" --warmup "$WARMUP" --json --label "$1" | show >>"$RESULTS"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  stopped "$pid"
  rm -f "$WORK/warp.out"
}

# A fresh redis-server with the seeds' durability (AOF, fsync before every
# answer) on a free loopback port, in its own dir: REDIS_PORT, REDIS_PID.
start_redis() {
  REDIS_PORT=$(free_port)
  REDIS_DIR=$(mktemp -d "$WORK/redis.XXXXXX")
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --appendonly yes --appendfsync always \
    --save '' --dir "$REDIS_DIR" --daemonize no --logfile "$REDIS_DIR/log" &
  REDIS_PID=$!
  started "$REDIS_PID"
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "redis-server did not answer PING within 5 s; its log:" >&2
  cat "$REDIS_DIR/log" >&2
  exit 1
}

stop_redis() {
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || kill "$REDIS_PID"
  wait "$REDIS_PID" 2>/dev/null || true
  stopped "$REDIS_PID"
  rm -rf "$REDIS_DIR"
}

# The Lua step, loaded into each fresh redis-server before EVALSHA; its SHA1
# is that of the text (as $(cat) gives it, without the final newline), so it
# is known before any server runs.
LUA_SHA=$(printf %s "$(cat "$SEED/dedupe.lua")" | sha1sum | cut -d' ' -f1)
load_lua() {
  local sha
  sha=$(redis-cli -p "$REDIS_PORT" SCRIPT LOAD "$(cat "$SEED/dedupe.lua")")
  [ "$sha" = "$LUA_SHA" ] || { echo "SCRIPT LOAD answered '$sha', not $LUA_SHA" >&2; exit 1; }
}

# The figures of redis-benchmark --csv as JSON. It quotes the command line
# without escaping it (the Lua contender's event is full of quotes and
# commas), so the figures are taken as the last fields of the line.
bench_figures() { # csv file
  python3 -c '
import json, sys
head, line = open(sys.argv[1]).read().splitlines()[:2]
keys = [k.strip("\"") for k in head.split(",")][1:]
print(json.dumps(dict(zip(keys, (float(v.strip("\"")) for v in line.rsplit(",", len(keys))[1:])))))' "$1"
}

# redis-benchmark against a fresh redis-server: a warm-up that also sizes the
# measured run to about DURATION seconds, then the measured run, timed, with
# the server's CPU from /proc over it. Every command appends to the stream
# `stream`, so its length afterwards against the calls sent counts the calls
# that appended nothing (for redis_lua: a random key that came up twice).
declare -A REDIS_RPS=() # label → requests/s of its last run
run_redis() { # label [redis-benchmark options] -- command...
  local label=$1 opts=() pid n calls t0 t1 hwm warm prev appended
  shift
  while [ "$1" != -- ]; do opts+=("$1"); shift; done
  shift
  start_redis
  pid=$REDIS_PID
  [ "$1" != EVALSHA ] || load_lua
  prev=${REDIS_RPS[$label]:-0}
  n=$(python3 -c "print(max(20000, int(${prev%.*} * $WARMUP)))")
  calls=$n
  redis-benchmark -p "$REDIS_PORT" -c "$REDIS_CLIENTS" -n "$n" ${opts[@]+"${opts[@]}"} --csv "$@" >"$WORK/redis.csv"
  warm=$(bench_figures "$WORK/redis.csv" | python3 -c 'import json, sys; print(json.load(sys.stdin)["rps"])')
  [ "${prev%.*}" -gt 0 ] || prev=$warm
  n=$(python3 -c "print(int(max($prev, $warm) * $DURATION))")
  calls=$((calls + n))
  t0=$(ticks "$pid")
  head -n 1 /proc/stat >"$WORK/stat0"
  local TIMEFORMAT='%R %U %S'
  { time redis-benchmark -p "$REDIS_PORT" -c "$REDIS_CLIENTS" -n "$n" ${opts[@]+"${opts[@]}"} --csv "$@" >"$WORK/redis.csv"; } 2>"$WORK/redis.time"
  t1=$(ticks "$pid")
  head -n 1 /proc/stat >"$WORK/stat1"
  hwm=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status")
  appended=$(redis-cli -p "$REDIS_PORT" XLEN stream)
  stop_redis
  bench_figures "$WORK/redis.csv" >"$WORK/redis.json"
  python3 - "$WORK/redis.json" "$WORK/redis.time" "$t0" "$t1" "$TCK" "$hwm" "$REDIS_CLIENTS" "$WORK/stat0" "$WORK/stat1" \
    "$label" "$calls" "$appended" <<'EOF' | show >>"$RESULTS"
import json, os, sys
row = json.load(open(sys.argv[1]))
wall, user, sys_ = map(float, open(sys.argv[2]).read().split())
t0, t1, tck, hwm, clients = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
label, calls, appended = sys.argv[10], int(sys.argv[11]), int(sys.argv[12])
rps = float(row["rps"])
s0, s1 = ([int(x) for x in open(f).read().split()[1:9]] for f in sys.argv[8:10])
d = [b - a for a, b in zip(s0, s1)]
cores = os.cpu_count()
busy = (sum(d) - d[3] - d[4] - d[7]) / sum(d) * cores * 100
print(json.dumps({
    "label": label, "mode": "closed", "connections": clients, "batch": 1,
    "duration_s": round(wall, 2), "rps": rps, "events_per_s": rps,
    "p50_ms": float(row["p50_latency_ms"]), "p99_ms": float(row["p99_latency_ms"]),
    "p999_ms": None, "max_ms": float(row["max_latency_ms"]), "non2xx": 0,
    # Calls (warm-up included) that appended nothing to the stream.
    "calls": calls, "duplicates": calls - appended,
    "server_cpu_pct": round((t1 - t0) / tck / wall * 100, 1),
    "loadgen_cpu_pct": round((user + sys_) / wall * 100, 1),
    "peak_rss_mib": round(hwm / 1024, 1),
    "machine_busy_pct": round(busy, 1), "machine_iowait_pct": round(d[4] / sum(d) * cores * 100, 1),
    "machine_steal_pct": round(d[7] / sum(d) * cores * 100, 1),
    "others_cpu_pct": round(max(0.0, busy - (t1 - t0) / tck / wall * 100 - (user + sys_) / wall * 100), 1),
}))
EOF
  REDIS_RPS[$label]=$(tail -n 1 "$RESULTS" | python3 -c 'import json, sys; print(json.load(sys.stdin)["rps"])')
}

# The event the Lua contender appends, about the size of examples/load's.
# redis-benchmark puts a fresh random number (below -r) into each
# __rand_int__, so every call claims a new idempotency key: 2e9 keys against
# well under 1e6 calls a run leaves some 0.01 % duplicates, which the run
# counts ("duplicates") rather than assumes away.
LUA_EVENT='{"event_id":"bench-__rand_int__","event_type":"page_view","user_id":"user_1","properties":{"page":"/pricing"}}'
run_redis_lua() {
  run_redis redis_lua -r 2000000000 -- \
    EVALSHA "$LUA_SHA" 2 'idem:__rand_int__' stream "$LUA_EVENT" 1700000000000
}

# All descendants of a process (uvicorn's workers and multiprocessing's helpers).
descendants() {
  local c
  for c in $(ps -o pid= --ppid "$1"); do
    echo "$c"
    descendants "$c"
  done
}

# The seeds' whole stack: a fresh redis-server as above, uvicorn (SEED_WORKERS
# workers) serving benches/seed_stack/app.py, driven by examples/load like
# inletd. examples/load reads the CPU and RSS of the one --pid it is given,
# and uvicorn's master only supervises, so the script samples the master, its
# workers and redis-server itself over the measured window (started alongside
# the harness, so aligned with its window to a few tens of ms) and puts their
# sum in server_cpu_pct / peak_rss_mib, with the parts beside it.
run_seeds() {
  local port master procs ready
  start_redis
  port=$(free_port)
  SEED_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" SEED_STREAM=events \
    "$SEED_VENV/bin/uvicorn" app:app --app-dir "$SEED" --host 127.0.0.1 --port "$port" \
    --workers "$SEED_WORKERS" --loop "$SEED_LOOP" --http "$SEED_HTTP" \
    --no-access-log --log-level info >"$WORK/uvicorn.log" 2>&1 &
  master=$!
  started "$master"
  # Ready when every worker has said so (each prints this once).
  for _ in $(seq 300); do
    ready=$(grep -c 'Application startup complete' "$WORK/uvicorn.log" || true)
    [ "$ready" -ge "$SEED_WORKERS" ] && break
    kill -0 "$master" 2>/dev/null || break
    sleep 0.1
  done
  if [ "${ready:-0}" -lt "$SEED_WORKERS" ]; then
    echo "uvicorn did not start $SEED_WORKERS workers within 30 s; its log:" >&2
    cat "$WORK/uvicorn.log" >&2
    exit 1
  fi
  procs="$master $(descendants "$master" | tr '\n' ' ')"
  python3 - "$WARMUP" "$DURATION" "$TCK" "$REDIS_PID" $procs >"$WORK/seeds.cpu" <<'EOF' &
import json, sys, time
t_start = time.monotonic()
warmup, duration, tck, redis_pid = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
pids = [redis_pid] + sys.argv[5:]
def stat(pid):
    try:
        s = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    name = s[s.index("(") + 1 : s.rindex(")")]
    f = s[s.rindex(")") + 2 :].split()
    return name, int(f[11]) + int(f[12])
def hwm(pid):
    try:
        return next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0
# examples/load measures from 20 ms after its start, past the warm-up.
time.sleep(max(0.0, t_start + warmup + 0.02 - time.monotonic()))
a, w0 = {p: stat(p) for p in pids}, time.monotonic()
time.sleep(max(0.0, w0 + duration - time.monotonic()))
b, w1 = {p: stat(p) for p in pids}, time.monotonic()
pct = {p: (b[p][0] + "/" + p, (b[p][1] - a[p][1]) / tck / (w1 - w0) * 100) for p in pids if a[p] and b[p]}
print(json.dumps({
    "parts": list(pct.values()),
    "uvicorn": sum(v for p, (_, v) in pct.items() if p != redis_pid),
    "redis": sum(v for p, (_, v) in pct.items() if p == redis_pid),
    "rss_kib": {"uvicorn": sum(hwm(p) for p in pids[1:]), "redis": hwm(redis_pid)},
}))
EOF
  local sampler=$!
  "$LOAD" --url "http://127.0.0.1:$port" --pid "$master" --connections "$CONNS" \
    --duration "$DURATION" --warmup "$WARMUP" --json --label seeds >"$WORK/seeds.json"
  wait "$sampler"
  python3 - "$WORK/seeds.json" "$WORK/seeds.cpu" "$SEED_WORKERS" "$SEED_LOOP" "$SEED_HTTP" <<'EOF' | show >>"$RESULTS"
import json, sys
r = json.load(open(sys.argv[1]))
c = json.load(open(sys.argv[2]))
server = c["uvicorn"] + c["redis"]
r["server_cpu_pct"] = round(server, 1)
r["server_cpu_parts_pct"] = {"uvicorn": round(c["uvicorn"], 1), "redis": round(c["redis"], 1)}
r["server_threads_cpu_pct"] = [[n, round(v, 1)] for n, v in sorted(c["parts"], key=lambda x: -x[1])]
# Peaks read by the sampler at its end, the stack still up.
r["peak_rss_mib"] = round((c["rss_kib"]["uvicorn"] + c["rss_kib"]["redis"]) / 1024, 1)
r["peak_rss_parts_mib"] = {k: round(v / 1024, 1) for k, v in c["rss_kib"].items()}
if r.get("machine_busy_pct") is not None and r.get("loadgen_cpu_pct") is not None:
    r["others_cpu_pct"] = round(max(0.0, r["machine_busy_pct"] - server - r["loadgen_cpu_pct"]), 1)
r["workers"], r["loop"], r["http"] = int(sys.argv[3]), sys.argv[4], sys.argv[5]
print(json.dumps(r))
EOF
  kill "$master" 2>/dev/null || true
  wait "$master" 2>/dev/null || true
  stopped "$master"
  stop_redis
}

for round in $(seq "$ROUNDS"); do
  log "round $round of $ROUNDS (${DURATION} s each after ${WARMUP} s warm-up, $CONNS connections)"
  run_inletd fsync fsync 1
  run_inletd interval interval 1
  run_warp warp
  mkdir -p "$WORK/warp_fsync"
  run_warp warp_fsync --group-fsync "$WORK/warp_fsync"
  rm -rf "$WORK/warp_fsync"
  run_redis redis -- XADD stream '*' field value
  run_redis_lua
  run_seeds
  run_inletd batch fsync 100
done

log "medians of $ROUNDS rounds"
python3 - "$RESULTS" "$ROUNDS" "$CONNS" "$REDIS_CLIENTS" "$DURATION" "$SEED_WORKERS" "$SEED_LOOP" "$SEED_HTTP" >"$OUT/summary.md" <<'EOF'
import json, os, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rounds, conns, rclients, duration, workers, loop, http = sys.argv[2:9]
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
    "warp_fsync": f"bare warp, one `fdatasync` per group (durable ceiling), {conns} conns",
    "redis": f"Redis XADD, `appendfsync always`, {rclients} clients",
    "redis_lua": f"Redis Lua `SET NX EX` + `XADD` (EVALSHA), `appendfsync always`, {rclients} clients",
    "seeds": f"seeds' stack: FastAPI + redis-py, same Lua, uvicorn {workers} workers ({loop}/{http}), `appendfsync always`, {conns} conns",
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
print(f"\nnon-2xx answers and connection errors over all runs: {bad}")
disk = [(label, med(label, "disk_bytes_per_event")) for label in ("fsync", "interval", "batch")]
if any(v is not None for _, v in disk):
    print("inletd's data dir at the end of a run, bytes per event answered (medians; the ids count up): "
          + ", ".join(f"{label} {fmt(v, '.1f')}" for label, v in disk))
dups = [r for r in rows if r["label"] == "redis_lua"]
if dups:
    print(f"Redis Lua calls that found their random key taken (duplicates, warm-ups included): "
          f"{sum(r['duplicates'] for r in dups):,} of {sum(r['calls'] for r in dups):,}")
if med("seeds", "rps") is not None:
    parts = [r["server_cpu_parts_pct"] for r in rows if r["label"] == "seeds"]
    rss = [r["peak_rss_parts_mib"] for r in rows if r["label"] == "seeds"]
    m = lambda xs, k: statistics.median(x[k] for x in xs)
    print(f"Seeds' stack, server CPU and RSS = uvicorn (master + workers) + redis-server, sampled by the script: "
          f"CPU {m(parts, 'uvicorn'):.0f} % + {m(parts, 'redis'):.0f} %, peak RSS {m(rss, 'uvicorn'):.1f} + {m(rss, 'redis'):.1f} MiB (medians)")
print()
def ratio(a, b):
    a, b = med(*a), med(*b)
    return None if not a or not b else a / b
def cpu(label):
    """Median over rounds of server CPU (µs) per event."""
    v = [r["server_cpu_pct"] * 1e4 / r["events_per_s"] for r in rows
         if r["label"] == label and r.get("events_per_s") and r.get("server_cpu_pct") is not None]
    return statistics.median(v) if v else None
def cpu_ratio(a, b):
    a, b = cpu(a), cpu(b)
    return None if not a or not b else a / b
lines = [
    ("inletd fsync / Redis XADD (goal ≥ 1.0)", ratio(("fsync", "rps"), ("redis", "rps"))),
    ("inletd fsync / Redis Lua (goal ≥ 1.5)", ratio(("fsync", "rps"), ("redis_lua", "rps"))),
    ("inletd fsync / seeds' stack", ratio(("fsync", "rps"), ("seeds", "rps"))),
    ("inletd fsync / bare warp (goal ≥ 0.5)", ratio(("fsync", "rps"), ("warp", "rps"))),
    ("inletd fsync / durable ceiling", ratio(("fsync", "rps"), ("warp_fsync", "rps"))),
    ("durable ceiling / Redis XADD", ratio(("warp_fsync", "rps"), ("redis", "rps"))),
    ("CPU per event: inletd fsync ÷ bare warp (goal ≤ 2)", cpu_ratio("fsync", "warp")),
    ("CPU per event: durable ceiling ÷ bare warp", cpu_ratio("warp_fsync", "warp")),
    ("CPU per event: inletd fsync ÷ durable ceiling", cpu_ratio("fsync", "warp_fsync")),
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
