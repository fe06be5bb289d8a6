#!/usr/bin/env bash
# systemd-test.sh INLETD_DEB — inletd's .deb under a real, booted systemd.
#
# Boots a minimal Debian bookworm (debootstrap --variant=minbase) as a
# systemd-nspawn container on this machine (root; PID 1 need not be systemd:
# cgroup v1 + name=systemd + unified hybrid works), installs the .deb with
# apt inside it, and checks what only a live systemd can show:
#
#   1. install with the README's `sudo apt install ./target/debian/inletd_*.deb`
#      (as root, no sudo): the postinst enables and starts inletd.service;
#   2. notify: `systemctl restart` returns only once READY=1 came, and
#      /health answers at once;
#   3. reload: the README's `sudo systemctl reload inletd` applies a good
#      config (a new source
#      answers); with a bad config it fails (the unit's ExecReload runs
#      check-config first), a bare SIGHUP is refused by inletd, and the old
#      config stays in force (same MainPID, the new source still answers);
#   4. kill -9 of MainPID: Restart=on-failure brings it back;
#   5. SIGSTOP of MainPID: WatchdogSec fires (SIGABRT) and it is restarted;
#   6. `systemctl stop` under load, with a slow HTTP sink so that a backlog
#      has to be drained: exits 0 within TimeoutStopSec, and after a start
#      every event answered 202 is processed (ids checked in a file sink and
#      in what the HTTP sink received).
#
# Exits non-zero with "systemd-test: FAILED: <reason>" on the first failed
# check, including when the container cannot boot (with nspawn's log).
# Always tears the container down and leaves no mount behind.
#
# The README's "Packages and systemd" lines run here are read out of the
# README (scripts/readme-commands.sh) and run as written but for `sudo`
# (root in the container has no need of it, and minbase has none);
# scripts/package-test.sh runs the others. `systemd-test.sh --readme-plan`
# prints the lines this script runs and exits (tests/readme.rs checks that
# every line of that block is run by one of the two).
#
# Environment:
#   MIRROR        Debian mirror (default: the first deb.debian.org-style URI
#                 in this host's apt sources, else http://deb.debian.org/debian)
#   ROOTFS_CACHE  a .tar of a previous debootstrap to reuse (written when
#                 missing); saves ~40 s
#   CGROUP_MODE   hybrid (default: what the host has) or unified (the
#                 container gets a pure cgroup v2 tree)
#   SINK_DELAY    seconds the HTTP sink takes per batch (default 0.1)
#   LOAD_SECS     seconds of load before `systemctl stop` (default 5)
#   KEEP=1        keep the work directory (rootfs, logs) for inspection
set -euo pipefail

# The README lines this script runs, each by a pattern.
readme_claims=('sudo apt install *' 'sudo systemctl reload *')
readme_command() { # readme_command PATTERN -> the one README line it matches
    local line found=()
    while IFS= read -r line; do
        # shellcheck disable=SC2053 # $1 is a pattern
        [[ $line == $1 ]] && found+=("$line")
    done < <(bash "$(dirname "$0")/readme-commands.sh" "Packages and systemd")
    [ "${#found[@]}" = 1 ] || {
        echo "systemd-test: FAILED: the README's \"Packages and systemd\" block has ${#found[@]} lines like '$1', not 1" >&2
        exit 1
    }
    printf '%s\n' "${found[0]}"
}
if [ "${1:-}" = --readme-plan ]; then
    for pattern in "${readme_claims[@]}"; do readme_command "$pattern"; done
    exit 0
fi
install=$(readme_command 'sudo apt install *')
reload=$(readme_command 'sudo systemctl reload *')

deb=${1:?usage: systemd-test.sh path/to/inletd_VERSION_ARCH.deb}
deb=$(readlink -f "$deb")
started=$(date +%s)
machine=inletd-test-$$
work=$(mktemp -d /tmp/inletd-systemd-test.XXXXXX)
root=$work/root
bootlog=$work/nspawn.log
ns_pid=
leader=
sink_pid=
load_pid=
# nspawn starts in our cgroups and (without a host systemd) splits them into
# supervisor/ and payload/, which it leaves behind, empty.
cg_v1=$(sed -n 's/^[0-9]*:name=systemd://p' /proc/self/cgroup)
cg_v2=$(sed -n 's/^0:://p' /proc/self/cgroup)
export DEBIAN_FRONTEND=noninteractive

