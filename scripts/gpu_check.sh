#!/usr/bin/env bash
# Full GPU check in one command, for a machine with an NVIDIA GPU (Hopper assumed for the build flags):
# build (sm_90a only, all cores), C++ GPU suite, compute-sanitizer (memcheck + racecheck), Python
# CUDA tests, benchmark. Every stage logs under $OUT (default ./gpu_check_out) and has its own time
# limit, so a slow or failing stage still leaves the others' results; a summary is printed last.
#
#   scripts/gpu_check.sh                         # all stages
#   STAGES=build,test scripts/gpu_check.sh       # a subset: build,test,sanitize,python,bench,history_bench,demo,
#                                                # and, not by default: host, model, tune, sweep
#   MODEL_ARGS="--sizes 4096 --n 4" VISION_ARGS="" STAGES=build,model scripts/gpu_check.sh  # mhc bench --model gpt (+vision)
#   BENCH_ARGS="--quick" scripts/gpu_check.sh    # arguments for bench/python/bench_ops.py
#   TUNE_ARGS="" STAGES=build,tune scripts/gpu_check.sh  # `mhc tune` (default --quick) into $OUT/tuning.json
#   LIMIT_BUILD/LIMIT_TESTS/LIMIT_SANITIZE/LIMIT_PYTHON/LIMIT_BENCH: per-stage time limits in seconds
#   TEST_FILTER/MEMCHECK_FILTER/RACECHECK_FILTER: gtest filters of the GPU suite and the sanitizer runs
#   BUILD_DIR: build tree (default build/device); without the build stage its binaries are used as found
#
# GoogleTest: found by CMake when installed; otherwise built from $GTEST_SRC (default
# build/devdeps/googletest, a copy of /usr/src/googletest carried to machines without it).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
STAGES=${STAGES:-build,test,sanitize,python,bench,history_bench,demo}
JOBS=${JOBS:-$(nproc)}
BUILD=${BUILD_DIR:-$ROOT/build/device}
ARCH=${CUDA_ARCH:-90a-real}
GTEST_SRC=${GTEST_SRC:-$ROOT/build/devdeps/googletest}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
SUMMARY=()
has() { [[ ",$STAGES," == *",$1,"* ]]; }
note() { SUMMARY+=("$1"); echo "== $1"; }

# run_stage NAME LIMIT_SECONDS COMMAND...: logs to $OUT/NAME.log, records pass/fail and duration.
run_stage() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== stage $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$((SECONDS - t0))
  if [[ $rc -eq 0 ]]; then note "$name: ok (${dt}s)"
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then note "$name: TIMED OUT after ${dt}s"
  else note "$name: FAILED rc=$rc (${dt}s)"; fi
  tail -n 25 "$OUT/$name.log"
  return $rc
}

{
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
  nvcc --version 2>&1 | tail -n 2
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
} | tee "$OUT/env.txt"

if has build; then
  build() {
    local gtest_args=()
    if [[ -d $GTEST_SRC && ! -d /usr/include/gtest && ! -d /usr/local/include/gtest ]]; then
      cmake -S "$GTEST_SRC" -B /tmp/gtest-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_GMOCK=OFF \
        -DCMAKE_INSTALL_PREFIX=/tmp/gtest-install -DCMAKE_POSITION_INDEPENDENT_CODE=ON &&
        cmake --build /tmp/gtest-build -j "$JOBS" && cmake --install /tmp/gtest-build || return 1
      gtest_args=(-DGTest_DIR=/tmp/gtest-install/lib/cmake/GTest)
    fi
    local py_on=ON
    $PY -c 'import nanobind, sysconfig, os; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' || py_on=OFF
    echo "Python extension: $py_on"
    cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
      -DMHC_BUILD_TESTS=ON -DMHC_BUILD_BENCH=OFF -DMHC_BUILD_PYTHON=$py_on -DPython_EXECUTABLE="$(command -v $PY)" \
      "${gtest_args[@]}" || return 1
    cmake --build "$BUILD" -j "$JOBS" || return 1
    if [[ $py_on == ON ]]; then cp "$BUILD"/python/_C*.so python/mhc/ || return 1; fi
  }
  export ROOT BUILD ARCH GTEST_SRC PY JOBS
  run_stage build "${LIMIT_BUILD:-300}" bash -c "set -uo pipefail; $(declare -f build); build"
fi

GPU_TESTS=$BUILD/tests/cpp/mhc_gpu_tests
if has test && [[ -x $GPU_TESTS ]]; then
  run_stage gpu_tests "${LIMIT_TESTS:-180}" "$GPU_TESTS" --gtest_color=no --gtest_filter="${TEST_FILTER:-*}"
fi

if has sanitize && [[ -x $GPU_TESTS ]]; then
  # The quick shape set keeps the instrumented run short; every kernel variant still runs.
  export MHC_GPU_TEST_QUICK=1
  run_stage memcheck "${LIMIT_SANITIZE:-240}" compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
    "$GPU_TESTS" --gtest_color=no --gtest_filter="${MEMCHECK_FILTER:-Cuda*}"
  run_stage racecheck "${LIMIT_SANITIZE:-240}" compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 \
    "$GPU_TESTS" --gtest_color=no \
    --gtest_filter="${RACECHECK_FILTER:-CudaPre.*:CudaPreBwdV4.*:CudaPreBackwardSplit.*:CudaPostPre.*:CudaPost.*:CudaSinkhorn.*:CudaResidual*:CudaProjectLogits.*}"
  unset MHC_GPU_TEST_QUICK
