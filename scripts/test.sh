#!/usr/bin/env bash
# Builds everything and runs every test: the C++ library and its GoogleTest suites (CTest), the
# installed CMake package through the consumer example, then the Python package and its pytest suite.
# GPU tests run when a CUDA device is present and skip cleanly otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
# The set-up's own output goes to a log (shown when it fails), so the tool versions are the first lines.
mkdir -p build
if ! bash scripts/setup.sh >build/setup.log 2>&1; then cat build/setup.log; exit 1; fi
source scripts/env.sh
print_versions

jobs=$(nproc)
build=build/test
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" --output-on-failure -j "$jobs"

# find_package(mhc) from an installed prefix, shown by examples/cpp.
cmake --install "$build" --prefix "$PWD/$build-prefix" >/dev/null
cmake -S examples/cpp -B "$build-example" -G Ninja -DCMAKE_PREFIX_PATH="$PWD/$build-prefix"
cmake --build "$build-example"
"$build-example/mhc_example" --steps 3

python3 -m pip install -q --no-build-isolation --no-deps .
MHC_RUN_SLOW=1 python3 -m pytest -q tests/python
