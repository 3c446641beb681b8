"""Benchmark of the n-stream mHC ops on CUDA against their memory floor and torch.compile.

    mhc bench                  # the issue shapes (n = 4, 8; C 1024..7168; 4k-16k tokens) and decode shapes
    mhc bench --quick          # two large shapes and a few decode shapes (about 2 minutes)
    mhc bench --grid           # the cartesian grid of --n, --C, --tokens instead
    mhc bench --json out.json  # also write every figure
    mhc bench --model gpt|vision   # whole training steps against plain residuals (mhc.tools.bench_model)
(`python bench/python/bench_ops.py ...` runs the same.)

Method (docs/PERFORMANCE.md): bf16 streams; every timed region of ours is captured in a CUDA graph and
replayed, timed with CUDA events, median of the replays divided by the calls in the graph, after
warm-up; each graph cycles through enough input sets to exceed 4x the L2 cache, so small shapes are
not timed out of cache. The floor of an op is the bytes it must move (each input read once, each
output written once, parameters included) over the measured device-to-device copy bandwidth
(read + write). "site" is pre -> identity F -> post; its floors are 3nC + 2C elements per token
forward and 7nC + 4C forward + backward (plus parameters). "chain" is a stack of sites run the way a
model runs them: expand -> pre -> F -> post_pre -> F -> ... -> post -> head, F = identity; its figures
are per site (the chain's time / sites, expand and head included, and so are their bytes in the floor).
Ops marked @ring project with the ring kernel at every size (MHC_CUDA_PRE=ring; the default takes the direct
projection from 1024 tokens), @wave run the wave pre (MHC_CUDA_PRE=wave; x read from device memory once), @fused fuse post_pre
into the streaming pre at every size (MHC_CUDA_PRE=fused), @cluster run the cluster kernels
(MHC_CUDA_PRE=cluster); unmarked ones the default.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch._dynamo

import mhc  # noqa: F401  (registers torch.ops.mhc)
from mhc import ops
from mhc import reference as ref

DTYPE = torch.bfloat16
ITERS, POST_MULT, EPS, NORM_EPS, PRE_EPS = 20, 2.0, 1e-6, 1e-6, 1e-6


# ---- timing --------------------------------------------------------------------------------------------


def time_graph(step: Callable[[int], None], sets: int, reps: int = 10, min_calls: int = 8) -> float:
    """Median microseconds per call of step(i), i cycling over input sets, replayed from a CUDA graph."""
    calls = max(sets, min_calls)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(calls, 3)):  # warm-up outside capture (allocator, lazy init, autotuning)
            step(i % sets)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            step(i % sets)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    del graph
    return statistics.median(times)


def time_events(step: Callable[[int], None], sets: int, reps: int = 5) -> float:
    """Median microseconds per call without a graph (host launch time included when it dominates)."""
    calls = max(sets, 4)
    for i in range(3):
        step(i % sets)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for i in range(calls):
            step(i % sets)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 31) -> float:
    """Device-to-device copy bandwidth of torch's copy_ in bytes/s, counting bytes read plus bytes written.

    The copies run for half a second before the timed replays (an idle H200's clocks read 345 MHz). On the
    H200 this probe read 2.77 TB/s while our post kernels moved 3.96 TB/s: it is not the ceiling there, so
    `--bandwidth` sets the figure the floors use (docs/PERFORMANCE.md uses 4.12 TB/s)."""
    a = torch.randn(nbytes // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    start = time.time()
    while time.time() - start < 0.5:
        for _ in range(10):
            b.copy_(a)
        torch.cuda.synchronize()
    us = time_graph(lambda i: b.copy_(a), sets=1, reps=20, min_calls=10)
    return 2 * a.numel() * 4 / (us * 1e-6)


# ---- inputs and byte counts ----------------------------------------------------------------------------

CHAIN_SITES = 8
# MHC_CUDA_PRE values: unset (the default: the streaming pre, with the direct projection from 1024 tokens, post_pre
# unfused above 16 tokens), the streaming pre with its ring projection at every size, the wave pre, the streaming pre
# with post_pre always fused into it, the cluster kernels; and the forward ops each one changes
PATHS = ("default", "ring", "wave", "fused", "cluster")
PATH_OPS = {"default": ("pre", "post_pre", "site_fwd", "chain_fwd"),
            "ring": ("pre", "post_pre", "site_fwd", "chain_fwd"),
            "wave": ("pre", "post_pre", "site_fwd", "chain_fwd"), "fused": ("post_pre", "chain_fwd"),
            "cluster": ("pre", "post_pre", "site_fwd", "chain_fwd")}
ISSUE_SHAPES = [(4, 1024, 16384), (4, 2048, 16384), (4, 4096, 8192), (4, 7168, 4096), (8, 4096, 4096)]
DECODE_SHAPES = [(4, 4096, 1), (4, 4096, 16), (4, 4096, 64), (4, 7168, 1), (4, 7168, 16), (4, 7168, 64),
                 (8, 4096, 1), (8, 4096, 64)]
QUICK_SHAPES = [(4, 4096, 8192), (8, 4096, 4096)]
QUICK_DECODE = [(4, 4096, 1), (4, 4096, 64), (4, 7168, 16)]


def site_params(n: int, C: int, rows: int, scales: int, grad: bool):
    """(fn [rows, n*C], base [rows], scale [scales]) in fp32."""
    k = torch.float32
    fn = (torch.randn(rows, n * C, device="cuda", dtype=k) / math.sqrt(n * C)).requires_grad_(grad)
    base = torch.randn(rows, device="cuda", dtype=k).requires_grad_(grad)
    scale = torch.full((scales,), 0.5, device="cuda", dtype=k).requires_grad_(grad)
    return fn, base, scale


def site_inputs(n: int, C: int, T: int, sets: int, grad: bool = False):
    xs = [torch.randn(T, n, C, device="cuda", dtype=DTYPE).requires_grad_(grad) for _ in range(sets)]
    return (*site_params(n, C, n * n + 2 * n, 3, grad), xs)


def chain_params(n: int, C: int, grad: bool):
    """Parameters of CHAIN_SITES sites (a list of (fn, base, scale)) and of the head (fn, base, scale)."""
    return [site_params(n, C, n * n + 2 * n, 3, grad) for _ in range(CHAIN_SITES)], site_params(n, C, n, 1, grad)


def chain_forward(lib, x0, n: int, sites, head):
    """expand -> pre -> F -> post_pre -> ... -> post -> head with F = identity; [T, C] -> [T, C]."""
    x = lib.expand_streams(x0, n)
    layer_input, _, h_post, comb = lib.mhc_pre(x, *sites[0], **hyper())
    for params in sites[1:]:
        x, layer_input, _, h_post, comb = lib.mhc_post_pre(x, layer_input, h_post, comb, *params, **hyper())
    return lib.mhc_head(lib.mhc_post(x, layer_input, h_post, comb), *head)


def floors(n: int, C: int, T: int, bw: float) -> Dict[str, float]:
    """Microseconds each op needs at copy bandwidth: bytes it must move / bandwidth."""
    e, f = 2, 4  # bytes per stream element (bf16), per coefficient (f32)
    m = n * n + 2 * n
    fn_bytes = m * n * C * f + 2 * m * f
    head_fn = n * n * C * f
    coef = (2 * n + n * n) * f  # h_pre, h_post, comb per token
    L = CHAIN_SITES
    # chain: L sites of 3nC + 2C (7nC + 4C with backward), expand and head ((n + 1)C each way; the head
    # backward reads x and grad_out and writes grad_x: (2n + 1)C), per site
    chain_fwd = T * e * C * (L * (3 * n + 2) + 2 * (n + 1)) + L * fn_bytes + head_fn
    chain_bwd_extra = T * e * C * (L * (4 * n + 2) + (n + 1) + (2 * n + 1)) + L * fn_bytes + head_fn
    by = {
        "pre": T * ((n * C + C) * e + coef + (m + 1) * f) + fn_bytes,
        "post": T * ((2 * n * C + C) * e + (n + n * n) * f),
        "post_pre": T * ((2 * n * C + 2 * C) * e + (n + n * n) * f + coef + (m + 1) * f) + fn_bytes,
        "pre_bwd": T * ((2 * n * C + C) * e + (m + 1) * f + coef) + 2 * fn_bytes,
        "post_bwd": T * ((3 * n * C + 2 * C) * e + 2 * (n + n * n) * f),
        "site_fwd": T * (3 * n * C + 2 * C) * e + fn_bytes,
        "site_fwd_bwd": T * (7 * n * C + 4 * C) * e + 2 * fn_bytes,
        "chain_fwd": chain_fwd / L,
        "chain_fwd_bwd": (chain_fwd + chain_bwd_extra) / L,
    }
    return {k: v / bw * 1e6 for k, v in by.items()}


# ---- the timed ops -------------------------------------------------------------------------------------


def hyper():
    return dict(iters=ITERS, post_mult=POST_MULT, eps=EPS, norm_eps=NORM_EPS, pre_eps=PRE_EPS)


def make_steps(impl: str, n: int, C: int, T: int, sets: int, compiled: Dict, with_backward: bool = True):
    """{op name: step(i)} for implementation impl in ("mhc", "eager", "compile"); the chain steps (ours only)
    run a whole chain of CHAIN_SITES sites, measure() reports them per site."""
    lib = ops if impl == "mhc" else ref
    fn, base, scale, xs = site_inputs(n, C, T, sets)
    ys = [torch.randn(T, C, device="cuda", dtype=DTYPE) for _ in range(sets)]
    h_post = torch.rand(T, n, device="cuda") * 2
    comb = torch.rand(T, n, n, device="cuda")

    def pre(x):
        return lib.mhc_pre(x, fn, base, scale, **hyper())

    def post(x, y):
        return lib.mhc_post(x, y, h_post, comb)

    def post_pre(x, y):
        return lib.mhc_post_pre(x, y, h_post, comb, fn, base, scale, **hyper())

    def site(x):
        layer_input, _, hp, cb = lib.mhc_pre(x, fn, base, scale, **hyper())
        return lib.mhc_post(x, layer_input, hp, cb)  # F = identity

    if impl == "compile":
        key = ("compiled",)
        if key not in compiled:
            compiled[key] = {name: torch.compile(f, dynamic=False) for name, f in
                             [("pre", ref.mhc_pre), ("post", ref.mhc_post), ("post_pre", ref.mhc_post_pre)]}
        c = compiled[key]

        def pre(x):  # noqa: F811
            return c["pre"](x, fn, base, scale, **hyper())

        def post(x, y):  # noqa: F811
            return c["post"](x, y, h_post, comb)

        def post_pre(x, y):  # noqa: F811
            return c["post_pre"](x, y, h_post, comb, fn, base, scale, **hyper())

        def site(x):  # noqa: F811
            layer_input, _, hp, cb = c["pre"](x, fn, base, scale, **hyper())
            return c["post"](x, layer_input, hp, cb)

    steps = {
        "pre": lambda i: pre(xs[i]),
        "post": lambda i: post(xs[i], ys[i]),
        "post_pre": lambda i: post_pre(xs[i], ys[i]),
        "site_fwd": lambda i: site(xs[i]),
    }
    if impl == "mhc":
        sites, head = chain_params(n, C, grad=False)
        steps["chain_fwd"] = lambda i: chain_forward(ops, ys[i], n, sites, head)
    if not with_backward:
        return steps

    # forward + backward of the site, gradients w.r.t. x and the parameters
    gfn, gbase, gscale, gxs = site_inputs(n, C, T, sets, grad=True)
    gouts = [torch.randn(T, n, C, device="cuda", dtype=DTYPE) for _ in range(sets)]

    def site_grad(i):
        x = gxs[i]
        layer_input, _, hp, cb = (lib if impl != "compile" else ref).mhc_pre(x, gfn, gbase, gscale, **hyper())
        out = (lib if impl != "compile" else ref).mhc_post(x, layer_input, hp, cb)
        return torch.autograd.grad(out, (x, gfn, gbase, gscale), gouts[i])

    if impl == "compile":
        key = ("site_grad", n, C, T)
        if key not in compiled:
            compiled[key] = torch.compile(lambda x, fn_, b_, s_: ref.mhc_post(
                x, *(lambda r: (r[0], r[2], r[3]))(ref.mhc_pre(x, fn_, b_, s_, **hyper()))), dynamic=False)
        site_c = compiled[key]

        def site_grad_compiled(i):  # compiled forward; AOTAutograd's compiled backward
            out = site_c(gxs[i], gfn, gbase, gscale)
            return torch.autograd.grad(out, (gxs[i], gfn, gbase, gscale), gouts[i])

        steps["site_fwd_bwd"] = site_grad_compiled
    else:
        steps["site_fwd_bwd"] = site_grad

    if impl == "mhc":  # the two backward kernels alone, and the chain differentiated end to end
        saved = [torch.ops.mhc.pre(x, fn, base, scale, ITERS, POST_MULT, EPS, NORM_EPS, PRE_EPS, "cuda") for x in xs]
        g_li = [torch.randn(T, C, device="cuda", dtype=DTYPE) for _ in range(sets)]
        g_h = torch.randn(T, n, device="cuda")
        g_c = torch.randn(T, n, n, device="cuda")
        steps["pre_bwd"] = lambda i: torch.ops.mhc.pre_backward(
            xs[i], fn, base, scale, saved[i][4], saved[i][5], g_li[i], g_h, g_h, g_c, None, ITERS, POST_MULT, EPS,
            NORM_EPS, PRE_EPS, "cuda")
        steps["post_bwd"] = lambda i: torch.ops.mhc.post_backward(gouts[i], xs[i], ys[i], h_post, comb, "cuda")
        gsites, ghead = chain_params(n, C, grad=True)
        leaves = [p for s in gsites for p in s] + list(ghead)
        x0s = [y.clone().requires_grad_(True) for y in ys]

        def chain_grad(i):
            out = chain_forward(ops, x0s[i], n, gsites, ghead)
            return torch.autograd.grad(out, [x0s[i]] + leaves, ys[i])

        steps["chain_fwd_bwd"] = chain_grad
    return steps


# ---- driver --------------------------------------------------------------------------------------------

OP_ORDER = ["pre", "post", "post_pre", "pre_bwd", "post_bwd", "site_fwd", "site_fwd_bwd", "chain_fwd",
            "chain_fwd_bwd"]
PER_SITE = ("chain_fwd", "chain_fwd_bwd")  # timed per chain, reported per site
COMPILE_OPS = ("pre", "post", "site_fwd", "site_fwd_bwd")  # the torch.compile baselines the tables compare with


def measure(impl: str, n: int, C: int, T: int, sets: int, compiled: Dict, only: Optional[List[str]],
            with_backward: bool = True, suffix: str = "") -> Dict[str, float]:
    out = {}
    try:
        steps = make_steps(impl, n, C, T, sets, compiled, with_backward)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {}
    for name in OP_ORDER:
        if name not in steps or (only and name not in only):
            continue
        try:
            # torch.compile's code is timed without a CUDA graph (capturing it is not reliable);
            # the baselines with fewer repetitions: they are the slow ones.
            if impl == "compile":
                t = time_events(steps[name], sets)
            else:
                t = time_graph(steps[name], sets, reps=10 if impl == "mhc" else 5, min_calls=8 if sets > 1 else 2)
            out[name + suffix] = t / CHAIN_SITES if name in PER_SITE else t
        except torch.OutOfMemoryError:
            out[name + suffix] = float("nan")
        except Exception as e:  # a baseline that cannot be captured is reported, not fatal
            print(f"  [{impl} {name}{suffix} n={n} C={C} T={T}] {type(e).__name__}: {str(e)[:160]}", file=sys.stderr)
            out[name + suffix] = float("nan")
        torch.cuda.empty_cache()
    return out


def measure_paths(n: int, C: int, T: int, sets: int, only: Optional[List[str]], paths) -> Dict[str, float]:
    """Our ops with the first pre path, then the forward ops again with each other one."""
    saved = os.environ.get("MHC_CUDA_PRE")
    try:
        def select(path):
            if path == "default":
                os.environ.pop("MHC_CUDA_PRE", None)
            else:
                os.environ["MHC_CUDA_PRE"] = path

        select(paths[0])
        out = measure("mhc", n, C, T, sets, {}, only)
        for path in paths[1:]:
            select(path)
            fwd = [o for o in PATH_OPS[path] if not only or o in only]
            out.update(measure("mhc", n, C, T, sets, {}, fwd, with_backward=False, suffix="@" + path))
    finally:
        if saved is None:
            os.environ.pop("MHC_CUDA_PRE", None)
        else:
            os.environ["MHC_CUDA_PRE"] = saved
    return out


def kernel_times(step: Callable[[int], None], sets: int = 1, reps: int = 5) -> List[tuple]:
    """(device us per call, launches per call, kernel name) of each kernel step(i) runs, i cycling over sets, from
    torch.profiler after a warm-up; the most time first."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(3):
        step(i % sets)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            step(i % sets)
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if t > 0 and evt.key and not evt.key.startswith("cuda"):
            rows.append((t / reps, evt.count // reps, evt.key))
    return sorted(rows, reverse=True)


def profile_kernels(n: int, C: int, T: int, only: Optional[List[str]]) -> None:
    """Per-kernel device time of each mhc op at one shape (torch.profiler), to see where an op spends."""
    steps = make_steps("mhc", n, C, T, 1, {})
    for name in OP_ORDER:
        if name not in steps or (only and name not in only):
            continue
        rows = kernel_times(steps[name])
        print(f"-- {name}  n={n} C={C} tokens={T}: {sum(r[0] for r in rows):.1f} us of kernels per call")
        for t, count, key in rows[:8]:
            print(f"   {t:9.1f} us  x{count}  {key[:110]}")


def run_once(n: int, C: int, T: int, only: Optional[List[str]], calls: int = 4) -> None:
    """Runs each selected op a few times, untimed: the workload for ncu / compute-sanitizer."""
    steps = make_steps("mhc", n, C, T, 1, {})
    for name in OP_ORDER:
        if name in steps and (not only or name in only):
            for _ in range(calls):
                steps[name](0)
    torch.cuda.synchronize()


def ncu_hotspots(csv_path: str, top: int = 30) -> None:
    """Top SASS lines by warp-stall samples from `ncu --page source --csv --print-source sass` output."""
    import csv

    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    header_at = next((i for i, r in enumerate(rows) if any("Stall Sampling" in c for c in r)), None)
    if header_at is None:
        print("no stall-sampling columns in", csv_path)
        return
    header = rows[header_at]
    col = next(i for i, c in enumerate(header) if "Stall Sampling" in c and "All" in c)
    src = next((i for i, c in enumerate(header) if c.strip() in ("Source", "# Source")), 1)
    lines = []
    for r in rows[header_at + 1:]:
        try:
            lines.append((float(r[col].replace(",", "")), r[src][:100]))
        except (ValueError, IndexError):
            continue
    total = sum(v for v, _ in lines) or 1.0
    print(f"{len(lines)} SASS lines, {total:.0f} stall samples; top {top}:")
    for v, text in sorted(lines, reverse=True)[:top]:
        print(f"  {100 * v / total:5.1f}%  {text}")


def fmt(v: Optional[float], digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def summary(rows: List[Dict], shapes, decode, bw: float) -> None:
    """The tables of docs/PERFORMANCE.md: per shape, the chain and the site against their floors and
    torch.compile; the standalone ops; decode."""
    at = {(r["op"], r["n"], r["C"], r["tokens"]): r for r in rows}
    streams = [r["floor_us"] * bw / r["mhc_us"] for r in rows if r["op"] in ("post", "post_bwd") and r["tokens"] >= 4096
               and r["mhc_us"] == r["mhc_us"]]
    if streams:  # a check of the ceiling: the pure streaming kernels should move about the copy bandwidth
        print(f"\nfloors at {bw / 1e12:.3f} TB/s; our post / post backward kernels move up to {max(streams) / 1e12:.3f} TB/s")

    def get(op, shape, key="mhc_us"):
        r = at.get((op,) + tuple(shape))
        return None if r is None else r.get(key)

    def ratio(a, b):
        return None if a is None or b is None or a != a or b != b or b == 0 else a / b

    print(f"\nper site, us (x its floor; @ring: the ring projection; @fused: post_pre fused at every size; @wave: the wave pre); floors of a site: (3n+2)C forward, (7n+4)C with backward; the chain's per "
          f"site add expand's and head's bytes / {CHAIN_SITES} sites; x compile: torch.compile of one site (the same "
          "math) over ours per site:")
    print("| n, C, tokens | site floor fwd | chain fwd | chain fwd@ring | chain fwd@fused | chain fwd@wave | site fwd | compile fwd | "
          "chain x compile | site floor fwd+bwd | chain fwd+bwd | site fwd+bwd | compile fwd+bwd | chain x compile |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for sh in shapes:
        cells = []
        for fwd in (True, False):
            chain, site = ("chain_fwd", "site_fwd") if fwd else ("chain_fwd_bwd", "site_fwd_bwd")
            fl = get(site, sh, "floor_us")
            c, s_, comp = get(chain, sh), get(site, sh), get(site, sh, "compile_us")
            cells += [fmt(fl), f"{fmt(c)} ({fmt(ratio(c, get(chain, sh, 'floor_us')), 2)}x)"]
            if fwd:
                for path in ("ring", "fused", "wave"):
                    cf = get("chain_fwd@" + path, sh)
                    cells.append(f"{fmt(cf)} ({fmt(ratio(cf, get(chain, sh, 'floor_us')), 2)}x)")
            cells += [f"{fmt(s_)} ({fmt(ratio(s_, fl), 2)}x)", fmt(comp), fmt(ratio(comp, c), 2)]
        print(f"| {sh[0]}, {sh[1]}, {sh[2]} | " + " | ".join(cells) + " |")

    print("\nstandalone ops, us (x floor); pre's floor is one read of x, (n + 1)C:")
    standalone = ("pre", "pre@ring", "pre@wave", "pre@cluster", "post_pre", "post_pre@ring", "post_pre@fused", "post_pre@cluster", "post", "post_bwd", "pre_bwd")
    print("| n, C, tokens | " + " | ".join(standalone) + " |")
    print("|---|" + "---|" * len(standalone))
    for sh in shapes:
        cells = [f"{fmt(get(op, sh))} ({fmt(ratio(get(op, sh), get(op, sh, 'floor_us')), 2)}x)" for op in standalone]
        print(f"| {sh[0]}, {sh[1]}, {sh[2]} | " + " | ".join(cells) + " |")

    print("\ndecode, us per call replayed from a CUDA graph (boundary = post of one site + pre of the next, "
          "one op):")
    print("| n, C, tokens | boundary | boundary@cluster | pre | pre@cluster | post | site fwd | chain fwd per site |")
    print("|---|---|---|---|---|---|---|---|")
    for sh in decode:  # the default fuses the boundary at these sizes
        cells = [fmt(get(op, sh)) for op in
                 ("post_pre", "post_pre@cluster", "pre", "pre@cluster", "post", "site_fwd", "chain_fwd")]
        print(f"| {sh[0]}, {sh[1]}, {sh[2]} | " + " | ".join(cells) + " |")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--model" or a.startswith("--model=") for a in argv):  # whole-model steps: mhc.tools.bench_model
        from . import bench_model

        return bench_model.main(argv)
    ap = argparse.ArgumentParser(prog="mhc bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("gpt", "vision"),
                    help="time whole training steps instead (mhc.tools.bench_model; `mhc bench --model gpt --help`)")
    ap.add_argument("--quick", action="store_true", help="two large shapes and a few decode shapes")
    ap.add_argument("--grid", action="store_true",
                    help="the cartesian grid of --n, --C, --tokens (implied when any of them is given)")
    ap.add_argument("--n", type=int, nargs="*", default=None, help="grid: stream counts (default 4 8)")
    ap.add_argument("--C", type=int, nargs="*", default=None, help="grid: widths (default 1024 2048 4096 7168)")
    ap.add_argument("--tokens", type=int, nargs="*", default=None, help="grid: token counts (default 1 16 64 4096 16384)")
    ap.add_argument("--ops", nargs="*", default=None, help=f"subset of {OP_ORDER}")
    ap.add_argument("--paths", nargs="*", default=list(PATHS), choices=PATHS,
                    help="pre paths to time, the first for every op, the others for the forward ops (@path)")
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=False,
                    help="also time PyTorch eager (mhc.reference); off by default")
    ap.add_argument("--compile", choices=["none", "some", "all"], default="some",
                    help="torch.compile baselines: none, the large shapes (the first one only with --quick), or all")
    ap.add_argument("--json", default=None)
    ap.add_argument("--bandwidth", type=float, default=None, metavar="TB_S",
                    help="copy bandwidth for the floors (read + write, TB/s) instead of the probe's")
    ap.add_argument("--profile", type=int, nargs=3, action="append", metavar=("N", "C", "TOKENS"),
                    help="print the per-kernel device time of every op at this shape (repeatable) and exit")
    ap.add_argument("--run-once", type=int, nargs=3, metavar=("N", "C", "TOKENS"),
                    help="run the selected ops a few times without timing (for ncu) and exit")
    ap.add_argument("--ncu-hotspots", metavar="CSV", help="summarise an ncu source-page CSV and exit")
    args = ap.parse_args(argv)
    if args.ncu_hotspots:
        ncu_hotspots(args.ncu_hotspots)
        return 0
    if not torch.cuda.is_available():
        print("mhc bench: no CUDA device found; it times the CUDA kernels against PyTorch (the CPU path is benchmarked by bench/cpp/bench_cpu)", file=sys.stderr)
        return 1
    torch._dynamo.config.cache_size_limit = 256  # one compiled graph per benchmarked shape
    if args.run_once:
        run_once(*args.run_once, args.ops)
        return 0
    if args.profile:
        for n, C, T in args.profile:
            profile_kernels(n, C, T, args.ops)
        return 0
    if args.grid or args.n or args.C or args.tokens:
        grid = [(n, C, T) for n in args.n or [4, 8] for C in args.C or [1024, 2048, 4096, 7168]
                for T in args.tokens or [1, 16, 64, 4096, 16384]]
        big, small = [s for s in grid if s[2] > 64], [s for s in grid if s[2] <= 64]
    elif args.quick:
        big, small = QUICK_SHAPES, QUICK_DECODE
    else:
        big, small = ISSUE_SHAPES, DECODE_SHAPES
    compile_at = {"none": [], "some": big[:1] if args.quick else big, "all": big + small}[args.compile]
    props = torch.cuda.get_device_properties(0)
    probe = copy_bandwidth()
    bw = args.bandwidth * 1e12 if args.bandwidth else probe
    l2 = props.L2_cache_size
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB; torch {torch.__version__}")
    print(f"copy bandwidth (read + write): {probe / 1e12:.3f} TB/s measured (torch copy_ in a CUDA graph), "
          f"{bw / 1e12:.3f} TB/s used for the floors")
    results = []
    compiled: Dict = {}
    t_start = time.time()
    print("\n| op | n | C | tokens | mhc us | floor us | floor/mhc | eager us | compile us | vs eager | vs compile |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, C, T in big + small:
        x_bytes = T * n * C * 2
        sets = max(1, min(32, math.ceil(4 * l2 / x_bytes)))
        fl = floors(n, C, T, bw)
        mine = measure_paths(n, C, T, sets, args.ops, args.paths)
        eager = measure("eager", n, C, T, sets, compiled, args.ops) if args.eager else {}
        comp = measure("compile", n, C, T, sets, compiled, [o for o in COMPILE_OPS if not args.ops or o in args.ops]
                       ) if (n, C, T) in compile_at else {}
        for name in OP_ORDER + [o + "@" + p for p in PATHS for o in OP_ORDER]:
            if name not in mine:
                continue
            t = mine[name]
            floor = fl[name.split("@")[0]]
            row = dict(op=name, n=n, C=C, tokens=T, mhc_us=t, floor_us=floor, floor_fraction=floor / t if t == t else None,
                       eager_us=eager.get(name), compile_us=comp.get(name))
            results.append(row)
            e, c = row["eager_us"], row["compile_us"]
            print(f"| {name} | {n} | {C} | {T} | {fmt(t)} | {fmt(floor)} | {fmt(row['floor_fraction'], 2)} | "
                  f"{fmt(e)} | {fmt(c)} | {fmt(e / t if e else None, 2)} | {fmt(c / t if c else None, 2)} |",
                  flush=True)
        if args.json:  # rewritten after every shape: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(dict(device=props.name, torch=torch.__version__, copy_bandwidth=bw, copy_probe=probe,
                               rows=results), f, indent=1)
    summary(results, big, small, bw)
    print(f"\n(bench took {time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
