#!/usr/bin/env bash
# Installs what mhc needs on a fresh Debian machine that has only what its image ships:
#  - apt-get: C++ compiler, GoogleTest/GMock, Google Benchmark, Python headers, git;
#  - pip: CMake (the CUDA 20 dialect with nvcc 12/13 needs CMake >= 3.26; Debian 12 ships 3.25), Ninja,
#    the tested torch, the Python build tools (the package is built without isolation) and the test extras.
# Safe to re-run: apt-get and pip skip what is already there. Versions come from pyproject.toml's ranges.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(build-essential git libgtest-dev libgmock-dev libbenchmark-dev python3-dev)
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# One source of truth for versions: the build tools, the tested torch range and the test extras are read
# from pyproject.toml.
python3 -c 'import tomllib' 2>/dev/null || python3 -m pip install -q --disable-pip-version-check tomli
mapfile -t py_packages < <(python3 - <<'PY'
try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    data = tomllib.load(f)
reqs = (data["build-system"]["requires"] + data["tool"]["mhc"]["build-tools"] + data["project"]["dependencies"]
        + data["project"]["optional-dependencies"]["test"])
print("\n".join(dict.fromkeys(reqs)))
PY
)
python3 -m pip install -q --disable-pip-version-check "${py_packages[@]}"
