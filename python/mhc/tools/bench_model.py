"""Whole-model training steps with mHC against the same model with plain residuals (`mhc bench --model ...`).

    mhc bench --model gpt                      # C 4096 (4 layers, 4 x 1024 tokens) and C 2048 (8 layers, 8 x 1024)
    mhc bench --model gpt --sizes 4096 --modes compile --n 4
    mhc bench --model gpt --sizes 4096 --modes eager --n 4 --rounds 3   # variants in turn, 3 times: the median
    mhc bench --model gpt --width 2048 --depth 8 --heads 16 --batch 1 --seq 32768 --n 4   # long context
    mhc bench --model vision                   # the 50-layer vision model, MHCSequential (H = 4) vs residual
    mhc bench --model gpt --quick --device cpu --json out.json   # smoke test
(`python bench/python/bench_gpt_step.py ...` runs the GPT part with its older flags.)

GPT: the demo's model (mhc.demo.model: token + position embeddings, attention and MLP per block, each wrapped in
an mHC site, stream expand, learned head), bf16 weights and streams by default; variants: plain residual, then mHC
for each n, without and with recomputation (mhc.recompute, the paper's block size). Vision: stem conv, 48 blocks
conv3x3-BN-ReLU, pooled linear head (mhc.tools.bench_history), residual vs MHCSequential(max_history=H); plus the
multi-history skip op with one-hot weights against `x + h` on states larger than the L2 cache.

Step = forward + loss + backward + optimizer step, on fixed inputs, in eager mode and under torch.compile (the
whole model; the compiler runs during the warm-up steps). Time: median over the timed steps, CUDA events on a GPU
(perf_counter on the CPU). Peak: torch.cuda.max_memory_allocated over the timed steps, everything included
(weights, gradients, optimizer state, activations). Overheads are against the residual model of the same size and
mode. `--profile` prints torch.profiler's per-kernel table of one step of every variant (and keeps its top rows in
the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import nn

# GPT sizes of the table: name -> (width, depth, heads, batch, sequence); head dim 128.
GPT_SIZES = {"4096": (4096, 4, 32, 4, 1024), "2048": (2048, 8, 16, 8, 1024)}
GPT_QUICK = {"cuda": (1024, 2, 8, 2, 512), "cpu": (32, 1, 2, 2, 16)}
VISION_FULL = dict(batch=32, channels=128, size=32, depth=48)
VISION_QUICK = {"cuda": dict(batch=8, channels=32, size=16, depth=48), "cpu": dict(batch=2, channels=8, size=8,
                                                                                     depth=4)}


@dataclass
class Variant:
    name: str  # residual, mhc-4, mhc-4-recompute, ...
    kind: str  # residual / mhc (GPT); residual / mhc-H (vision, bench_history's model names)
    n: Optional[int] = None
    recompute: bool = False


# ---- timing ---------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> dict:
    """Median milliseconds per step after warm-up, and the peak memory of the timed steps (CUDA)."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"step_ms": statistics.median(times), "peak_bytes": peak}


