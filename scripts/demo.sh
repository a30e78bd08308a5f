#!/usr/bin/env bash
# One command on a fresh clone (with ../shared beside it): set up .venv, then run the main job,
# the offline quickstart recipe, which writes runs/quickstart/report.md.
#
#   scripts/demo.sh                          # or: make demo
#   scripts/demo.sh --force                  # extra arguments go to `normswap recipe run`
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
[ -d "$NORMSWAP_ASSETS" ] || { echo "error: no shared assets at $NORMSWAP_ASSETS (put shared/ beside the checkout or set NORMSWAP_ASSETS)" >&2; exit 2; }
normswap recipe run recipes/quickstart.yaml "$@"
echo "demo: report in runs/quickstart/report.md" >&2
