# inletd %post: the data directory, then what %systemd_post does: on the
# first install, enable the unit if the distribution's preset policy says
# so (Fedora/RHEL do not start new services; `systemctl enable --now
# inletd` does).
install -d -o inletd -g inletd -m 0750 /var/lib/inletd
# The config may hold admin_token and source secrets.
chown root:inletd /etc/inletd
chmod 0750 /etc/inletd
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload preset inletd.service >/dev/null 2>&1 || :
fi
exit 0