def profile_step(step: Callable[[], None], device: torch.device, label: str, rows: int) -> List[dict]:
    """torch.profiler's table of one step (after the timed ones), printed; its top rows returned."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    sort = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    events = prof.key_averages()
    print(f"\n## profile of one step: {label}")
    print(events.table(sort_by=sort, row_limit=rows, max_name_column_width=70))
    top = sorted(events, key=lambda e: getattr(e, sort, 0.0), reverse=True)[:rows]
    return [{"name": e.key, "count": e.count, "device_time_us": getattr(e, "device_time_total", 0.0),
             "cpu_time_us": e.cpu_time_total} for e in top]


# ---- the GPT ----------------------------------------------------------------------------------------------------


def _compiled(model: nn.Module, args) -> nn.Module:
    """The model under torch.compile with the run's backend and mode (reduce-overhead: replayed from CUDA graphs, so
    a host-bound step loses its per-op launch cost)."""
    mode = None if args.compile_mode == "default" else args.compile_mode
    return torch.compile(model, backend=args.compile_backend, mode=mode)


def gpt_variants(ns: List[int], recompute: str) -> List[Variant]:
    out = [Variant("residual", "residual")]
    for n in ns:
        if recompute in ("off", "both"):
            out.append(Variant(f"mhc-{n}", "mhc", n))
        if recompute in ("on", "both"):
            out.append(Variant(f"mhc-{n}-recompute", "mhc", n, recompute=True))
    return out


def gpt_step(size, variant: Variant, mode: str, args, device: torch.device):
    """A training step of the demo's GPT at `size` and what it is made of (for cleanup)."""
    from mhc.demo.model import GPT, ModelConfig

    width, depth, heads, batch, seq = size
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, seq_len=seq, width=width, depth=depth, heads=heads, residual=variant.kind,
                      n_streams=variant.n or 1, recompute=variant.recompute)
    model = GPT(cfg).to(device)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)  # bf16 streams; the mHC ops keep their coefficients in fp32
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = _compiled(model, args) if mode == "compile" else model
    tokens = torch.randint(0, 256, (batch, seq + 1), device=device)
    idx, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "autocast"):
            _, loss, _ = forward(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    params = sum(p.numel() for p in model.parameters())
    return step, params


def gpt_sizes(args, device: torch.device):
    custom = [args.width, args.depth, args.heads, args.batch, args.seq]
    if any(v is not None for v in custom):
        base = GPT_QUICK[device.type] if args.quick else GPT_SIZES["4096"]
        size = tuple(v if v is not None else b for v, b in zip(custom, base))
        return {"x".join(map(str, size)): size}
    if args.quick:
        return {"quick": GPT_QUICK[device.type]}
    return {name: GPT_SIZES[name] for name in args.sizes}


def run_gpt(args, device: torch.device) -> List[dict]:
    rows = []
    for size_name, size in gpt_sizes(args, device).items():
        width, depth, heads, batch, seq = size
        print(f"\n# GPT width {width}, depth {depth} ({2 * depth} sites), {heads} heads, {batch} x {seq} tokens, "
              f"{args.precision}")
        for mode in args.modes:
            mode_rows = []
            for rnd in range(args.rounds):
                _print_header(mode if args.rounds == 1 else f"{mode}, round {rnd + 1} of {args.rounds}")
                base = None
                for variant in gpt_variants(args.n, args.recompute):
                    row = {"model": "gpt", "size": size_name, "width": width, "depth": depth, "heads": heads,
                           "batch": batch, "seq": seq, "mode": mode, "round": rnd, **asdict(variant)}
                    row.update(_measure(lambda: gpt_step(size, variant, mode, args, device), device, args,
                                        f"gpt {size_name} {mode} {variant.name}"))
                    base = _relative(row, base)
                    mode_rows.append(row)
                    _print_row(row)
            if args.rounds > 1:
                _print_rounds(mode, args.rounds, mode_rows)
            rows += mode_rows
    return rows


def _print_rounds(mode: str, rounds: int, rows: List[dict]) -> None:
    """Per variant over the rounds (each round runs every variant once, in order, so a drift of the GPU's clocks
    during the run shows as a spread instead of landing on the later variants): median step and overhead."""
    print(f"\n{mode}, over {rounds} rounds (median; min-max of the overhead):")
    print("| variant | step ms | time overhead | overhead range |")
    print("|---|---|---|---|")
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name and "error" not in r]
        if not mine:
            continue
        over = [r["time_overhead_pct"] for r in mine if r.get("time_overhead_pct") is not None]
        step = statistics.median(r["step_ms"] for r in mine)
        text = f"{statistics.median(over):+.1f}% | {min(over):+.1f}% to {max(over):+.1f}%" if over else "- | -"
        print(f"| {name} | {step:.2f} | {text} |", flush=True)


# ---- the vision model -----------------------------------------------------------------------------------------