step() { echo "== $*"; }
ok() { echo "   ok: $*"; }
fail() {
    echo "systemd-test: FAILED: $*" >&2
    if [ -n "$leader" ] && kill -0 "$leader" 2>/dev/null; then
        echo "---- journal of inletd.service (last 25 lines) ----" >&2
        in_ct journalctl -u inletd --no-pager -n 25 -o short 2>/dev/null | cut -c1-300 >&2 || true
    fi
    exit 1
}
check() { # check DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Inside the container: all its namespaces, its binaries.
in_ct() { nsenter -t "$leader" -a "$@"; }
# The host's binaries (curl, python3) in the container's network namespace.
in_net() { nsenter -t "$leader" -n "$@"; }
prop() { in_ct systemctl show -P "$1" inletd; }

teardown() {
    local rc=$?
    set +e
    # The host processes started in the container's network namespace.
    for p in $load_pid $sink_pid; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    if [ -n "$ns_pid" ] && kill -0 "$ns_pid" 2>/dev/null; then
        kill -TERM "$ns_pid" # nspawn halts the container cleanly
        for _ in $(seq 1 50); do kill -0 "$ns_pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$ns_pid" 2>/dev/null && kill -KILL "$ns_pid"
        wait "$ns_pid" 2>/dev/null
    fi
    local h d
    for h in "/sys/fs/cgroup/systemd${cg_v1%/}" "/sys/fs/cgroup/unified${cg_v2%/}" "/sys/fs/cgroup${cg_v2%/}"; do
        for d in payload/init.scope payload supervisor; do
            [ -d "$h/$d" ] && rmdir "$h/$d" 2>/dev/null
        done
    done
    rmdir "/run/systemd/nspawn/propagate/$machine" 2>/dev/null
    if findmnt -rn -o TARGET | grep -q "^$work"; then
        findmnt -rn -o TARGET | grep "^$work" | sort -r | xargs -r -n1 umount -l
    fi
    if [ "${KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then
        echo "   (work directory kept: $work)" >&2
        [ "${KEEP:-0}" = 1 ] || rm -rf "$root" # the logs are enough on failure
    else
        rm -rf "$work"
    fi
}
trap teardown EXIT
trap 'echo "systemd-test: FAILED: line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR

step "preflight"
[ "$(id -u)" = 0 ] || fail "run as root (debootstrap, systemd-nspawn)"
[ -f "$deb" ] || fail "no such .deb: $deb"
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
        fail "apt-get install ${need[*]}"
fi
[ -d /sys/fs/cgroup/systemd ] || [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] ||
    fail "no name=systemd cgroup hierarchy and no cgroup2 at /sys/fs/cgroup: systemd cannot run in a container here"
ok "root, debootstrap, systemd-nspawn ($(systemd-nspawn --version | head -n1)), curl, python3"

if [ -z "${MIRROR:-}" ]; then
    MIRROR=$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
        grep -v security | head -n1 | tr -d ' ' || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

step "root file system (bookworm minbase + systemd)"
t=$(now)
if [ -n "${ROOTFS_CACHE:-}" ] && [ -s "$ROOTFS_CACHE" ]; then
    mkdir -p "$root"
    tar -C "$root" -xf "$ROOTFS_CACHE" || fail "unpacking $ROOTFS_CACHE"
    ok "unpacked $ROOTFS_CACHE in $(since "$t") s"
else
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps,adduser \
        bookworm "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 || {
        tail -n 20 "$work/debootstrap.log" >&2
        fail "debootstrap from $MIRROR (log: $work/debootstrap.log)"
    }
    ok "debootstrap from $MIRROR in $(since "$t") s"
    if [ -n "${ROOTFS_CACHE:-}" ]; then
        tar -C "$root" -cf "$ROOTFS_CACHE" . && ok "saved as $ROOTFS_CACHE"
    fi
fi
# Where the README's install line finds it, from /root.
mkdir -p "$root/root/target/debian"
cp "$deb" "$root/root/target/debian/"

step "boot the container (systemd-nspawn -b)"
# --keep-unit: without a systemd on the host, nspawn would otherwise ask the
#   system bus for a scope and stop at "Failed to open system bus".
# --register=no: no systemd-machined here.
# --private-network: the container's 127.0.0.1:5015 is its own.
# --console=read-only: the boot messages go to $bootlog (stdin is no tty).
nspawn_env=()
case ${CGROUP_MODE:-hybrid} in
hybrid) ;;
unified) nspawn_env+=(SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1) ;;
*) fail "CGROUP_MODE must be hybrid or unified" ;;
esac
t=$(now)
env "${nspawn_env[@]}" systemd-nspawn -D "$root" -b --machine="$machine" \
    --register=no --keep-unit --private-network --console=read-only \
    >"$bootlog" 2>&1 </dev/null &
