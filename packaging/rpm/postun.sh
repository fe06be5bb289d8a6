# inletd %postun, as %systemd_postun_with_restart: reload units; on upgrade
# restart a running service. On erase /var/lib/inletd and the user stay
# (RPM has no purge): `rm -rf /var/lib/inletd; userdel inletd` removes them.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -ge 1 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl try-restart inletd.service >/dev/null 2>&1 || :
fi
exit 0
