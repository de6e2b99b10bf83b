#!/usr/bin/env bash
# Install MMseqs2 (the `mmseqs` binary that dataset.split_by: cluster needs) from Debian.
# Idempotent: does nothing when mmseqs is already on PATH. Needs root (apt-get).
# Elsewhere: conda install -c bioconda mmseqs2 (environment.yml lists it).
set -euo pipefail
exec bash "$(dirname "$0")/apt_install.sh" mmseqs mmseqs2
