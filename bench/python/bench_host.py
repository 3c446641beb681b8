"""Host cost of the public ops: microseconds of Python and dispatch per call, beside a native ``x + x``.

Tiny tensors, so the kernels take almost no time and what is measured is the path from the Python call to
the kernel. Best of several rounds of many calls, in CPU time of the calling thread (time.thread_time), so time
the thread spends preempted on a shared machine is not counted. With ``--device cuda``: one
eager decode site (C = 4096, 1 token) timed on the host, with a synchronisation only after the loop.

    python bench/python/bench_host.py [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import mhc


def per_call_us(fn, calls: int = 400, rounds: int = 7, sync=None) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls)
        if sync:
            sync()
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    C = 4096 if dev.type == "cuda" else 64
    n = 4
    x = torch.randn(1, n, C, device=dev)
    site = mhc.MHC(n, C).to(dev)
    skip = mhc.MHCSkip(max_history=4).to(dev)
    xh = torch.randn(1, C, device=dev)
    h = torch.randn(4, 1, C, device=dev)
    weights = torch.softmax(torch.randn(4, device=dev), 0)

    def one_site(inp):
        layer_input, state = site.pre(inp)
        return site.post(inp, layer_input, state)

    xg = x.clone().requires_grad_()
    rows = []

    def row(name, fn, baseline):
        us = per_call_us(fn, sync=sync)
        rows.append({"call": name, "us": us, "vs_x_plus_x": us / baseline})

    with torch.no_grad():
        add = per_call_us(lambda: x + x, sync=sync)
        rows.append({"call": "x + x (no_grad)", "us": add, "vs_x_plus_x": 1.0})
        row("site pre + post (no_grad)", lambda: one_site(x), add)
        row("history_mix (no_grad)", lambda: mhc.ops.history_mix(xh, h, weights), add)
        row("MHCSkip (no_grad)", lambda: skip(xh, list(h)), add)
    add_grad = per_call_us(lambda: xg + xg, sync=sync)
    rows.append({"call": "x + x (autograd)", "us": add_grad, "vs_x_plus_x": 1.0})
    row("site pre + post (autograd, forward)", lambda: one_site(xg), add_grad)
    xhg, hg = xh.clone().requires_grad_(), h.clone().requires_grad_()
    row("history_mix (autograd, forward)", lambda: mhc.ops.history_mix(xhg, hg, weights), add_grad)
    row("MHCSkip (autograd, forward)", lambda: skip(xhg, list(hg)), add_grad)

    print(f"host cost per call, {dev.type}, x [1, {n}, {C}], torch {torch.__version__}, 1 thread")
    print(f"{'call':40s} {'us':>9s} {'vs x+x':>8s}")
    for r in rows:
        print(f"{r['call']:40s} {r['us']:9.1f} {r['vs_x_plus_x']:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev.type, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
