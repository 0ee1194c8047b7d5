# ess-agent %post: the configuration directories, then (as %systemd_post) systemd learns of the
# unit and the distribution's preset decides whether it is enabled. It is not started: it needs
# its hub secret and routes first.
chgrp ess-agent /etc/ess-agent && chmod 0750 /etc/ess-agent
for dir in /etc/ess-agent/adapters /etc/ess-agent/secrets; do
    [ -d "$dir" ] || install -d -m 0750 -o root -g ess-agent "$dir"
done
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset ess-agent.service >/dev/null 2>&1 || :
fi
exit 0