ns_pid=$!
state=
for _ in $(seq 1 240); do # 60 s
    if ! kill -0 "$ns_pid" 2>/dev/null; then
        echo "---- systemd-nspawn's output ----" >&2
        sed 's/\x1b\[[0-9;]*m//g' "$bootlog" | tail -n 30 >&2
        ns_pid=
        fail "the container did not boot: systemd-nspawn exited (its output above)"
    fi
    # The container's PID 1 is nspawn's child running systemd (nspawn has
    # another, short-lived child while it sets up: not that one).
    if [ -z "$leader" ]; then
        for p in $(pgrep -P "$ns_pid" || true); do
            [ "$(cat "/proc/$p/comm" 2>/dev/null)" = systemd ] && leader=$p && break
        done
    fi
    if [ -n "$leader" ]; then
        state=$(in_ct systemctl is-system-running 2>/dev/null || true)
        case $state in running | degraded) break ;; esac
    fi
    sleep 0.25
done
case $state in
running) ok "systemd is running as the container's PID 1 (host PID $leader) after $(since "$t") s" ;;
degraded)
    ok "systemd is up after $(since "$t") s, degraded; failed units:"
    in_ct systemctl --failed --no-legend --plain | sed 's/^/      /'
    ;;
*)
    echo "---- systemd-nspawn's output ----" >&2
    sed 's/\x1b\[[0-9;]*m//g' "$bootlog" | tail -n 30 >&2
    if [ -n "$leader" ]; then in_ct systemctl list-jobs --no-pager >&2 2>/dev/null || true; fi
    fail "the container did not finish booting in 60 s (is-system-running: ${state:-no answer})"
    ;;
esac
echo "   cgroups in the container: $(in_ct stat -fc %T /sys/fs/cgroup) at /sys/fs/cgroup (${CGROUP_MODE:-hybrid})"

step "install the .deb: $install (README)"
# Its dependencies (adduser, procps, init-system-helpers, libc6) are in the
# root file system, so apt needs no network, and asks nothing.
in_ct sh -c "cd /root && ${install#sudo }" </dev/null >"$work/apt-install.log" 2>&1 || {
    tail -n 20 "$work/apt-install.log" >&2
    fail "$install in the container"
}
ok "${install#sudo } in /root: $(basename "$deb")"
check "inletd.service is enabled" test "$(in_ct systemctl is-enabled inletd)" = enabled
check "the postinst started it (active)" test "$(in_ct systemctl is-active inletd || true)" = active
check "Type=notify, WatchdogUSec=30s, TimeoutStopUSec=40s" \
    test "$(prop Type) $(prop WatchdogUSec) $(prop TimeoutStopUSec)" = "notify 30s 40s"
base=http://127.0.0.1:5015
post() { # post PATH EVENT_ID -> HTTP status
    in_net curl -sS -o /dev/null -w '%{http_code}' -X POST "$base$1" -H 'Content-Type: application/json' \
        -d "{\"event_id\":\"$2\",\"event_type\":\"systemd_test\",\"user_id\":\"u1\"}" || true
}
journal_since() { in_ct journalctl -u inletd --no-pager -o cat --since "@$1" 2>/dev/null; }
wait_journal() { # wait_journal SINCE_EPOCH PATTERN SECONDS
    for _ in $(seq 1 $(($3 * 5))); do
        journal_since "$1" | grep -q "$2" && return 0
        sleep 0.2
    done
    return 1
}
wait_new_main_pid() { # wait_new_main_pid OLD SECONDS -> prints the new one
    local p
    for _ in $(seq 1 $(($2 * 5))); do
        p=$(prop MainPID)
        if [ "$p" != 0 ] && [ "$p" != "$1" ] && [ "$(in_ct systemctl is-active inletd)" = active ]; then
            echo "$p"
            return 0
        fi
        sleep 0.2
    done
    return 1
}

