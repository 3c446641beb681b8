"""CPU cost of the 16-bit storage dtypes: fp16 against bf16 and fp32, per op call.

- history_skip: fp32 x, H states stored in fp32 / bf16 / fp16 (the history buffer dtype), forward, and
  forward + backward.
- n-stream site: mhc_pre + mhc_post around an identity sub-layer, streams in fp32 / bf16 / fp16,
  forward, and forward + backward.

Each figure is the median of --repeats timed calls after warm-up, in microseconds.

    PYTHONPATH=python python3 bench/python/bench_cpu_dtypes.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import mhc.ops as ops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def median_us(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def bench_history(numel: int, H: int, repeats: int):
    rows = []
    x = torch.randn(numel)
    logits = torch.randn(H)
    for name, dtype in DTYPES.items():
        states = [torch.randn(numel).to(dtype) for _ in range(H)]
        fwd = median_us(lambda: ops.history_skip(x, states, logits, constraint="softmax"), repeats)
        xg = x.clone().requires_grad_()
        lg = logits.clone().requires_grad_()

        def step():
            out, _ = ops.history_skip(xg, states, lg, constraint="softmax")
            out.sum().backward()

        rows.append({"op": f"history_skip H={H} [{numel}]", "states": name, "forward_us": fwd,
                     "fwd_bwd_us": median_us(step, repeats)})
    return rows


def bench_site(tokens: int, n: int, C: int, repeats: int):
    rows = []
    m = n * n + 2 * n
    fn = torch.randn(m, n * C) * 0.02
    base = torch.randn(m) * 0.1
    scale = torch.ones(3)
    for name, dtype in DTYPES.items():
        x = torch.randn(tokens, n, C).to(dtype)

        def forward(inp=x):
            layer_input, _, h_post, comb = ops.mhc_pre(inp, fn, base, scale)
            return ops.mhc_post(inp, layer_input, h_post, comb)

        fwd = median_us(forward, repeats)
        xg = x.clone().requires_grad_()
        fwd_bwd = median_us(lambda: forward(xg).float().sum().backward(), repeats)
        rows.append({"op": f"pre+post n={n} C={C} T={tokens}", "states": name, "forward_us": fwd,
                     "fwd_bwd_us": fwd_bwd})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="PyTorch and mhc CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--numel", type=int, default=65536, help="elements per history state")
    p.add_argument("--history", type=int, default=4, help="H, states per skip")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = bench_history(args.numel, args.history, args.repeats)
    rows += bench_site(args.tokens, args.n, args.channels, args.repeats)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'op':<34} {'dtype':<6} {'forward us':>11} {'fwd+bwd us':>11}")
    for r in rows:
        print(f"{r['op']:<34} {r['states']:<6} {r['forward_us']:>11.1f} {r['fwd_bwd_us']:>11.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
