# ess-agent %postun (as %systemd_postun_with_restart): after an upgrade, restart the agent if it
# runs. The ess-agent user, the journal in /var/lib/ess-agent and the secrets stay on erase, as
# the Fedora packaging guidelines ask.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart ess-agent.service >/dev/null 2>&1 || :
    fi
fi
exit 0
