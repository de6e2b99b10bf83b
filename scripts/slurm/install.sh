#!/usr/bin/env bash
# Install a single-node SLURM (slurmctld + slurmd + client tools) and munge from Debian.
# Idempotent: does nothing when every binary is already on PATH. Needs root (apt-get).
# No slurmdbd/mariadb: the local cluster runs without accounting (sacct does not work;
# the Snakemake profiles query job status with squeue instead).
set -euo pipefail

need=(slurmctld slurmd sinfo squeue sbatch srun scontrol munged)
missing=0
for bin in "${need[@]}"; do
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
        missing=1
    fi
done
if [ "$missing" -eq 0 ]; then
    echo "slurm already installed: $(dpkg-query -W -f='${Version}' slurmctld 2>/dev/null || echo unknown)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: needs root to apt-get install slurm (run with sudo)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
echo "slurm installed: $(dpkg-query -W -f='${Version}' slurmctld)"
