#!/usr/bin/env bash
# Install Chromium (Debian's `chromium`), the headless browser that tests/test_report_html.py opens
# the Snakemake report in. Idempotent: does nothing when chromium is already on PATH. Needs root (apt-get).
set -euo pipefail
exec bash "$(dirname "$0")/apt_install.sh" chromium chromium
