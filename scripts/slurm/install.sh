#!/usr/bin/env bash
# Install a single-node SLURM (slurmctld + slurmd + client tools) and munge from Debian.
# Idempotent: does nothing when every binary is already on PATH. Needs root (apt-get).
# No slurmdbd/mariadb: the local cluster runs without accounting (sacct does not work;
# the Snakemake profiles query job status with squeue instead).
set -euo pipefail

exec bash "$(dirname "$0")/../apt_install.sh" "slurmctld slurmd sinfo squeue sbatch srun scontrol munged" \
    slurmctld slurmd slurm-client munge
