#!/usr/bin/env bash
# Profiling companion of gpu_check.sh (run it after a build stage): cluster-size and Sinkhorn
# variants of the fused pre, then Nsight Compute warp-stall hot spots of the default pre projection
# (project_direct_kernel) and the pre backward's stage C (grad_x_fn_v4). Writes $OUT/variants.txt, $OUT/ncu_pre.txt, $OUT/ncu_bwd.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/python:$PWD/bench/python PYTHONUNBUFFERED=1
B="python3 bench/python/bench_ops.py"
{
  for cl in 2 4 8 16; do
    echo "{\"format\":\"mhc-tuning\",\"version\":1,\"entries\":[{\"op\":\"pre_forward\",\"params\":{\"cluster\":$cl}}]}" >/tmp/t$cl.json
    echo "cluster $cl"
    MHC_TUNING_FILE=/tmp/t$cl.json timeout 60 $B --n 4 --C 1024 4096 --tokens 1 16384 --ops pre --no-eager --compile none | grep "| pre"
  done
  echo "variants (us per call): tokens, variant"
  timeout 90 python3 - <<'PY'
import torch
import mhc.tools.bench as b
from mhc import ops
for T in (1, 16384):
    x = torch.randn(T, 4, 1024, device="cuda", dtype=torch.bfloat16)
    fn = torch.randn(24, 4096, device="cuda") / 64
    base, sc = torch.randn(24, device="cuda"), torch.ones(3, device="cuda")
    for name, f in [("full", lambda i: ops.mhc_pre(x, fn, base, sc)),
                    ("iters=1", lambda i: ops.mhc_pre(x, fn, base, sc, iters=1)),
                    ("static", lambda i: ops.mhc_pre(x, None, base, None)),
                    ("static iters=1", lambda i: ops.mhc_pre(x, None, base, None, iters=1))]:
        print(T, name, round(b.time_graph(f, 1), 1))
PY
} >"$OUT/variants.txt" 2>&1
cat "$OUT/variants.txt"

# ncu_hot NAME KERNEL_REGEX SECTIONS... -- RUN_ONCE_ARGS...
ncu_hot() {
  local name=$1 regex=$2
  shift 2
  local sections=()
  while [[ $1 != -- ]]; do sections+=(--section "$1"); shift; done
  shift
  ncu --clock-control none --kernel-name "regex:$regex" --launch-skip 2 --launch-count 1 "${sections[@]}" \
    -o "/tmp/$name" -f $B --run-once "$@" >"/tmp/$name.log" 2>&1 || tail -5 "/tmp/$name.log"
  ncu -i "/tmp/$name.ncu-rep" --page details >"$OUT/ncu_$name.txt" 2>&1
  ncu -i "/tmp/$name.ncu-rep" --page source --csv --print-source sass >"/tmp/${name}_src.csv" 2>&1
  $B --ncu-hotspots "/tmp/${name}_src.csv" >>"$OUT/ncu_$name.txt" 2>&1
}
# the default kernels: the pre's direct projection, and the pre backward's stage C (v4)
ncu_hot pre project_direct WarpStateStats SchedulerStats Occupancy LaunchStats SourceCounters -- 4 4096 8192 --ops pre
ncu_hot bwd grad_x_fn_v4 WarpStateStats SchedulerStats Occupancy MemoryWorkloadAnalysis SourceCounters -- 4 4096 8192 --ops pre_bwd
for f in pre bwd; do
  echo "==== $f"
  grep -iE "stall|warp cycles per|achieved occupancy|eligible warps|issued warp|duration|throughput" "$OUT/ncu_$f.txt" | head -30
  tail -n 32 "$OUT/ncu_$f.txt"
done
