# ess-agent %preun (as %systemd_preun): on erase, stop and disable the unit.
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now ess-agent.service >/dev/null 2>&1 || :
fi
exit 0
