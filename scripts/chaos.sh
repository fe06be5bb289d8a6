#!/usr/bin/env bash
# The chaos run behind RELIABILITY.md: the crash, power-cut, corruption and
# full-disk stories of the test suite at full strength, then a soak. Each
# step is the same test `cargo test` runs (CI runs them at their default,
# smaller counts, about 5 minutes together), with a knob turned up:
#
#   kill -9 under load     CRASH_CYCLES       (CI 20, here 200; 1 in 10 during start-up)
#   SIGTERM under load     SIGTERM_CYCLES     (CI 1, here 20)
#   power cut, fsync       POWERCUT_CYCLES    (CI 10, here 50)
#   kill -9, interval      POWERCUT_CYCLES    (CI 10, here 20): the loss window
#   corruption matrix      CORRUPTION_TRIALS  (CI 20, here 100)
#   full disk              one run (a 4 MiB tmpfs filled to the brim)
#   soak                   SOAK_MINUTES at half the measured maximum rate
#
#   scripts/chaos.sh              # everything, about 30 minutes
#   SOAK_MINUTES=2 scripts/chaos.sh
#   CHAOS_STEPS="kill9 corruption" scripts/chaos.sh
#
# The power-cut and full-disk steps mount filesystems: run as root (they
# fail and say why otherwise). Output: each step's log under
# target/chaos/, and a summary of the figures at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

steps="${CHAOS_STEPS:-kill9 sigterm powercut interval corruption diskfull soak}"
soak_minutes="${SOAK_MINUTES:-15}"
out=target/chaos
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"

say() { echo "$*" | tee -a "$summary"; }

echo "== building (release: the figures are for the binary operators run)"
cargo build --release --bin inletd --example load
cargo test --release --no-run --test crash --test powercut --test corruption --test storage_faults 2>&1 | tail -1

# Runs one test at release speed, keeps its output, prints its figure lines.
run_test() {
    local name="$1" file="$2" filter="$3" pattern="$4"
    shift 4
    local log="$out/$name.log" started status=0
    started=$(date +%s)
    echo "== $name: $*"
    env "$@" cargo test --release --test "$file" "$filter" -- --nocapture --exact >"$log" 2>&1 || status=$?
    local took=$(( $(date +%s) - started ))
    if [ "$status" -eq 0 ]; then
        say "$name: passed in ${took} s"
    else
        say "$name: FAILED (exit $status) after ${took} s; see $log"
    fi
    grep -E "$pattern" "$log" | sed 's/^/    /' | tee -a "$summary" || true
    return 0
}

for step in $steps; do
    case "$step" in
    kill9)
        run_test kill9 crash kill_9_under_load_loses_nothing_acknowledged \
            "^after .* kill -9s" CRASH_CYCLES=200 ;;
    sigterm)
        run_test sigterm crash sigterm_under_load_drains_and_exits_zero \
            "SIGTERMs under load" SIGTERM_CYCLES=20 ;;
    powercut)
        run_test powercut powercut power_cuts_lose_nothing_acknowledged_with_fsync \
            "^after .* power cuts" POWERCUT_CYCLES=50 ;;
    interval)
        run_test interval powercut kill_9_in_interval_mode_loses_only_the_last_interval \
            "^interval mode" POWERCUT_CYCLES=20 ;;
    corruption)
        run_test corruption corruption \
            a_damaged_stopped_store_is_either_refused_by_name_or_read_in_full_or_reported \
            "^(damage|file damage|truncate|flip-bit|zero-page|delete|db |conf |blobs|inletd.mark|snap|[0-9]+ trials)" \
            CORRUPTION_TRIALS=100 ;;
    diskfull)
        run_test diskfull storage_faults a_full_disk_answers_503_and_recovers_when_space_returns \
            "." RUST_BACKTRACE=0 ;;
    soak)
        echo "== soak: the maximum rate first (closed loop, 10 s), then ${soak_minutes} min at half of it"
        max=$(target/release/examples/load --spawn target/release/inletd --connections 64 \
            --duration 10 --json | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["events_per_s"]))')
        rate=$((max / 2))
        target/release/examples/load --spawn target/release/inletd --mode open --rate "$rate" \
            --connections 64 --duration $((soak_minutes * 60)) --warmup 0 --progress --json \
            >"$out/soak.json" 2>"$out/soak.log"
        python3 - "$out/soak.json" "$max" "$rate" <<'PY' | tee -a "$summary"
import json, sys
r = json.load(open(sys.argv[1]))
pts = [(p["t"], p["rss_mib"]) for p in r.get("intervals") or [] if p.get("rss_mib") is not None]
# The slope over the last two thirds: start-up and the first fill are not a leak.
tail = pts[len(pts) // 3:]
n = len(tail)
if n < 2:
    print("soak: too few RSS samples"); sys.exit(0)
mt = sum(t for t, _ in tail) / n
mr = sum(m for _, m in tail) / n
slope = sum((t - mt) * (m - mr) for t, m in tail) / sum((t - mt) ** 2 for t, _ in tail)
depths = [p["queue_depth"] for p in r["intervals"] if p.get("queue_depth") is not None]
print(f"soak: max {sys.argv[2]} req/s closed loop; offered {sys.argv[3]} req/s for "
      f"{len(pts)} s: served {r.get('events_per_s')} events/s, p99 {r.get('p99_ms')} ms, "
      f"non-2xx {r.get('non2xx')}, errors {r.get('errors')}")
print(f"    RSS {tail[0][1]:.1f} MiB at t={tail[0][0]:.0f} s -> {tail[-1][1]:.1f} MiB at t={tail[-1][0]:.0f} s, "
      f"peak {max(m for _, m in pts):.1f} MiB; slope {slope * 60:+.3f} MiB/min over the last two thirds; "
      f"queue depth max {max(depths) if depths else '?'}")
# Every event is a new key, kept idempotency_ttl_hours (24 h): RSS grows
# with the key window by design; per million keys, that is the figure to
# hold against the budget (64 MiB + 16 B a key), a leak would show beyond it.
served = float(r.get("events_per_s") or 0)
if served > 0:
    print(f"    = {slope / served * 1e6:.1f} MiB per million new keys in the window "
          f"({slope / served * 1024 * 1024:.0f} B a key)")
PY
        ;;
    *)
        echo "unknown step $step" >&2
        exit 2 ;;
    esac
done

echo
echo "== summary ($summary)"
cat "$summary"
! grep -q FAILED "$summary"
