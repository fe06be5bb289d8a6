#!/usr/bin/env bash
# The packages, tested the way an operator meets them, as far as a machine
# without a running systemd allows (CI: root, no systemd as PID 1):
#
#   1. build the .deb and .rpm (the README's `bash packaging/build.sh`);
#   2. `dpkg -i`: the system user, the files, the conffile, the enabled unit;
#      `systemd-analyze verify` on the installed unit when systemd-analyze
#      is there;
#   3. run the installed binary as user inletd with the packaged config (as
#      the unit would: check-config, then run), POST an event, see it
#      processed in /stats/summary, run the README's `curl` and
#      `inletd stats; man inletd` lines, reload with SIGHUP, read the man
#      pages, stop with SIGTERM (a clean drain exits 0);
#   4. `dpkg -r` keeps /var/lib/inletd; `dpkg --purge` removes it and the user;
#   5. the .rpm: `rpm -qlp` lists the same files, `rpm -qp --scripts` has the
#      user creation and the systemd scriptlets.
#
# Installs what it needs (cargo-deb, cargo-generate-rpm, rpm, binutils,
# man-db, curl) unless present. Safe to run again: a leftover install or
# daemon from an earlier run is cleaned up first. Exits non-zero naming the
# first failed check.
#
# The README's "Packages and systemd" lines run here are read out of the
# README (scripts/readme-commands.sh) and run as written; the others, which
# want a booted systemd, are scripts/systemd-test.sh's. `--readme-plan`
# prints the lines this script runs and exits (tests/readme.rs checks that
# every line of that block is run by one of the two).
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
workdir=target/package-test
pidfile=$workdir/daemon.pid
log=$workdir/daemon.log
export DEBIAN_FRONTEND=noninteractive

