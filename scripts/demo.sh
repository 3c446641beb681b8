#!/usr/bin/env bash
# The main job on a fresh machine: install, then `mhc demo` (GPU when there is one, else CPU).
# Extra arguments go to `mhc demo` (see `mhc demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
print_versions
python3 -m pip install -q --no-build-isolation --no-deps .
mhc demo "$@"
