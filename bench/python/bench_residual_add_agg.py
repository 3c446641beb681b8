"""mhc.ops.residual_add_agg against the unfused PyTorch it replaces, on the CPU (or CUDA with --device cuda).

The unfused version is ``x_out = x + res; agg = (h_pre[..., None] * x_out).sum(-2)``, written two ways: the
broadcast multiply + sum, and a batched matmul ``h_pre[..., None, :] @ x_out``. Forward only and forward + backward,
medians of interleaved repeats (so a load spike hits every variant alike). ``--timer process`` measures the CPU time
of the process instead of wall time: on a machine shared with other jobs, and with ``--threads 1``, that is the work
each variant does, free of the waits that other jobs cause. Prints one line per shape and dtype:

    python bench/python/bench_residual_add_agg.py [--device cpu] [--threads 2] [--repeats 15] [--timer wall|process]
        [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import mhc


def unfused_sum(x, res, h_pre):
    x_out = x + res
    return x_out, (h_pre.unsqueeze(-1).to(x.dtype) * x_out).sum(-2)


def unfused_bmm(x, res, h_pre):
    x_out = x + res
    return x_out, (h_pre.unsqueeze(-2).to(x.dtype) @ x_out).squeeze(-2)


VARIANTS = {"mhc": mhc.ops.residual_add_agg, "torch_sum": unfused_sum, "torch_bmm": unfused_bmm}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, calls, clock):
    _sync(device)
    start = clock()
    for _ in range(calls):
        fn()
    _sync(device)
    return (clock() - start) / calls


def bench(T, n, C, dtype, device, backward, repeats, clock):
    x = torch.randn(T, n, C, dtype=dtype, device=device, requires_grad=backward)
    res = torch.randn(T, n, C, dtype=dtype, device=device, requires_grad=backward)
    h_pre = torch.rand(T, n, device=device, requires_grad=backward)
    grads = (torch.randn(T, n, C, dtype=dtype, device=device), torch.randn(T, C, dtype=dtype, device=device))

    def step(op):
        def run():
            if backward:
                torch.autograd.backward(op(x, res, h_pre), grads)
                x.grad = res.grad = h_pre.grad = None
            else:
                with torch.no_grad():
                    op(x, res, h_pre)
        return run

    runs = {name: step(op) for name, op in VARIANTS.items()}
    calls = max(1, int(2e8 // (T * n * C * (3 if backward else 1))))  # about 0.1 s per sample on 2 cores
    for run in runs.values():
        _time(run, device, calls, clock)  # warm-up: allocator, caches, threads
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(_time(run, device, calls, clock))
    return {name: statistics.median(s) for name, s in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--timer", choices=("wall", "process"), default="wall")
    parser.add_argument("--quick", action="store_true", help="three shapes, fp32 only")
    args = parser.parse_args()
    clock = time.perf_counter if args.timer == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [(128, 4, 512), (512, 4, 512), (4096, 4, 512)] if args.quick else [
        (128, 4, 512), (512, 4, 512), (4096, 4, 512), (1024, 4, 2048), (256, 8, 1024), (2048, 4, 4096)]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    print(f"# mhc {mhc.__version__}, torch {torch.__version__}, device {args.device}, threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, {args.timer} time, medians of "
          f"{args.repeats}")
    print(f"{'T':>5} {'n':>2} {'C':>5} {'dtype':>8} {'pass':>8} | {'mhc us':>9} {'sum us':>9} {'bmm us':>9} | "
          f"{'vs sum':>6} {'vs bmm':>6}")
    for T, n, C in shapes:
        for dtype in dtypes:
            for backward in (False, True):
                t = bench(T, n, C, dtype, args.device, backward, args.repeats, clock)
                print(f"{T:>5} {n:>2} {C:>5} {str(dtype).split('.')[-1]:>8} {'fwd+bwd' if backward else 'fwd':>8} | "
                      f"{t['mhc'] * 1e6:>9.1f} {t['torch_sum'] * 1e6:>9.1f} {t['torch_bmm'] * 1e6:>9.1f} | "
                      f"{t['torch_sum'] / t['mhc']:>5.2f}x {t['torch_bmm'] / t['mhc']:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
