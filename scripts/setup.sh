#!/usr/bin/env bash
# Installs what mhc needs on a fresh Debian machine: compilers and test libraries (apt-get),
# PyTorch and the Python build tools (pip). Safe to re-run: it skips what is already there.
set -euo pipefail

apt_packages=(build-essential cmake ninja-build git libgtest-dev libgmock-dev libbenchmark-dev python3-dev)
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch from PyPI; the build tools so the package builds without isolation (no second download).
python3 -m pip install -q "torch>=2.4" numpy tqdm matplotlib pytest "nanobind>=2.0" "scikit-build-core>=0.10" \
  ninja onnx onnxruntime onnxscript transformers
