# inletd %pre: the system user and group, before the files that belong to them.
getent group inletd >/dev/null || groupadd -r inletd
getent passwd inletd >/dev/null || \
    useradd -r -g inletd -d /var/lib/inletd -M -s /sbin/nologin \
        -c "inletd webhook intake" inletd
exit 0