step() { echo "== $*"; }
ok() { echo "   ok: $*"; }
fail() {
    echo "package-test: FAILED: $*" >&2
    if [ -s "$log" ]; then
        echo "---- daemon log (last 30 lines) ----" >&2
        tail -n 30 "$log" >&2
    fi
    exit 1
}
check() { # check DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}

# The README lines this script runs, each by a pattern.
readme_claims=('bash packaging/build.sh' 'curl *' 'inletd stats; man inletd')
readme_command() { # readme_command PATTERN -> the one README line it matches
    local line found=()
    while IFS= read -r line; do
        # shellcheck disable=SC2053 # $1 is a pattern
        [[ $line == $1 ]] && found+=("$line")
    done < <(bash scripts/readme-commands.sh "Packages and systemd")
    [ "${#found[@]}" = 1 ] ||
        fail "the README's \"Packages and systemd\" block has ${#found[@]} lines like '$1', not 1"
    printf '%s\n' "${found[0]}"
}
if [ "${1:-}" = --readme-plan ]; then
    for pattern in "${readme_claims[@]}"; do readme_command "$pattern"; done
    exit 0
fi

[ "$(id -u)" = 0 ] || fail "run as root (dpkg -i, creating users)"
command -v dpkg >/dev/null || fail "needs a Debian-like system (dpkg)"

# The daemon this script started, if it still runs.
stop_daemon() {
    if [ -s "$pidfile" ]; then
        local pid
        pid=$(cat "$pidfile")
        if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q '^/usr/bin/inletd '; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    fi
}
trap stop_daemon EXIT

step "tools"
apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        apt-get update -qq
        apt_updated=1
    fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
for pair in rpm:rpm strip:binutils man:man-db curl:curl gzip:gzip; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || apt_install "${pair#*:}"
done
# What the .deb depends on (dpkg -i installs no dependencies; apt would).
for pkg in adduser procps; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || apt_install "$pkg"
done
for tool in cargo-deb cargo-generate-rpm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "   cargo install $tool --locked (a few minutes)"
        cargo install "$tool" --locked --quiet
    fi
done
ok "rpm, strip, man, curl, cargo-deb, cargo-generate-rpm"

step "clean up an earlier run"
stop_daemon
if dpkg-query -W -f='${Status}' inletd 2>/dev/null | grep -qv 'not-installed'; then
    dpkg --purge inletd >/dev/null
    ok "purged the inletd package left installed"
fi
rm -rf "$workdir"
mkdir -p "$workdir"

build=$(readme_command 'bash packaging/build.sh')
step "build the packages: $build (README)"
eval "$build" >"$workdir/build.log" 2>&1 || {
    tail -n 40 "$workdir/build.log" >&2
    fail "$build (log: $workdir/build.log)"
}
debs=(target/debian/inletd_*.deb)
rpms=(target/generate-rpm/inletd-*.rpm)
[ "${#debs[@]}" = 1 ] && [ -f "${debs[0]}" ] || fail "expected one .deb, found: ${debs[*]}"
[ "${#rpms[@]}" = 1 ] && [ -f "${rpms[0]}" ] || fail "expected one .rpm, found: ${rpms[*]}"
deb=${debs[0]}
rpmfile=${rpms[0]}
ok "$deb ($(du -h "$deb" | cut -f1)), $rpmfile ($(du -h "$rpmfile" | cut -f1))"

# Files (not directories) the .deb ships, as absolute paths, sorted.
dpkg-deb --fsys-tarfile "$deb" | tar -t | grep -v '/$' | sed 's|^\./|/|' | sort >"$workdir/deb-files"
# lintian: no error, no warning (what is meant is overridden, with the reason,
# in packaging/debian/lintian-overrides).
command -v lintian >/dev/null 2>&1 || apt_install lintian
check "lintian finds no error or warning in the .deb" \
    sh -c "lintian --fail-on error,warning '$deb' >'$workdir/lintian.log' 2>&1 || { cat '$workdir/lintian.log' >&2; false; }"
check "the .deb depends on procps (ExecReload's kill) and adduser (the maintainer scripts)" \
    sh -c "dpkg-deb -f '$deb' Depends | grep -q procps && dpkg-deb -f '$deb' Depends | grep -q adduser"

step "dpkg -i"
dpkg -i "$deb" >"$workdir/dpkg-i.log" 2>&1 || {
    cat "$workdir/dpkg-i.log" >&2
    fail "dpkg -i $deb"
}
check "the package is installed" sh -c "dpkg-query -W -f='\${Status}' inletd | grep -q 'install ok installed'"
check "system user inletd exists" sh -c "getent passwd inletd >/dev/null"
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd inletd)
check "inletd is a system user (uid $uid)" test "$uid" -lt 1000
check "its group is inletd" test "$(getent group "$gid" | cut -d: -f1)" = inletd
check "its home is /var/lib/inletd" test "$home" = /var/lib/inletd
check "it cannot log in ($shell)" sh -c "case '$shell' in */nologin|*/false) true;; *) false;; esac"
for f in /usr/bin/inletd /etc/inletd/inletd.toml /usr/lib/systemd/system/inletd.service \
    /usr/share/man/man1/inletd.1.gz /usr/share/man/man1/inletd-dlq-list.1.gz \
    /usr/share/bash-completion/completions/inletd /usr/share/zsh/vendor-completions/_inletd \
    /usr/share/fish/vendor_completions.d/inletd.fish /usr/share/doc/inletd/copyright; do
    check "$f installed" test -s "$f"
done
check "/usr/bin/inletd is executable" test -x /usr/bin/inletd
check "every file of the .deb is on disk" sh -c "while read -r f; do test -e \"\$f\" || { echo \"missing \$f\" >&2; exit 1; }; done <$workdir/deb-files"
check "the unit is reachable as /lib/systemd/system/inletd.service" test -s /lib/systemd/system/inletd.service
check "the config is root:inletd 0640" test "$(stat -c '%U:%G %a' /etc/inletd/inletd.toml)" = "root:inletd 640"
check "/var/lib/inletd is inletd:inletd 0750" test "$(stat -c '%U:%G %a' /var/lib/inletd)" = "inletd:inletd 750"
check "/etc/inletd/inletd.toml is a registered conffile" \
    sh -c "dpkg-query -W -f='\${Conffiles}' inletd | grep -q '^ */etc/inletd/inletd.toml '"
check "the unit is enabled (multi-user.target.wants)" \
    test -L /etc/systemd/system/multi-user.target.wants/inletd.service
for line in 'Type=notify' 'ExecStartPre=/usr/bin/inletd --config /etc/inletd/inletd.toml check-config --quiet' \
    'ExecReload=/usr/bin/inletd --config /etc/inletd/inletd.toml check-config --quiet' \
    'ExecReload=/usr/bin/kill -HUP $MAINPID' 'User=inletd' 'StateDirectory=inletd' 'KillMode=mixed'; do
    check "unit has $line" grep -qxF "$line" /usr/lib/systemd/system/inletd.service
