#!/usr/bin/env bash
# Stop the daemons scripts/slurm/start.sh started, by the pid files in $PTM_SLURM_STATE
# (default /tmp/ptm-mamba-slurm). A munged that was already running before start.sh has no
# pid file there and is left alone. Leaves /etc/slurm/slurm.conf and the logs in place.
set -euo pipefail

STATE=${PTM_SLURM_STATE:-/tmp/ptm-mamba-slurm}

stop_one() { # stop_one PIDFILE NAME
    local pidfile=$1 name=$2 pid
    if [ ! -s "$pidfile" ]; then
        echo "stop.sh: $name: no pid file ($pidfile)"
        return 0
    fi
    pid=$(cat "$pidfile")
    # Guard against a recycled pid: only signal a process with the expected name.
    if [ ! -d "/proc/$pid" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$name" ]; then
        echo "stop.sh: $name: pid $pid not running"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 100); do
        [ -d "/proc/$pid" ] || break
        sleep 0.1
    done
    if [ -d "/proc/$pid" ]; then
        echo "stop.sh: $name: pid $pid ignored SIGTERM for 10 s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    echo "stop.sh: stopped $name (pid $pid)"
}

# Reverse start order: compute node, controller, then authentication.
stop_one "$STATE/slurmd.pid" slurmd
stop_one "$STATE/slurmctld.pid" slurmctld
stop_one "$STATE/munge/munged.pid" munged
