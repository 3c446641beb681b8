"""The direct projection (src/cuda/pre_stream.cu, docs/cuda_notes.md v6 / v6.1) under its switches: pre and post_pre
per call (CUDA-graph replay) and torch.profiler's per-kernel device time (A = project_direct_kernel / project_kernel,
B = coef_aggregate_kernel, whose figure includes its programmatic wait for A), one row per (shape, configuration).
The switches are read at every call, so one process runs them all. Probe rows give wrong results on purpose.

    python bench/python/sweep_direct.py                   # every configuration below
    python bench/python/sweep_direct.py --configs direct fragment --json sweep.json
"""

import argparse
import json
import os
import sys

import torch

import mhc.tools.bench as b

SHAPES = [(4, 4096, 8192), (4, 1024, 16384), (4, 7168, 4096), (2, 4096, 8192)]
# label -> (environment, ops)
CONFIGS = {
    "ring": ({"MHC_CUDA_PRE": "ring"}, ("pre",)),
    "direct": ({}, ("pre", "post_pre")),
    "fragment": ({"MHC_CUDA_DIRECT_LOADS": "fragment"}, ("pre", "post_pre")),
    "prefetch1": ({"MHC_CUDA_DIRECT_PREFETCH": "1"}, ("pre",)),
    "fused": ({"MHC_CUDA_PRE": "direct"}, ("post_pre",)),
    "probe: staging only": ({"MHC_CUDA_DIRECT_PROBE": "8"}, ("pre",)),
    "probe: no mma": ({"MHC_CUDA_DIRECT_PROBE": "2"}, ("pre",)),
    "probe: fragment, no mma": ({"MHC_CUDA_DIRECT_LOADS": "fragment", "MHC_CUDA_DIRECT_PROBE": "2"}, ("pre",)),
    "probe: fused, no stores": ({"MHC_CUDA_PRE": "direct", "MHC_CUDA_DIRECT_PROBE": "16"}, ("post_pre",)),
    "probe: fused, no post math": ({"MHC_CUDA_PRE": "direct", "MHC_CUDA_DIRECT_PROBE": "32"}, ("post_pre",)),
    "probe: fused, no post math, no mma": ({"MHC_CUDA_PRE": "direct", "MHC_CUDA_DIRECT_PROBE": "34"}, ("post_pre",)),
}
SWITCHES = ("MHC_CUDA_PRE", "MHC_CUDA_DIRECT_LOADS", "MHC_CUDA_DIRECT_PREFETCH", "MHC_CUDA_DIRECT_PROBE")


def kernel_us(step, sets: int) -> dict:
    """Device us per call of each kernel step(i) launches (mhc.tools.bench.kernel_times), by short name."""
    out = {}
    for t, _, key in b.kernel_times(step, sets, reps=10):
        name = key.split("<")[0].split("::")[-1]
        out[name] = round(out.get(name, 0.0) + t, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    saved = {k: os.environ.get(k) for k in SWITCHES}
    b.copy_bandwidth()  # clocks up before anything is timed
    rows = []
    print("| n, C, tokens | configuration | op | us per call | kernels, device us per call |")
    print("|---|---|---|---|---|")
    try:
        for n, C, T in SHAPES:
            sets = max(1, min(32, -(-4 * torch.cuda.get_device_properties(0).L2_cache_size // (T * n * C * 2))))
            steps = b.make_steps("mhc", n, C, T, sets, {}, with_backward=False)
            for label in args.configs:
                env, ops = CONFIGS[label]
                for k in SWITCHES:
                    os.environ.pop(k, None)
                os.environ.update(env)
                for op in ops:
                    row = dict(n=n, C=C, T=T, config=label, op=op, us=round(b.time_graph(steps[op], sets), 1),
                               kernels=kernel_us(steps[op], sets))
                    rows.append(row)
                    kernels = ", ".join(f"{k} {v}" for k, v in row["kernels"].items())
                    print(f"| {n}, {C}, {T} | {label} | {op} | {row['us']} | {kernels} |", flush=True)
            del steps
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