done
if command -v systemd-analyze >/dev/null 2>&1; then
    if systemd-analyze verify /usr/lib/systemd/system/inletd.service >"$workdir/verify.log" 2>&1; then
        ok "systemd-analyze verify: no complaints"
    else
        cat "$workdir/verify.log" >&2
        fail "systemd-analyze verify /usr/lib/systemd/system/inletd.service"
    fi
    if systemd-analyze security --offline=yes /usr/lib/systemd/system/inletd.service >"$workdir/security.log" 2>&1; then
        ok "systemd-analyze security: $(grep -o 'Overall exposure level.*' "$workdir/security.log" || echo 'see log')"
    else
        echo "   (systemd-analyze security --offline is not supported here)"
    fi
else
    echo "   (no systemd-analyze here: unit not verified)"
fi

step "run the installed binary as user inletd with the packaged config"
as_inletd=(setpriv --reuid=inletd --regid=inletd --init-groups --)
# The packaged config listens on 127.0.0.1:5015; if that port is taken on
# this machine, move it by the environment (which the unit would not need).
port=5015
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    port=$((20000 + RANDOM % 20000))
done
export INLETD_BIND=127.0.0.1:$port
base=http://127.0.0.1:$port
check "check-config passes as inletd (the unit's ExecStartPre)" \
    sh -c "cd / && ${as_inletd[*]} /usr/bin/inletd --config /etc/inletd/inletd.toml check-config >/dev/null 2>&1"
# What the packaged config's comments tell the operator to run after an
# edit: with no --config it checks the installed file, and says so.
check "check-config without --config checks /etc/inletd/inletd.toml and says so" \
    sh -c "cd / && /usr/bin/inletd check-config 2>&1 >/dev/null | grep -qF '(/etc/inletd/inletd.toml)'"
(cd / && exec "${as_inletd[@]}" /usr/bin/inletd --config /etc/inletd/inletd.toml run) >"$log" 2>&1 &
pid=$!
echo "$pid" >"$pidfile"
for _ in $(seq 1 150); do
    curl -fsS "$base/health" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || fail "the daemon exited at start"
    sleep 0.2
done
check "GET /health answers" curl -fsS -o /dev/null "$base/health"
check "it runs as user inletd" test "$(ps -o user= -p "$pid")" = inletd
event_id="pkgtest-$(date +%s%N)"
status=$(curl -sS -o "$workdir/post.json" -w '%{http_code}' -X POST "$base/webhook/events" \
    -H 'Content-Type: application/json' \
    -d "{\"event_id\":\"$event_id\",\"event_type\":\"package_test\",\"user_id\":\"u1\"}")
check "POST /webhook/events answers 202 ($(cat "$workdir/post.json"))" test "$status" = 202
processed=
for _ in $(seq 1 150); do
    if curl -fsS "$base/stats/summary" | grep -q '"package_test":1'; then
        processed=1
        break
    fi
    sleep 0.2
done
check "/stats/summary counts the event: $(curl -fsS "$base/stats/summary")" test -n "$processed"
check "the store is in /var/lib/inletd, owned by inletd" \
    sh -c "test -n \"\$(find /var/lib/inletd -mindepth 1 -user inletd | head -n 1)\""
