"""Work splits of the streaming pre (src/cuda/pre_stream.cu): pre and post_pre timed under tuning tables
that force a tile, run length, group or slice count, one process per table (a process reads its table
once), beside the cluster kernel; then torch.profiler's per-kernel times at the default split.

    python bench/python/sweep_stream.py             # the configurations below
    python bench/python/sweep_stream.py --profile-only
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

LARGE = [(4, 4096, 8192), (4, 2048, 16384), (8, 4096, 4096)]
DECODE = [(4, 4096, 1), (4, 4096, 16), (4, 4096, 64), (4, 7168, 16)]
# (label, params for large shapes, params for decode shapes, extra environment)
CONFIGS = [
    ("default", {}, {}, {}),
    ("cluster", {}, {}, {"MHC_CUDA_PRE": "cluster"}),
    ("tile128 | slices4", {"stream_tile": 128}, {"stream_slices": 4}, {}),
    ("tile16 | slices2", {"stream_tile": 16}, {"stream_slices": 2}, {}),
    ("tile-aligned runs | runs of 8", {"stream_chunks": -1}, {"stream_chunks": 8}, {}),
    ("group 2 | no PDL", {"stream_group": 2}, {}, {"MHC_CUDA_PDL": "0"}),
]

CHILD = r"""
import json, sys, torch
import mhc.tools.bench as b
shapes = json.loads(sys.argv[1])
b.copy_bandwidth()  # half a second of copies: the clocks ramp up before anything is timed
out = {}
for n, C, T in shapes:
    sets = max(1, min(32, -(-4 * torch.cuda.get_device_properties(0).L2_cache_size // (T * n * C * 2))))
    steps = b.make_steps("mhc", n, C, T, sets, {}, with_backward=False)
    out[f"{n},{C},{T}"] = {op: round(b.time_graph(steps[op], sets), 1) for op in ("pre", "post_pre")}
print("RESULT " + json.dumps(out))
"""


def table(entries):
    return json.dumps({"format": "mhc-tuning", "version": 1, "entries": entries})


def run(label, large, decode, env_extra):
    entries = []
    for op in ("pre_forward", "post_pre_forward"):
        for params, shapes in ((large, LARGE), (decode, DECODE)):
            for n, C, T in shapes:
                p = dict(params)
                if p.get("stream_chunks") == -1:  # runs of exactly one tile's chunks
                    p["stream_chunks"] = -(-(n * C) // 128) if op == "pre_forward" else -(-C // (128 // n))
                if p:
                    entries.append({"op": op, "n": n, "C": C, "tokens": T, "params": p})
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(table(entries))
    env = dict(os.environ, MHC_TUNING_FILE=f.name, **env_extra)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(LARGE + DECODE)], env=env, capture_output=True,
                          text=True, timeout=120)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        print(f"{label}: failed\n{proc.stderr[-2000:]}")
        return {}
    return json.loads(line[0][7:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile-only", action="store_true")
    args = ap.parse_args()
    if not args.profile_only:
        results = {label: run(label, large, decode, env) for label, large, decode, env in CONFIGS}
        shapes = [f"{n},{C},{T}" for n, C, T in LARGE + DECODE]
        print("us per call (pre / post_pre); large shapes take the first params of a label, decode the second")
        print("| config | " + " | ".join(shapes) + " |")
        print("|---|" + "---|" * len(shapes))
        for label, r in results.items():
            cells = [f"{r[s]['pre']} / {r[s]['post_pre']}" if s in r else "-" for s in shapes]
            print(f"| {label} | " + " | ".join(cells) + " |")
    import mhc.tools.bench as b
    for n, C, T in LARGE[:1] + LARGE[2:] + DECODE[:1]:
        b.profile_kernels(n, C, T, ["pre", "post_pre"])


if __name__ == "__main__":
    main()
