# Sourced by the set-up scripts after scripts/setup.sh: puts the CMake and Ninja that setup.sh installed with
# pip ahead of any older system copy (Debian 12's /usr/bin/cmake is 3.25; pyenv-style shims may not list
# freshly installed console scripts), then prints the tool versions the run uses.
tool_dirs=$(python3 - <<'PY'
import os
dirs = []
try:
    import cmake
    dirs.append(cmake.CMAKE_BIN_DIR)
except (ImportError, AttributeError):
    pass
try:
    import ninja
    dirs.append(ninja.BIN_DIR)
except (ImportError, AttributeError):
    pass
print(os.pathsep.join(d for d in dirs if os.path.isdir(d)))
PY
)
if [[ -n $tool_dirs ]]; then export PATH="$tool_dirs:$PATH"; fi
unset tool_dirs

print_versions() {
  echo "mhc set-up: $(cmake --version | head -n 1) ($(command -v cmake))"
  echo "mhc set-up: ninja $(ninja --version) ($(command -v ninja))"
  echo "mhc set-up: c++ $(c++ --version | head -n 1)"
  if command -v nvcc >/dev/null 2>&1; then echo "mhc set-up: nvcc $(nvcc --version | tail -n 1)"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then echo "mhc set-up: nvcc $(/usr/local/cuda/bin/nvcc --version | tail -n 1)"
  else echo "mhc set-up: nvcc not found (CPU-only build)"; fi
  echo "mhc set-up: python $(python3 -c 'import sys; print(sys.version.split()[0])'), torch $(python3 -c 'import torch; print(torch.__version__)')"
}