step "start (Type=notify)"
in_ct systemctl restart inletd || fail "systemctl restart inletd"
# READY=1 comes after the listener is bound: no retry needed.
check "/health answers as soon as systemctl restart returns" in_net curl -fsS -o /dev/null "$base/health"
check "POST /webhook/events answers 202" test "$(post /webhook/events st-1)" = 202

step "systemctl reload"
# A slow HTTP sink (host python3 in the container's network namespace; the
# unit has no PrivateNetwork) that writes the event ids it gets to a file.
cat >"$work/sink.py" <<'EOF'
import http.server, json, sys, threading, time
port, delay, out = int(sys.argv[1]), float(sys.argv[2]), open(sys.argv[3], "a")
lock = threading.Lock()
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        time.sleep(delay)
        with lock:
            out.write("".join("%s\n" % e.get("event_id") for e in body.get("events", [])))
            out.flush()
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()
EOF
nsenter -t "$leader" -n python3 "$work/sink.py" 9000 "${SINK_DELAY:-0.1}" "$work/http-sink.txt" >"$work/sink.log" 2>&1 &
sink_pid=$!
conf=$root/etc/inletd/inletd.toml
cp "$conf" "$work/inletd.toml.packaged"
pid=$(prop MainPID)
check "no source reloadcheck yet (404)" test "$(post /webhook/reloadcheck/events st-2)" = 404
cat >>"$conf" <<'EOF'

[[sources]]
name = "reloadcheck"

[[sinks]]
name = "ids"
type = "file"
path = "/var/lib/inletd/systemd-test.jsonl"

[[sinks]]
name = "slow"
type = "http"
url = "http://127.0.0.1:9000/batch"
EOF
t=$(date +%s)
in_ct sh -c "${reload#sudo }" || fail "$reload (README; good config)"
check "the good config is reloaded (journal: configuration reloaded)" wait_journal "$t" 'configuration reloaded' 10
check "the new source answers 202" test "$(post /webhook/reloadcheck/events st-3)" = 202
check "same MainPID after the reload" test "$(prop MainPID)" = "$pid"
cp "$conf" "$work/inletd.toml.good"
echo 'this line = = is not toml [' >>"$conf"
sleep 1
t=$(date +%s)
# ExecReload checks the file first: `systemctl reload` fails, and no SIGHUP
# is sent.
if in_ct sh -c "${reload#sudo }" 2>"$work/reload-bad.err"; then
    fail "$reload succeeded with a broken config"
fi
ok "systemctl reload fails on the broken config: $(head -c 200 "$work/reload-bad.err" | tr '\n' ' ')"
check "still active, same MainPID" test "$(in_ct systemctl is-active inletd) $(prop MainPID)" = "active $pid"
# A SIGHUP sent some other way is refused by inletd itself.
in_ct kill -HUP "$pid"
check "a bare SIGHUP with the broken file is refused (journal: reload refused)" wait_journal "$t" 'reload refused' 10
check "still active, same MainPID" test "$(in_ct systemctl is-active inletd) $(prop MainPID)" = "active $pid"
check "the old config stays in force (source reloadcheck still answers 202)" \
    test "$(post /webhook/reloadcheck/events st-4)" = 202
cp "$work/inletd.toml.good" "$conf" # a restart would run check-config on it

step "kill -9 of the main process"
pid=$(prop MainPID)
restarts=$(prop NRestarts)
t=$(now)
in_ct kill -KILL "$pid"
new=$(wait_new_main_pid "$pid" 20) || fail "not restarted within 20 s after kill -9 (Restart=on-failure)"
ok "restarted: MainPID $pid -> $new after $(since "$t") s (RestartSec=2)"
check "NRestarts went up" test "$(prop NRestarts)" -gt "$restarts"
check "/health answers" in_net curl -fsS -o /dev/null "$base/health"

step "SIGSTOP: the watchdog"
pid=$new
restarts=$(prop NRestarts)
t=$(now)
te=$(date +%s)
in_ct kill -STOP "$pid"
new=$(wait_new_main_pid "$pid" 50) || fail "no watchdog restart within 50 s of SIGSTOP (WatchdogSec=30)"
ok "restarted: MainPID $pid -> $new after $(since "$t") s"
check "journal: Watchdog timeout" wait_journal "$te" 'Watchdog timeout' 5
check "NRestarts went up" test "$(prop NRestarts)" -gt "$restarts"
check "/health answers" in_net curl -fsS -o /dev/null "$base/health"

