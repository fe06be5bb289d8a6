# inletd %preun, as %systemd_preun: on erase (not upgrade) disable and stop.
if [ "$1" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl --no-reload disable --now inletd.service >/dev/null 2>&1 || :
fi
exit 0