def vision_step(variant: Variant, mode: str, shape: dict, args, device: torch.device):
    from .bench_history import make_model

    torch.manual_seed(0)
    model = make_model(variant.kind, shape["channels"], shape["depth"]).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    forward = _compiled(model, args) if mode == "compile" else model
    x = torch.randn(shape["batch"], 3, shape["size"], shape["size"], device=device)
    y = torch.randint(0, 10, (shape["batch"],), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "autocast"):
            loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def run_vision(args, device: torch.device) -> List[dict]:
    shape = dict(VISION_QUICK[device.type] if args.quick else VISION_FULL)
    print(f"\n# vision: stem + {shape['depth']} blocks + head, batch {shape['batch']}, {shape['channels']} channels, "
          f"{shape['size']}x{shape['size']}, {'bf16 autocast' if args.precision == 'autocast' else 'fp32'}")
    variants = [Variant("residual", "residual")] + [Variant(f"mhc-{h}", f"mhc-{h}") for h in args.history]
    rows = []
    for mode in args.modes:
        _print_header(mode)
        base = None
        for variant in variants:
            row = {"model": "vision", **shape, "mode": mode, **asdict(variant)}
            row.update(_measure(lambda: vision_step(variant, mode, shape, args, device), device, args,
                                f"vision {mode} {variant.name}"))
            base = _relative(row, base)
            rows.append(row)
            _print_row(row)
    return rows


def one_hot_rows(args, device: torch.device) -> List[dict]:
    """The history skip with one-hot weights (it must cost a residual add) against x + h, on states of at least
    twice the L2 cache (CUDA; device time from CUDA graph replays) or a small size on the CPU."""
    from mhc.history_ops import history_skip

    from .bench_history import time_graph, time_op

    if device.type == "cuda":
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        numel = max(16 << 20, math.ceil(2 * l2 / 4))  # 64 MiB fp32 states at least
    else:
        numel = 1 << 14 if args.quick else 1 << 22
    rows = []
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(numel, device=device, dtype=dtype)
            for H in args.history:
                states = torch.randn(H, numel, device=device, dtype=dtype)
                one_hot = torch.tensor([0.0, 3.0] + [0.0] * (H - 2), device=device)  # sparsemax: exactly one-hot
                timings = {}
                for name, fn in (("x + h", lambda: x + states[1]), ("skip one-hot", lambda: history_skip(x, states,
                                                                                                     one_hot))):
                    if device.type == "cuda":
                        timings[name] = 1e6 * time_graph(fn, device, 20)
                    else:
                        timings[name] = 1e6 * time_op(fn, device, 5 if args.quick else 20)
                rows.append({"dtype": str(dtype).replace("torch.", ""), "H": H, "numel": numel,
                             "state_mib": numel * x.element_size() / 2**20, "add_us": timings["x + h"],
                             "one_hot_us": timings["skip one-hot"],
                             "ratio": timings["skip one-hot"] / timings["x + h"]})
    print("\n# one-hot history skip vs x + h" + (" (device time, CUDA graph replays)" if device.type == "cuda" else ""))
    print("| dtype | H | state MiB | x + h us | one-hot skip us | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['H']} | {r['state_mib']:.1f} | {r['add_us']:.1f} | {r['one_hot_us']:.1f} | "
              f"{r['ratio']:.2f}x |")
    return rows


# ---- shared ---------------------------------------------------------------------------------------------------


def _measure(build: Callable, device: torch.device, args, label: str) -> dict:
    """Builds a variant's step, times it (and profiles it with --profile), frees it; errors become a row field."""
    result: dict = {}
    try:
        step, params = build()
        result["params_m"] = params / 1e6
        result.update(time_steps(step, device, args.warmup, args.steps))
        if args.profile:
            result["profile"] = profile_step(step, device, label, args.profile_rows)
        del step
    except Exception as e:  # an OOM or a compile failure is reported with the rest, not fatal
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _relative(row: dict, base: Optional[dict]) -> Optional[dict]:
    """Fills the overheads against the residual row of the same mode (the first one); returns that base."""
    if base is None:
        base = row if "error" not in row else None
    if base is not None and "error" not in row:
        row["time_overhead_pct"] = 100.0 * (row["step_ms"] / base["step_ms"] - 1.0)
        if row["peak_bytes"] is not None and base["peak_bytes"]:
            row["memory_overhead_pct"] = 100.0 * (row["peak_bytes"] / base["peak_bytes"] - 1.0)
        else:
            row["memory_overhead_pct"] = None
    return base


def _print_header(title: str) -> None:
    print(f"\n{title}:\n| variant | params (M) | step ms | time overhead | peak GiB | memory overhead |")
    print("|---|---|---|---|---|---|")