step "systemctl stop under load"
cat >"$work/load.py" <<'EOF'
import http.client, json, os, sys, threading, time
port, threads, stopfile, ackfile = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
lock = threading.Lock()
counts = {"sent": 0, "acked": 0}
others = {}
acks = []
def worker(n):
    conn, i, fails = None, 0, 0
    while not os.path.exists(stopfile) and fails <= 50:
        i += 1
        eid = "load-%d-%d" % (n, i)
        body = json.dumps({"event_id": eid, "event_type": "systemd_test_load", "user_id": "u%d" % n})
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/webhook/events", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            with lock:
                counts["sent"] += 1
                if r.status == 202:
                    counts["acked"] += 1
                    acks.append(eid)
                else:
                    others[r.status] = others.get(r.status, 0) + 1
            fails = 0
        except Exception:
            conn, fails = None, fails + 1
            time.sleep(0.1)
ts = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
with open(ackfile, "w") as f:
    f.write("".join(a + "\n" for a in acks))
print("%d requests answered, %d with 202, others: %s" % (counts["sent"], counts["acked"],
      ", ".join("%d x %d" % (n, c) for c, n in sorted(others.items())) or "none"))
EOF
rm -f "$work/load.stop"
nsenter -t "$leader" -n python3 "$work/load.py" 5015 16 "$work/load.stop" "$work/acked.txt" >"$work/load.out" 2>&1 &
load_pid=$!
sleep "${LOAD_SECS:-5}"
echo "   under load: $(in_net curl -fsS "$base/stats/summary" | grep -o '"queue_depth":[0-9]*' || true)"
t=$(now)
te=$(date +%s)
in_ct systemctl stop inletd || fail "systemctl stop inletd returned non-zero"
took=$(since "$t")
touch "$work/load.stop"
wait "$load_pid" || true
ok "systemctl stop took $took s; load: $(cat "$work/load.out")"
check "stopped within TimeoutStopSec=40" awk -v s="$took" 'BEGIN { exit !(s < 40) }'
check "Result=success, main process exit status 0" \
    test "$(prop Result) $(prop ExecMainStatus) $(in_ct systemctl is-active inletd || true)" = "success 0 inactive"
check "journal: drained" wait_journal "$te" 'drained' 5
echo "   $(journal_since "$te" | grep -o '"caught_up":[a-z]*,"remaining":[0-9]*,"took_ms":[0-9]*' | head -n1)"
acked=$(wc -l <"$work/acked.txt")
check "the load got answers (202: $acked)" test "$acked" -gt 0
in_ct systemctl start inletd || fail "systemctl start inletd after the stop"
processed=
for _ in $(seq 1 600); do # 120 s
    n=$(in_net curl -fsS "$base/stats/summary" | grep -o '"systemd_test_load":[0-9]*' | cut -d: -f2 || true)
    if [ -n "$n" ] && [ "$n" -ge "$acked" ]; then
        processed=$n
        break
    fi
    sleep 0.2
done
check "after the start, /stats/summary counts every acknowledged event ($acked; counted: ${n:-none})" test -n "$processed"
sort -u "$work/acked.txt" >"$work/acked.sorted"
missing() { # missing SINK: acknowledged ids that SINK has not received (yet)
    case $1 in
    file) sed -n 's/.*"event_id":"\(load-[0-9]*-[0-9]*\)".*/\1/p' "$root/var/lib/inletd/systemd-test.jsonl" ;;
    http) grep '^load-' "$work/http-sink.txt" ;;
    esac | sort -u | comm -23 "$work/acked.sorted" - | wc -l
}
for _ in $(seq 1 150); do # 30 s: the sinks may trail the count
    [ "$(missing file)" = 0 ] && [ "$(missing http)" = 0 ] && break
    sleep 0.2
done
lost=$(missing file)
check "every acknowledged event id reached the file sink (missing: $lost)" test "$lost" = 0
lost=$(missing http)
check "every acknowledged event id reached the HTTP sink (missing: $lost)" test "$lost" = 0

step "final stop"
in_ct systemctl stop inletd || fail "systemctl stop inletd"
check "inactive, exit status 0" test "$(in_ct systemctl is-active inletd || true) $(prop ExecMainStatus)" = "inactive 0"

echo "systemd-test: all checks passed in $(($(date +%s) - started)) s"
