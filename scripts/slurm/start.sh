#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (munged + slurmctld + slurmd, no accounting).
#
#   sudo scripts/slurm/install.sh            # once: apt packages
#   PART=$(sudo scripts/slurm/start.sh)      # prints the partition name (only that) on stdout
#   ... snakemake --profile tests/slurm_profile ...
#   sudo scripts/slurm/stop.sh
#
# Writes /etc/slurm/slurm.conf (the SLURM jobstep plugin drops SLURM_CONF, so the default path
# is the only one every command sees), creates the munge key if missing, starts the daemons
# with pid files and logs under $PTM_SLURM_STATE, and waits until the node is idle.
# Re-running while the cluster is up with the same config only waits and prints the partition.
#
# Environment (all optional):
#   PTM_SLURM_STATE      state/log/pid folder            [/tmp/ptm-mamba-slurm]
#   PTM_SLURM_PARTITION  partition name                  [local]
#   PTM_SLURM_TIMEOUT    seconds to wait for idle node   [60]
#   PTM_SLURM_MEM_MARGIN MB of RAM kept from SLURM       [max(512, 10% of total)]
#   PTM_SLURM_CTLD_PORT / PTM_SLURM_SLURMD_PORT          [6817 / 6818]
#   PTM_SLURM_FORCE=1    overwrite an /etc/slurm/slurm.conf this script did not write
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${PTM_SLURM_STATE:-/tmp/ptm-mamba-slurm}
PARTITION=${PTM_SLURM_PARTITION:-local}
TIMEOUT=${PTM_SLURM_TIMEOUT:-60}
CTLD_PORT=${PTM_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${PTM_SLURM_SLURMD_PORT:-6818}
CONF=/etc/slurm/slurm.conf
MARKER="# Written by scripts/slurm/start.sh"
MUNGE_SOCKET=/run/munge/munge.socket.2

log() { echo "start.sh: $*" >&2; }
die() { echo "start.sh: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (writes $CONF, starts daemons)"
for bin in munged slurmctld slurmd sinfo scontrol; do
    command -v "$bin" >/dev/null 2>&1 || die "'$bin' not found; run scripts/slurm/install.sh first"
done

# A pid file names a live process of the expected program.
alive() { # alive PIDFILE NAME
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# --- config -----------------------------------------------------------------------------
HOST=$(hostname -s)
CPUS=$(nproc)
TOTAL_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
MARGIN=${PTM_SLURM_MEM_MARGIN:-$(( TOTAL_MB / 10 > 512 ? TOTAL_MB / 10 : 512 ))}
REAL_MEM=$(( TOTAL_MB - MARGIN ))
[ "$REAL_MEM" -gt 256 ] || die "only ${TOTAL_MB} MB RAM; RealMemory would be ${REAL_MEM} MB"
DEF_MEM=$(( REAL_MEM / CPUS < 1000 ? REAL_MEM / CPUS : 1000 ))

NEW_CONF=$(mktemp)
trap 'rm -f "$NEW_CONF"' EXIT
{
    echo "$MARKER (state: $STATE)"
    sed -e "s|@HOST@|$HOST|g" -e "s|@STATE@|$STATE|g" -e "s|@PARTITION@|$PARTITION|g" \
        -e "s|@CPUS@|$CPUS|g" -e "s|@REAL_MEM@|$REAL_MEM|g" -e "s|@DEF_MEM_PER_CPU@|$DEF_MEM|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        "$HERE/slurm.conf.in"
} > "$NEW_CONF"

if [ -f "$CONF" ] && ! head -n1 "$CONF" | grep -qF "$MARKER" && [ "${PTM_SLURM_FORCE:-0}" != 1 ]; then
    die "$CONF exists and was not written by this script; set PTM_SLURM_FORCE=1 to overwrite it"
fi

running=0
if alive "$STATE/slurmctld.pid" slurmctld && alive "$STATE/slurmd.pid" slurmd; then
    running=1
fi
if [ "$running" -eq 1 ] && cmp -s "$NEW_CONF" "$CONF"; then
    log "cluster already running with the same config"
else
    if [ "$running" -eq 1 ] || alive "$STATE/slurmctld.pid" slurmctld || alive "$STATE/slurmd.pid" slurmd; then
        log "config changed or cluster half up: restarting"
        "$HERE/stop.sh" >&2
    fi
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/slurmd" "$STATE/log"
    chmod 755 "$STATE"
    install -m 644 "$NEW_CONF" "$CONF.tmp" && mv -f "$CONF.tmp" "$CONF"
    log "wrote $CONF (node $HOST: CPUs=$CPUS RealMemory=${REAL_MEM}MB DefMemPerCPU=${DEF_MEM}MB)"

    # --- munge -----------------------------------------------------------------------------
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        log "created /etc/munge/munge.key"
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    if munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
        log "munged already answering on $MUNGE_SOCKET"
    else
        # munged runs as user munge and refuses log/pid/seed folders it does not own.
        mkdir -p /run/munge "$STATE/munge"
        chown munge:munge /run/munge "$STATE/munge"
        chmod 755 /run/munge
        chmod 700 "$STATE/munge"
        runuser -u munge -- munged --socket="$MUNGE_SOCKET" \
            --log-file="$STATE/munge/munged.log" --pid-file="$STATE/munge/munged.pid" \
            --seed-file="$STATE/munge/munged.seed" \
            || die "munged failed to start; see $STATE/munge/munged.log"
        for _ in $(seq 50); do
            munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && break
            sleep 0.1
        done
        munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null \
            || die "munge credential round trip failed; see $STATE/munge/munged.log"
        log "started munged (pid $(cat "$STATE/munge/munged.pid"))"
    fi

    # --- slurm -----------------------------------------------------------------------------
    # -c: start from a clean controller state (old jobs of a throwaway cluster do not matter).
    slurmctld -c || die "slurmctld failed to start; see $STATE/log/slurmctld.log"
    for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
    scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer; see $STATE/log/slurmctld.log"
    log "started slurmctld (pid $(cat "$STATE/slurmctld.pid"))"
    slurmd -N "$HOST" || die "slurmd failed to start; see $STATE/log/slurmd.log"
    for _ in $(seq 50); do [ -s "$STATE/slurmd.pid" ] && break; sleep 0.1; done
    log "started slurmd (pid $(cat "$STATE/slurmd.pid" 2>/dev/null || echo '?'))"
fi

# --- wait until the node takes jobs --------------------------------------------------------
deadline=$(( $(date +%s) + TIMEOUT ))
state=""
while :; do
    state=$(sinfo -h -N -n "$HOST" -p "$PARTITION" -o '%t' 2>/dev/null | head -n1 || true)
    case "$state" in
        idle|mix|alloc) break ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        {
            echo "start.sh: ERROR: node $HOST in partition $PARTITION is '${state:-unknown}' after ${TIMEOUT}s, not idle"
            sinfo -R 2>&1 || true
            echo "--- tail $STATE/log/slurmctld.log"; tail -n 20 "$STATE/log/slurmctld.log" 2>&1 || true
            echo "--- tail $STATE/log/slurmd.log"; tail -n 20 "$STATE/log/slurmd.log" 2>&1 || true
        } >&2
        exit 1
    fi
    sleep 0.5
done
log "node $HOST is $state in partition $PARTITION"
echo "$PARTITION"