def _print_row(row: dict) -> None:
    if "error" in row:
        print(f"| {row['name']} | - | {row['error']} | | | |", flush=True)
        return
    peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**30:.2f}"
    memory = "-" if row.get("memory_overhead_pct") is None else f"{row['memory_overhead_pct']:+.1f}%"
    time_overhead = "-" if row.get("time_overhead_pct") is None else f"{row['time_overhead_pct']:+.1f}%"
    print(f"| {row['name']} | {row['params_m']:.1f} | {row['step_ms']:.2f} | {time_overhead} | {peak} | "
          f"{memory} |", flush=True)


def _commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def environment(device: torch.device) -> dict:
    import mhc

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"device": name, "torch": torch.__version__, "mhc": mhc.__version__, "commit": _commit(),
            "cpu_threads": torch.get_num_threads()}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="mhc bench --model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("gpt", "vision"), required=True)
    ap.add_argument("--device", default=None, help="cuda (default when there is a GPU) or cpu")
    ap.add_argument("--quick", action="store_true", help="a small size and few steps: a smoke test")
    ap.add_argument("--modes", default="eager,compile", help="comma-separated subset of eager,compile")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument("--compile-mode", default="default",
                    choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                    help="torch.compile mode (reduce-overhead: CUDA graphs; default: inductor's default)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20, quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, quick 2)")
    ap.add_argument("--precision", choices=("bf16", "autocast", "fp32"), default=None,
                    help="GPT: bf16 weights and streams (default), fp32 weights with bf16 autocast, or fp32; "
                         "vision: fp32 (default) or autocast")
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8], help="GPT: mHC streams (default 4 8)")
    ap.add_argument("--recompute", choices=("off", "on", "both"), default="both",
                    help="GPT: mHC without recomputation, with it, or both (default)")
    ap.add_argument("--sizes", nargs="+", choices=sorted(GPT_SIZES), default=list(GPT_SIZES),
                    help="GPT sizes (default both): 4096 = 4 layers, 4 x 1024 tokens; 2048 = 8 layers, 8 x 1024")
    for flag in ("width", "depth", "heads", "batch", "seq"):
        ap.add_argument(f"--{flag}", type=int, default=None, help=f"GPT: a custom size's {flag} (the others from "
                                                                 "the 4096 size)")
    ap.add_argument("--history", type=int, nargs="+", default=[4], help="vision: MHCSequential max_history (4)")
    ap.add_argument("--no-ops", action="store_true", help="vision: skip the one-hot op rows")
    ap.add_argument("--rounds", type=int, default=1,
                    help="GPT: run every variant this many times, in turn (residual, mHC, ..., residual, mHC, ...), "
                         "and print the median over the rounds (clock drift during a run shows as spread)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's per-kernel table of one step")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        ap.error(f"--device: expected cpu, cuda or cuda:i, got {args.device!r}")
    for flag, values, low in (("--n", args.n, 1), ("--history", args.history, 1), ("--steps", [args.steps], 1),
                              ("--warmup", [args.warmup], 0)):
        bad = [v for v in values if v is not None and v < low]
        if bad:
            ap.error(f"{flag}: expected values >= {low}, got {bad[0]}")
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        ap.error(f"--json: no folder {str(Path(args.json).resolve().parent)!r} to write {args.json!r} into")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("mhc bench --model: no CUDA device found (use --device cpu for a smoke test)", file=sys.stderr)
        return 1
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in ("eager", "compile")]
    if bad or not args.modes:
        ap.error(f"--modes: expected a subset of eager,compile, got {','.join(args.modes) or 'nothing'}")
    if args.rounds < 1:
        ap.error(f"--rounds: expected a count >= 1, got {args.rounds}")
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.precision = args.precision or ("bf16" if args.model == "gpt" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    info = environment(device)
    print(f"# {info['device']}, torch {info['torch']}, mhc {info['mhc']} (commit {info['commit']}); "
          f"{args.steps} timed steps after {args.warmup}"
          + (f"; torch.compile mode {args.compile_mode}" if "compile" in args.modes else ""))
    result = {"info": info, "args": vars(args)}
    if args.model == "gpt":
        result["rows"] = run_gpt(args, device)
    else:
        result["rows"] = run_vision(args, device)
        result["one_hot"] = [] if args.no_ops else one_hot_rows(args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 1 if any("error" in row for row in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