# The README's lines, as written but for the port when 5015 was taken here.
post=$(readme_command 'curl *')
post=${post//localhost:5015/localhost:$port}
answer=$(eval "$post" 2>"$workdir/post.err") || fail "$post (README): $answer $(cat "$workdir/post.err")"
check "$post (README) is accepted: $answer" grep -q '"status":"accepted"' <<<"$answer"
readme_type=$(sed -n 's/.*"event_type":"\([^"]*\)".*/\1/p' <<<"$post")
processed=
for _ in $(seq 1 150); do
    curl -fsS "$base/stats/summary" | grep -q "\"$readme_type\":1" && processed=1 && break
    sleep 0.2
done
check "/stats/summary counts the README's event ($readme_type)" test -n "$processed"
look=$(readme_command 'inletd stats; man inletd')
check "inletd on PATH is the installed one ($(command -v inletd))" test "$(command -v inletd)" = /usr/bin/inletd
(export MANPAGER=cat MANWIDTH=100 && eval "$look") >"$workdir/look.txt" 2>&1 ||
    fail "$look (README): $(head -n 20 "$workdir/look.txt")"
check "$look (README): the table counts both events" \
    sh -c "grep -q '^package_test *1\$' '$workdir/look.txt' && grep -q '^$readme_type *1\$' '$workdir/look.txt'"
check "$look (README): the man page follows" grep -q 'inletd - Durable webhook intake' "$workdir/look.txt"
/usr/bin/inletd dlq list >"$workdir/dlq.txt" 2>&1 || fail "inletd dlq list: $(cat "$workdir/dlq.txt")"
check "inletd dlq list answers (empty DLQ)" grep -qx 'the DLQ is empty' "$workdir/dlq.txt"
kill -HUP "$pid"
reloaded=
for _ in $(seq 1 50); do
    grep -q 'reloading the configuration' "$log" && reloaded=1 && break
    sleep 0.1
done
check "SIGHUP (systemctl reload) reloads the configuration" test -n "$reloaded"
check "the daemon lives on after the reload" curl -fsS -o /dev/null "$base/health"
check "man inletd renders (DLQ, configuration keys)" \
    sh -c "MANPAGER=cat MANWIDTH=100 man -l /usr/share/man/man1/inletd.1.gz 2>/dev/null | grep -q 'drain_timeout_secs = 25'"
check "man finds inletd-dlq-replay by name" \
    sh -c "MANPAGER=cat man inletd-dlq-replay 2>/dev/null | grep -q 'inletd dlq replay'"
kill -TERM "$pid"
code=0
wait "$pid" || code=$?
rm -f "$pidfile"
check "SIGTERM drains and exits 0 (got $code)" test "$code" = 0
unset INLETD_BIND

step "dpkg -r keeps the data"
dpkg -r inletd >"$workdir/dpkg-r.log" 2>&1 || {
    cat "$workdir/dpkg-r.log" >&2
    fail "dpkg -r inletd"
}
check "/usr/bin/inletd is gone" test ! -e /usr/bin/inletd
check "/var/lib/inletd and its store are kept" sh -c "test -n \"\$(ls -A /var/lib/inletd)\""
check "the conffile is kept" test -f /etc/inletd/inletd.toml
check "the user is kept" sh -c "getent passwd inletd >/dev/null"

step "dpkg --purge removes it"
dpkg --purge inletd >"$workdir/dpkg-purge.log" 2>&1 || {
    cat "$workdir/dpkg-purge.log" >&2
    fail "dpkg --purge inletd"
}
check "/var/lib/inletd is gone" test ! -e /var/lib/inletd
check "/etc/inletd is gone" test ! -e /etc/inletd
check "the user inletd is gone" sh -c "! getent passwd inletd"
check "the group inletd is gone" sh -c "! getent group inletd"
check "the unit's enablement link is gone" test ! -e /etc/systemd/system/multi-user.target.wants/inletd.service

step "the .rpm"
rpm -qlp "$rpmfile" 2>/dev/null | sort >"$workdir/rpm-files"
# The same files, but zsh's directory differs by distribution and Debian
# packages carry a copyright file, a changelog and lintian's overrides.
sed -e 's|/usr/share/zsh/vendor-completions/|/usr/share/zsh/site-functions/|' \
    -e '\|^/usr/share/doc/inletd/copyright$|d' \
    -e '\|^/usr/share/doc/inletd/changelog.Debian.gz$|d' \
    -e '\|^/usr/share/lintian/overrides/inletd$|d' "$workdir/deb-files" | sort >"$workdir/deb-files-as-rpm"
if ! diff -u "$workdir/deb-files-as-rpm" "$workdir/rpm-files"; then
    fail "rpm -qlp lists other files than the .deb (diff above: - deb, + rpm)"
fi
ok "rpm -qlp lists the .deb's $(wc -l <"$workdir/rpm-files") files"
check "rpm: /etc/inletd/inletd.toml is a config file" \
    sh -c "rpm -qp --configfiles '$rpmfile' 2>/dev/null | grep -qx /etc/inletd/inletd.toml"
rpm -qp --scripts "$rpmfile" >"$workdir/rpm-scripts" 2>/dev/null
for want in 'preinstall scriptlet' 'useradd -r -g inletd' 'postinstall scriptlet' \
    'systemctl --no-reload preset inletd.service' 'preuninstall scriptlet' \
    'systemctl --no-reload disable --now inletd.service' 'postuninstall scriptlet' \
    'systemctl try-restart inletd.service'; do
    check "rpm scripts have: $want" grep -qF "$want" "$workdir/rpm-scripts"
done

echo "package-test: all checks passed in $(($(date +%s) - started)) s"
