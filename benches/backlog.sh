#!/usr/bin/env bash
# A backlog on the real binary: intake while the queue grows to millions,
# the daemon's memory with them queued, and how soon it is ready again after
# a restart on top of them.
#
#   benches/backlog.sh                      # about 2 minutes; ~5 M events, ~4 GB of disk
#   FILL_A=5 FILL_B=10 benches/backlog.sh   # a smoke run
#
# A sink that accepts connections and never answers (timeout_ms = 1 h)
# holds the Processor on its first hand-over, so everything accepted stays
# queued, as when a dashboard hangs. Three runs of examples/load on one
# data dir, batches of 100 at 64 connections, `durability = "fsync"`:
#
#   A  fill for FILL_A seconds (default 15: about 1 M events)
#   B  restart on that backlog (ready time), fill for FILL_B seconds more
#      (default 60: about 5 M); events/s and queue depth every second
#   C  restart on the whole backlog (ready time), then RSS under light load
#
# One JSON line per run in target/bench/backlog.jsonl; a summary on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

FILL_A=${FILL_A:-15}
FILL_B=${FILL_B:-60}
CONNS=${CONNS:-64}
OUT=target/bench
LOAD=target/release/examples/load

cargo build --release --bins --examples 2>&1 | tail -n 1 >&2
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/inletd-backlog.XXXXXX")
SINK=""
cleanup() {
  [ -z "$SINK" ] || kill "$SINK" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Listens, never accepts: connects succeed (the kernel's backlog), answers never come.
python3 -c '
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1024)
print(s.getsockname()[1], flush=True)
time.sleep(10**6)' >"$WORK/sink.port" &
SINK=$!
for _ in $(seq 50); do [ -s "$WORK/sink.port" ] && break; sleep 0.1; done
PORT=$(cat "$WORK/sink.port")
EXTRA=$(printf '[[sinks]]\nname = "hanging"\ntype = "http"\nurl = "http://127.0.0.1:%s/update"\ntimeout_ms = 3600000\n' "$PORT")

RESULTS=$OUT/backlog.jsonl
: >"$RESULTS"
run() { # label duration batch connections
  "$LOAD" --spawn target/release/inletd --data-dir "$WORK/data" --durability fsync \
    --config-extra "$EXTRA" --batch "$3" --connections "$4" --duration "$2" --warmup 0 \
    --progress --json --label "$1" >>"$RESULTS"
}
echo "== A: fill for ${FILL_A} s" >&2
run fill-a "$FILL_A" 100 "$CONNS"
echo "== B: restart on the backlog, fill for ${FILL_B} s" >&2
run fill-b "$FILL_B" 100 "$CONNS"
echo "== C: restart on the whole backlog, light load for 5 s" >&2
run idle-c 5 1 1
du -sh "$WORK/data" >&2

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
runs = {r["label"]: r for r in map(json.loads, open(sys.argv[1]))}
a, b, c = runs["fill-a"], runs["fill-b"], runs["idle-c"]
iv = [i for i in b["intervals"] if i["queue_depth"] is not None and i["events_per_s"] > 0]
tenth = max(1, len(iv) // 10)
first = statistics.median(i["events_per_s"] for i in iv[:tenth * 2])
last = statistics.median(i["events_per_s"] for i in iv[-tenth * 2:])
print(f"| what | value |\n|---|---|")
print(f"| A: events/s filling an empty store | {a['events_per_s']:,.0f} (queue {a['queue_depth']:,} at the end) |")
print(f"| B: ready after a restart on {a['queue_depth']:,} queued | **{b['startup_ms']:,.0f} ms** |")
print(f"| B: events/s, first fifth (queue {iv[0]['queue_depth']:,}–{iv[tenth * 2 - 1]['queue_depth']:,}) | {first:,.0f} |")
print(f"| B: events/s, last fifth (queue {iv[-tenth * 2]['queue_depth']:,}–{iv[-1]['queue_depth']:,}) | {last:,.0f} (**{last / first:.2f}×** the first) |")
print(f"| B: peak RSS while filling | {b['peak_rss_mib']} MiB |")
print(f"| C: ready after a restart on {c['queue_depth']:,} queued | **{c['startup_ms']:,.0f} ms** |")
print(f"| C: RSS with {c['queue_depth']:,} queued, light load | {c['rss_mib']} MiB (peak {c['peak_rss_mib']} MiB) |")
PY
