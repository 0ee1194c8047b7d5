# ess-agent %pre: the system user and group, before the files owned by the group are unpacked.
getent group ess-agent >/dev/null || groupadd --system ess-agent
getent passwd ess-agent >/dev/null || useradd --system --gid ess-agent \
    --home-dir /var/lib/ess-agent --no-create-home --shell /usr/sbin/nologin ess-agent
exit 0
