#!/usr/bin/env bash
# One command on a fresh clone (with ../shared beside it): set up .venv, then run the fast test
# suite (what CI runs). Arguments go to pytest:
#
#   scripts/test.sh                          # or: make test
#   scripts/test.sh tests/test_progress.py -x
#   scripts/test.sh -m slow                  # the long measurements
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
python -m pytest -q "$@"
