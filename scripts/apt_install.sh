#!/usr/bin/env bash
# Install Debian packages unless the programs they provide are already there (idempotent).
#   bash scripts/apt_install.sh "prog1 prog2 ..." package1 package2 ...
# A program counts as there when it is on PATH or in /usr/sbin. Needs root (apt-get).
set -euo pipefail
programs=$1
shift
missing=0
for bin in $programs; do
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
        missing=1
    fi
done
if [ "$missing" -eq 0 ]; then
    echo "already installed: $*"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "$(basename "$0"): needs root to apt-get install $* (run with sudo)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "$@" >/dev/null
echo "installed: $*"