fi

if has python; then
  if ls python/mhc/_C*.so >/dev/null 2>&1; then
    # The whole suite: every op, module and history test has CUDA variants that skip without a GPU.
    run_stage python_tests "${LIMIT_PYTHON:-300}" env PYTHONPATH="$ROOT/python" $PY -m pytest -q -p no:cacheprovider \
      -rfE ${PYTEST_ARGS:-tests/python}
  else
    note "python_tests: skipped (no extension built)"
  fi
fi

if has bench; then
  if ls python/mhc/_C*.so >/dev/null 2>&1; then
    run_stage bench "${LIMIT_BENCH:-300}" env PYTHONPATH="$ROOT/python" $PY bench/python/bench_ops.py --json "$OUT/bench.json" \
      ${BENCH_ARGS:-}
  else
    note "bench: skipped (no extension built)"
  fi
fi

if has sweep; then  # not in the default stages: the direct projection's switches (bench/python/sweep_direct.py)
  if ls python/mhc/_C*.so >/dev/null 2>&1; then
    run_stage sweep "${LIMIT_SWEEP:-180}" env PYTHONPATH="$ROOT/python" $PY bench/python/sweep_direct.py \
      --json "$OUT/sweep_direct.json" ${SWEEP_ARGS:-}
  else
    note "sweep: skipped (no extension built)"
  fi
fi

if has history_bench; then
  if ls python/mhc/_C*.so >/dev/null 2>&1; then
    run_stage history_bench "${LIMIT_HISTORY_BENCH:-240}" env PYTHONPATH="$ROOT/python" $PY bench/python/bench_history.py \
      --device cuda --json "$OUT/bench_history.json" ${HISTORY_BENCH_ARGS:-}
  else
    note "history_bench: skipped (no extension built)"
  fi
fi

if has host; then
  if ls python/mhc/_C*.so >/dev/null 2>&1; then
    run_stage host "${LIMIT_HOST:-120}" env PYTHONPATH="$ROOT/python" $PY bench/python/bench_host.py --device cuda \
      --json "$OUT/host.json"
  else
    note "host: skipped (no extension built)"
  fi
fi

if has model; then  # whole training steps against plain residuals (mhc bench --model); MODEL_ARGS picks a part
  if ls python/mhc/_C*.so >/dev/null 2>&1; then
    run_stage model_gpt "${LIMIT_MODEL:-420}" env PYTHONPATH="$ROOT/python" $PY -m mhc.cli bench --model gpt \
      --json "$OUT/model_gpt.json" ${MODEL_ARGS:-}
    if [[ -n ${VISION_ARGS+x} ]]; then
      run_stage model_vision "${LIMIT_VISION:-240}" env PYTHONPATH="$ROOT/python" $PY -m mhc.cli bench \
        --model vision --json "$OUT/model_vision.json" $VISION_ARGS
    fi
  else
    note "model: skipped (no extension built)"
  fi
fi

if has tune; then  # not in the default stages: it writes a tuning file
  if ls python/mhc/_C*.so >/dev/null 2>&1; then
    # The table goes to $OUT/tuning.json; `mhc info` in a new process then shows the library loading it.
    run_stage tune "${LIMIT_TUNE:-300}" env PYTHONPATH="$ROOT/python" MHC_TUNING_FILE="$OUT/tuning.json" bash -c \
      "$PY -m mhc.cli tune ${TUNE_ARGS---quick} --json '$OUT/tune.json' && $PY -m mhc.cli info"
  else
    note "tune: skipped (no extension built)"
  fi
fi

if has demo; then
  if ls python/mhc/_C*.so >/dev/null 2>&1; then
    run_stage demo "${LIMIT_DEMO:-300}" env PYTHONPATH="$ROOT/python" $PY -m mhc.cli demo --device cuda \
      --out "$OUT/demo" ${DEMO_ARGS:-}
  else
    note "demo: skipped (no extension built)"
  fi
fi

echo
echo "================ summary ================"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
if [[ -f $OUT/gpu_tests.log ]]; then grep -E "^\[  (PASSED|FAILED) |tests? ran|FAILED TEST" "$OUT/gpu_tests.log" | tail -n 15; fi
if [[ -f $OUT/python_tests.log ]]; then grep -E "passed|failed" "$OUT/python_tests.log" | tail -n 3; fi
if [[ -f $OUT/bench.log ]]; then echo; tail -n 60 "$OUT/bench.log"; fi
if [[ -f $OUT/tune.log ]]; then echo; tail -n 45 "$OUT/tune.log"; fi
if [[ -f $OUT/sweep.log ]]; then echo; tail -n 60 "$OUT/sweep.log"; fi
if [[ -f $OUT/demo.log ]]; then echo; tail -n 4 "$OUT/demo.log"; fi
if [[ -f $OUT/host.log ]]; then echo; tail -n 12 "$OUT/host.log"; fi
if [[ -f $OUT/model_gpt.log ]]; then echo; tail -n 30 "$OUT/model_gpt.log"; fi
if [[ -f $OUT/model_vision.log ]]; then echo; tail -n 15 "$OUT/model_vision.log"; fi
