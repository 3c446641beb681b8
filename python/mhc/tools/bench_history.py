"""Multi-history skip benchmark: a 50-layer vision model with plain residuals, mHC (MHCSequential, H = 4
and 8) and DenseNet-style concatenation; peak memory and training-step time. Plus the skip op itself:
one-hot and dense weights against a plain residual add.

    python bench/python/bench_history.py --device cpu --quick        # a few seconds on 2 cores
    python bench/python/bench_history.py --device cuda --json out.json
(`python -m mhc.tools.bench_history ...` runs the same; `mhc bench --model vision` compares the 50-layer model with
its residual counterpart, eager and compiled.)

The model (isotropic, so every layer's state has one shape and the history spans the whole depth):
stem conv 3 -> C, 48 blocks F = conv3x3-BN-ReLU (C -> C), global pool + linear head = 50 layers.
- residual: x_{l+1} = x_l + F_l(x_l)
- mhc-H:    x_{l+1} = F_l(x_l) + sum_k alpha_k x_{l-k}, k < H (MHCSequential, sparsemax)
- dense:    x_{l+1} = F_l(conv1x1(cat(x_0 .. x_l))), the 1x1 conv reducing (l+1) C to C channels (the
            plain concatenating implementation, whose concatenations are all kept for the backward)

Memory: on CUDA the peak allocated during a training step above what the model and optimizer hold
(torch.cuda.max_memory_allocated); on every device the bytes autograd saves for the backward (counted
once per storage, via saved-tensor hooks). Time: median of the measured steps (forward + backward +
SGD step), after warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from mhc.history import MHCSequential
from mhc.history_ops import history_mix, history_skip


def block(c):
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, c, depth):
        super().__init__()
        self.blocks = nn.ModuleList(block(c) for _ in range(depth))

    def forward(self, x):
        for f in self.blocks:
            x = x + f(x)
        return x


class Dense(nn.Module):
    def __init__(self, c, depth):
        super().__init__()
        self.reduce = nn.ModuleList(nn.Conv2d((l + 1) * c, c, 1, bias=False) for l in range(depth))
        self.blocks = nn.ModuleList(block(c) for _ in range(depth))

    def forward(self, x):
        features = [x]
        for reduce, f in zip(self.reduce, self.blocks):
            features.append(f(reduce(torch.cat(features, dim=1))))
        return features[-1]


class VisionModel(nn.Module):
    """stem + body (48 blocks) + head = 50 layers."""

    def __init__(self, body, c, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.body = body
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


def make_model(kind, c, depth):
    if kind == "residual":
        body = Residual(c, depth)
    elif kind == "dense":
        body = Dense(c, depth)
    elif kind.startswith("mhc"):
        # "mhc-4", "mhc-8", "mhc-4-detach", "mhc-4-bf16"
        parts = kind.split("-")
        H = int(parts[1])
        body = MHCSequential(*[block(c) for _ in range(depth)], max_history=H, detach_history="detach" in parts,
                             history_dtype=torch.bfloat16 if "bf16" in parts else None)
    else:
        raise ValueError(kind)
    return VisionModel(body, c)


def saved_bytes_of_step(model, x, y):
    """Bytes autograd saves for the backward during one forward (each storage once)."""
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total[0]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(kind, args, device):
    torch.manual_seed(0)
    model = make_model(kind, args.channels, args.depth).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    params = sum(p.numel() * p.element_size() for p in model.parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times, enqueue = [], []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        enqueue.append(time.perf_counter() - t0)  # host time to issue the step (CUDA runs asynchronously)
        sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync(device)
        print(f"## profile of one {kind} step")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        saved = saved_bytes_of_step(model, x, y)
    return {"model": kind, "step_ms": 1e3 * statistics.median(times), "enqueue_ms": 1e3 * statistics.median(enqueue),
            "saved_bytes": saved, "peak_bytes": peak, "param_bytes": params}


def time_op(fn, device, repeats):
    for _ in range(3):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_graph(fn, device, repeats, calls=10):
    """Device time per call, host overhead excluded: `calls` calls captured in a CUDA graph, replayed."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    sync(device)
    return start.elapsed_time(end) / 1e3 / (repeats * calls)


