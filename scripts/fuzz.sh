#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for MINUTES each (default 5) and
# prints executions and crashes per target. Not part of CI.
#
#   scripts/fuzz.sh [MINUTES]
#
# Environment:
#   FUZZ_TARGETS="event_parser record_decoder"   run only these targets
#   FUZZ_KEEP_GOING=1   libFuzzer fork mode: keep fuzzing after a crash,
#                       timeout or OOM (each one is saved as an artifact)
#   FUZZ_JOBS=N         with FUZZ_KEEP_GOING, parallel fork jobs (default 1)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). cargo-fuzz passes
# nightly-only rustc flags (-Zsanitizer); RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them.
#
# Seeds live in fuzz/seeds/<target>/ (committed); they are copied into
# fuzz/corpus/<target>/ (ignored), where libFuzzer keeps what it finds.
# Crashing inputs land in fuzz/artifacts/<target>/; reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
set -euo pipefail

minutes="${1:-5}"
if ! [[ "$minutes" =~ ^[0-9]+$ ]] || [ "$minutes" -lt 1 ]; then
    echo "usage: $0 [MINUTES]   (a whole number of minutes per target, default 5)" >&2
    exit 2
fi
seconds=$((minutes * 60))

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz="$root/fuzz"
targets="${FUZZ_TARGETS:-event_parser signature_headers record_decoder}"
keep_going="${FUZZ_KEEP_GOING:-0}"
jobs="${FUZZ_JOBS:-1}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
    exit 1
fi

cd "$root"
echo "building fuzz targets (release, debug assertions, AddressSanitizer)..."
cargo fuzz build

logs="$fuzz/fuzz-logs"
mkdir -p "$logs"
summary=()
total_crashes=0

for target in $targets; do
    corpus="$fuzz/corpus/$target"
    artifacts="$fuzz/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    if [ -d "$fuzz/seeds/$target" ]; then
        cp -n "$fuzz/seeds/$target"/* "$corpus"/ 2>/dev/null || true
    fi
    args=(
        "-max_total_time=$seconds"
        "-timeout=10"
        "-rss_limit_mb=2048"
        "-max_len=4096"
        "-print_final_stats=1"
        "-artifact_prefix=$artifacts/"
    )
    if [ -f "$fuzz/dict/$target.dict" ]; then
        args+=("-dict=$fuzz/dict/$target.dict")
    fi
    if [ "$keep_going" = 1 ]; then
        args+=("-fork=$jobs" "-ignore_crashes=1" "-ignore_timeouts=1" "-ignore_ooms=1")
    fi
    log="$logs/$target.log"
    stamp="$logs/$target.start"
    touch "$stamp"
    echo
    echo "== $target: $minutes min ($(ls "$corpus" | wc -l) corpus entries) -> $log"
    start=$(date +%s)
    set +e
    cargo fuzz run "$target" "$corpus" -- "${args[@]}" >"$log" 2>&1
    status=$?
    set -e
    elapsed=$(($(date +%s) - start))

    # Plain mode prints final stats; fork mode prints "#N: ... exec/s: N
    # ..." lines, the last of which holds the totals.
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    if [ -z "$execs" ]; then
        # (its own exec/s there is per job and often 0: divide by its time)
        last=$(grep -E '^#[0-9]+: cov:' "$log" | tail -1)
        execs=$(printf '%s' "$last" | grep -oE '^#[0-9]+' | tr -d '#')
        secs=$(printf '%s' "$last" | grep -oE 'time: [0-9]+' | grep -oE '[0-9]+' || true)
        execs="${execs:-0}"
        secs="${secs:-$elapsed}"
        rate=$((execs / (secs > 0 ? secs : 1)))
    fi
    found=$(find "$artifacts" -type f -newer "$stamp" \
        \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | sort)
    crashes=$(printf '%s' "$found" | grep -c . || true)
    total_crashes=$((total_crashes + crashes))
    line=$(printf '%-18s %4s min  %12s execs  %8s exec/s  %3s crashes  (%ss, exit %s)' \
        "$target" "$minutes" "$execs" "$rate" "$crashes" "$elapsed" "$status")
    summary+=("$line")
    echo "$line"
    if [ "$crashes" -gt 0 ]; then
        printf '   %s\n' $found
        grep -m3 -E 'panicked at|ERROR: (libFuzzer|AddressSanitizer)|SUMMARY' "$log" |
            sed 's/^/   /' || true
    fi
done

echo
echo "== summary (logs in $logs)"
printf '%s\n' "${summary[@]}"
[ "$total_crashes" -eq 0 ]