def bench_ops(args, device):
    """The skip op alone: out = x + sum_k w_k h_k over [B, C, S, S] states, against x + h."""
    shape = (args.batch, args.channels, args.size, args.size) if args.op_numel is None else (args.op_numel,)
    numel = 1
    for d in shape:
        numel *= d
    rows = []
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device=device, dtype=dtype)
            for H in (4, 8):
                states = torch.randn((H, *shape), device=device, dtype=dtype)
                one_hot = torch.tensor([0.0, 3.0] + [0.0] * (H - 2), device=device)  # sparsemax: exactly one-hot
                dense = torch.zeros(H, device=device)
                bytes_el = x.element_size()
                cases = {
                    "x + h (torch)": (lambda: x + states[1], 3),
                    "skip one-hot": (lambda: history_skip(x, states, one_hot), 3),
                    "skip dense": (lambda: history_skip(x, states, dense), H + 2),
                    "mix dense (weights given)": (lambda: history_mix(x, states, torch.full((H,), 1.0 / H,
                                                                                             device=device)), H + 2),
                }
                for name, (fn, tensors_moved) in cases.items():
                    t = time_op(fn, device, args.op_repeats)
                    row = {"dtype": str(dtype).replace("torch.", ""), "H": H, "op": name, "us": t * 1e6}
                    if device.type == "cuda":  # the kernels alone, from a CUDA graph
                        t = time_graph(fn, device, max(1, args.op_repeats // 10))
                        row["kernel_us"] = t * 1e6
                    row["GB/s"] = tensors_moved * numel * bytes_el / t / 1e9
                    rows.append(row)
    return rows


def fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes: a few seconds on a 2-core CPU")
    p.add_argument("--models", default="residual,mhc-4,mhc-8,mhc-4-detach,mhc-4-bf16,dense")
    p.add_argument("--batch", type=int)
    p.add_argument("--channels", type=int)
    p.add_argument("--size", type=int, help="image side")
    p.add_argument("--depth", type=int, default=48, help="blocks in the body (48 + stem + head = 50 layers)")
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--op-numel", type=int, help="elements per state for the op benchmark (default: the model's)")
    p.add_argument("--op-repeats", type=int)
    p.add_argument("--threads", type=int, help="PyTorch CPU threads (1 gives steadier figures on a busy machine)")
    p.add_argument("--profile", action="store_true", help="CUDA: print torch.profiler's top kernels of one step")
    p.add_argument("--no-ops", action="store_true", help="skip the op benchmark")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    quick = dict(batch=8, channels=32, size=16, steps=3, op_repeats=20)
    full = dict(batch=32, channels=128, size=32, steps=10, op_repeats=100)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "config": {k: getattr(args, k) for k in ("batch", "channels", "size", "depth", "steps", "amp")}}
    print(f"# {info['device']}, torch {torch.__version__}, {info['threads']} CPU threads; model: 50 layers, "
          f"batch {args.batch}, {args.channels} channels, {args.size}x{args.size}, amp={args.amp}")
    results = []
    base = None
    print(f"{'model':<14} {'step ms':>9} {'rel':>6} {'issue ms':>9} {'saved':>11} {'rel':>6} {'peak (cuda)':>12} "
          f"{'rel':>6}")
    for kind in args.models.split(","):
        r = bench_model(kind, args, device)
        base = base or r
        rel = lambda a, b: "-" if a is None or b is None or not b else f"{a / b:.2f}x"  # noqa: E731
        print(f"{kind:<14} {r['step_ms']:>9.2f} {rel(r['step_ms'], base['step_ms']):>6} {r['enqueue_ms']:>9.2f} "
              f"{fmt_bytes(r['saved_bytes']):>11} {rel(r['saved_bytes'], base['saved_bytes']):>6} "
              f"{fmt_bytes(r['peak_bytes']):>12} {rel(r['peak_bytes'], base['peak_bytes']):>6}")
        results.append(r)
    ops_rows = [] if args.no_ops else bench_ops(args, device)
    print(f"\n# skip op on states of {args.op_numel or (args.batch, args.channels, args.size, args.size)}")
    print("# us: one call, host included (synchronised); kernel us: device time alone (CUDA graph replay);")
    print("# GB/s: the bytes each op must move (x, the states it reads, out) over the device time")
    print(f"{'dtype':<9} {'H':>2} {'op':<26} {'us':>9} {'kernel us':>10} {'GB/s':>8}")
    for r in ops_rows:
        kernel = f"{r['kernel_us']:>10.1f}" if "kernel_us" in r else f"{'-':>10}"
        print(f"{r['dtype']:<9} {r['H']:>2} {r['op']:<26} {r['us']:>9.1f} {kernel} {r['GB/s']:>8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "models": results, "ops": ops_rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
