"""`mhc tune`: measure the CUDA kernels' launch parameters on this GPU and write the tuning file.

    mhc tune --quick            # n = 4, C 1024 and 4096, two token counts: a few seconds
    mhc tune                    # n = 4, C 1024, 2048, 4096, 7168; tokens 64, 1024, 4096, 16384: about a minute
    mhc tune --C 5120 --tokens 2048 8192 --dtype float16 --dry-run

For every op with tunable parameters (mhc.tuning.PARAMS, of the kernel path the library takes for these streams:
the cluster kernels' `cluster` and `tile`, or the streaming kernels' `stream_tile` and `stream_group` for 16-bit
streams) and every shape, each candidate is set as this process's table (mhc._C.set_tuning_json), run once
and compared with the built-in heuristic's outputs: a candidate whose outputs differ in any bit is rejected
(--tolerance relaxes that), so a tuning never changes results. The others are timed like `mhc bench`:
CUDA-graph replays timed with CUDA events, median per call after warm-up, inputs cycling through more than
4x the L2 cache. The fastest is re-timed against the heuristic; it is kept when it gains at least
--min-gain. Kept choices become entries (exact C, a token range around each measured count) of the tuning
file that the library reads by itself, mhc.tuning.default_path() ($MHC_TUNING_FILE, else
$XDG_CACHE_HOME/mhc/tuning.json, else ~/.cache/mhc/tuning.json), merged with the entries already there for
other shapes. See docs/TUNING.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import tuning

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FULL = dict(C=(1024, 2048, 4096, 7168), tokens=(64, 1024, 4096, 16384))
QUICK = dict(C=(1024, 4096), tokens=(64, 4096))
HYPER = (20, 2.0, 1e-6, 1e-6, 1e-6)  # iters, post_mult, eps, norm_eps, pre_eps: the modules' defaults

Params = Tuple[Tuple[str, int], ...]  # sorted (name, value) pairs


# ---- what to try, and what the kernel does without a table ------------------------------------------


def kernel_path(dtype: str, n: int) -> str:
    """The pre kernel the library runs for these streams (src/cuda/pre_stream.cu: stream_shape_ok, pre_path)."""
    if os.environ.get("MHC_CUDA_PRE") in ("cluster", "fused") or dtype not in ("bfloat16", "float16"):
        return "cluster"
    return "stream" if n in (2, 4, 8) else "cluster"


def candidates(op: str, path: str = "cluster") -> List[Params]:
    """Every combination of the parameters the op's kernel path reads."""
    names = sorted(tuning.PATH_PARAMS[path])
    return [tuple(zip(names, values)) for values in itertools.product(*(tuning.PARAMS[op][k] for k in names))]


def stream_heuristic(tokens: int, sms: int) -> Params:
    """What src/cuda/pre_stream.cu (run_stream, plan_stream) picks without a tuning entry."""
    group = 1
    while group < 8 and tokens // (2 * group) >= 4 * sms:
        group *= 2
    tile = 16 if tokens <= 32 else 64 if tokens < 512 else 128
    return (("stream_group", group), ("stream_tile", tile))


def heuristic(op: str, C: int, tokens: int, path: str = "cluster", sms: int = 132) -> Params:
    """The launch parameters the kernels pick without a tuning entry (cluster: src/cuda/pre.cu, launch_fused)."""
    if path == "stream":
        return stream_heuristic(tokens, sms)
    cluster = 16
    if tokens > 256:
        cluster = 1
        while cluster < 16 and C // cluster > 512:
            cluster *= 2
        if C // cluster < 256 and cluster > 1:
            cluster //= 2
        cluster = max(cluster, 4 if C >= 1024 else 1)
    while cluster > 1 and C // cluster < 64:
        cluster //= 2
    return (("cluster", cluster), ("tile", 16 if tokens <= 16 else 32))


def fmt_params(p: Params) -> str:
    return ",".join(f"{k}={v}" for k, v in p)


# ---- decisions (no GPU needed: unit-tested) ----------------------------------------------------------


@dataclass
class Result:
    op: str
    C: int
    tokens: int
    default: Params
    default_us: float
    best: Params  # == default when nothing beat it
    best_us: float
    rejected: Dict[Params, float] = field(default_factory=dict)  # params -> max |difference| (inf: failed)

    @property
    def gain(self) -> float:
        return self.default_us / self.best_us

    @property
    def changed(self) -> bool:
        return self.best != self.default


def fastest(timings: Dict[Params, float]) -> Params:
    return min(timings, key=lambda p: (timings[p], p))


def token_ranges(counts: Sequence[int]) -> Dict[int, List[Optional[int]]]:
    """{count: [lo, hi]}: consecutive measured counts split the token axis at their geometric mean; the
    first range is open below, the last open above."""
    counts = sorted(set(counts))
    bounds = [math.isqrt(a * b) for a, b in zip(counts, counts[1:])]
    ranges = {}
    for i, t in enumerate(counts):
        lo = bounds[i - 1] + 1 if i > 0 else None
        hi = bounds[i] if i < len(bounds) else None
        ranges[t] = [lo, hi]
    return ranges


def entries_for(results: Sequence[Result], n: int, dtype: str) -> List[dict]:
    """Tuning entries for the results whose choice differs from the heuristic."""
    entries = []
    for (op, C), group in itertools.groupby(sorted(results, key=lambda r: (r.op, r.C, r.tokens)),
                                            key=lambda r: (r.op, r.C)):
        group = list(group)
        ranges = token_ranges([r.tokens for r in group])
        for r in group:
            if r.changed:
                entries.append(tuning.make_entry(op, dict(r.best), n=n, dtype=dtype, C=C, tokens=ranges[r.tokens]))
    return entries


def merged_table(new_entries: List[dict], existing: Optional[dict], device: str, n: int, dtype: str,
                 tuned: Sequence[Tuple[str, int]]) -> dict:
    """The new entries first, then the existing ones for the same device that do not cover a tuned
    (op, n, dtype, C): a re-tune replaces what an earlier one wrote for the same shapes."""
    kept = []
    if existing is not None and existing.get("device", "") in ("", device):
        for e in existing["entries"]:
            same = (isinstance(e.get("C"), int) and (e["op"], e["C"]) in tuned and e.get("n") == n
                    and e.get("dtype") == dtype)
            if not same:
                kept.append(e)
    return tuning.make_table(new_entries + kept, device=device)


# ---- measuring (CUDA) ---------------------------------------------------------------------------------


def _set_table(entries: List[dict]) -> None:
    from .. import _C

    _C.set_tuning_json(json.dumps(tuning.make_table(entries)))


def _inputs(op: str, n: int, C: int, T: int, dtype: torch.dtype, sets: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    m = n * n + 2 * n

    def randn(*shape, dt=torch.float32, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dt)

    params = (randn(m, n * C, scale=1 / math.sqrt(n * C)), randn(m, scale=0.5), randn(3, scale=0.3))
    per_set = []
    for _ in range(sets):
        x = randn(T, n, C, dt=dtype)
        if op == "pre_forward":
            per_set.append((x,))
        else:
            comb = torch.softmax(randn(T, n, n), dim=-1)
            per_set.append((x, randn(T, C, dt=dtype), torch.sigmoid(randn(T, n)) * 2, comb))
    return params, per_set


def _call(op: str, params, inputs):
    fn, base, scale = params
    if op == "pre_forward":
        return torch.ops.mhc.pre(inputs[0], fn, base, scale, *HYPER, "auto")
    return torch.ops.mhc.post_pre(*inputs, fn, base, scale, *HYPER, "auto")


def _max_difference(got, want) -> float:
    """Largest |got - want| over the outputs (0 when only the sign of a zero differs)."""
    return max(float((g.double() - w.double()).abs().nan_to_num(math.inf).max()) for g, w in zip(got, want))


def _within(got, want, tolerance: float) -> bool:
    if tolerance == 0:
        return all(torch.equal(g, w) for g, w in zip(got, want))
    return all(torch.allclose(g.double(), w.double(), rtol=tolerance, atol=tolerance) for g, w in zip(got, want))


def tune_shape(op: str, n: int, C: int, T: int, dtype_name: str, tolerance: float, min_gain: float,
               l2_bytes: int) -> Result:
    from .bench import time_graph

    dtype = DTYPES[dtype_name]
    sets = max(1, min(32, math.ceil(4 * l2_bytes / (T * n * C * dtype.itemsize))))
    params, per_set = _inputs(op, n, C, T, dtype, sets, seed=C * 7919 + T)

    def entry(p: Params) -> List[dict]:
        return [tuning.make_entry(op, dict(p), n=n, dtype=dtype_name, C=C, tokens=T)]

    def timed(p: Optional[Params]) -> float:
        _set_table(entry(p) if p else [])
        return time_graph(lambda i: _call(op, params, per_set[i]), sets)

    _set_table([])
    want = [t.clone() for t in _call(op, params, per_set[0])]
    path = kernel_path(dtype_name, n)
    default = heuristic(op, C, T, path, torch.cuda.get_device_properties(0).multi_processor_count)
    timings: Dict[Params, float] = {}
    rejected: Dict[Params, float] = {}
    for p in candidates(op, path):
        if p == default:
            continue
        try:
            _set_table(entry(p))
            got = _call(op, params, per_set[0])
            if not _within(got, want, tolerance):
                rejected[p] = _max_difference(got, want)
                continue
            timings[p] = timed(p)
        except RuntimeError as e:  # a launch the GPU refuses: not a usable choice
            print(f"    {fmt_params(p)} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            torch.cuda.synchronize()
            rejected[p] = math.inf
    default_us = timed(None)
    best, best_us = default, default_us
    if timings:
        challenger = fastest(timings)
        # Re-time the two alternately: the sweep's minimum is biased low by noise.
        rounds = [(timed(None), timed(challenger)) for _ in range(3)]
        default_us = sorted(r[0] for r in rounds)[1]
        challenger_us = sorted(r[1] for r in rounds)[1]
        if default_us / challenger_us >= 1 + min_gain:
            best, best_us = challenger, challenger_us
        else:
            best_us = default_us
    _set_table([])
    return Result(op, C, T, default, default_us, best, best_us, rejected)


# ---- the command -------------------------------------------------------------------------------------


def why_not_runnable() -> Optional[str]:
    """None when this process can tune, else the reason."""
    from .. import _C

    if not _C.built_with_cuda():
        return "this build of mhc has no CUDA kernels (a CPU-only build): there is nothing to tune"
    if not torch.cuda.is_available() or _C.cuda_device_count() == 0:
        return "no CUDA GPU is visible (torch sees none): the tuner times the CUDA kernels on the GPU"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return (f"{torch.cuda.get_device_name()} is sm_{major}{minor}: the tunable kernels (thread-block clusters) "
                "need sm_90 or newer, so every launch already uses the generic kernels")
    if os.environ.get("MHC_CUDA_PATH") == "generic":
        return "MHC_CUDA_PATH=generic forces the generic kernels, which have no tunable parameters: unset it"
    return None


def parse_args(argv: Optional[List[str]]):
    ap = argparse.ArgumentParser(prog="mhc tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"C {QUICK['C']}, tokens {QUICK['tokens']}")
    ap.add_argument("--n", type=int, default=4, help="streams (default 4)")
    ap.add_argument("--C", type=int, nargs="+", help=f"stream widths (default {FULL['C']})")
    ap.add_argument("--tokens", type=int, nargs="+", help=f"token counts per call (default {FULL['tokens']})")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="stream dtype (default bfloat16)")
    ap.add_argument("--ops", nargs="+", choices=tuple(tuning.PARAMS), default=list(tuning.PARAMS))
    ap.add_argument("--min-gain", type=float, default=0.03,
                    help="keep a choice only if it is at least this much faster than the heuristic (default 0.03)")
    ap.add_argument("--tolerance", type=float, default=0.0,
                    help="accept candidates whose outputs differ from the heuristic's by at most this (rtol = atol); "
                         "default 0: bit-identical outputs only")
    ap.add_argument("--output", type=Path, help=f"the file to write (default: {tuning.default_path()}, "
                                                "which the library reads; another path needs MHC_TUNING_FILE)")
    ap.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    ap.add_argument("--json", type=Path, help="also write every measurement here")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.C = args.C or list(preset["C"])
    args.tokens = args.tokens or list(preset["tokens"])
    if not 1 <= args.n <= 64:
        ap.error(f"--n: expected 1..64 streams, got {args.n}")
    for name, values in (("--C", args.C), ("--tokens", args.tokens)):
        if any(v < 1 for v in values):
            ap.error(f"{name}: expected positive integers, got {values}")
    return args


def print_summary(results: Sequence[Result]) -> None:
    print(f"{'op':<18} {'C':>6} {'tokens':>7}  {'heuristic':<18} {'us':>9}  {'chosen':<18} {'us':>9} {'gain':>6}  rejected")
    for r in results:
        chosen = fmt_params(r.best) if r.changed else "(heuristic)"
        rejected = f"{len(r.rejected)} (outputs differ)" if r.rejected else "0"
        print(f"{r.op:<18} {r.C:>6} {r.tokens:>7}  {fmt_params(r.default):<18} {r.default_us:>9.2f}  "
              f"{chosen:<18} {r.best_us:>9.2f} {r.gain:>5.2f}x  {rejected}")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    reason = why_not_runnable()
    if reason:
        print(f"mhc tune: {reason}", file=sys.stderr)
        return 1
    from .. import _C

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    device = props.name
    path = kernel_path(args.dtype, args.n)
    # Above 16 tokens the streaming post+pre runs the post kernel and then pre_forward's kernels (and entries).
    shapes = [(op, C, T) for op in args.ops for C in args.C for T in args.tokens
              if not (path == "stream" and op == "post_pre_forward" and T > 16)]
    print(f"mhc tune: {device} (sm_{props.major}{props.minor}), n = {args.n}, {args.dtype}, {path} kernels, "
          f"{len(shapes)} shapes, candidates per op: "
          + ", ".join(f"{op} {len(candidates(op, path))}" for op in args.ops), flush=True)
    start = time.time()
    results = []
    try:
        for op, C, T in shapes:
            r = tune_shape(op, args.n, C, T, args.dtype, args.tolerance, args.min_gain, props.L2_cache_size)
            results.append(r)
            print(f"  {op} C={C} tokens={T}: heuristic {fmt_params(r.default)} {r.default_us:.2f} us, "
                  + (f"chose {fmt_params(r.best)} {r.best_us:.2f} us ({r.gain:.2f}x)" if r.changed else "kept it")
                  + (f", {len(r.rejected)} rejected (outputs differ by up to {max(r.rejected.values()):.3g})"
                     if r.rejected else ""), flush=True)
            torch.cuda.empty_cache()
    finally:
        _C.reload_tuning()  # back to the file's table
    print(f"\nmeasured in {time.time() - start:.0f} s\n")
    print_summary(results)
    if args.json:
        args.json.write_text(json.dumps([dict(op=r.op, n=args.n, dtype=args.dtype, C=r.C, tokens=r.tokens,
                                              heuristic=dict(r.default), heuristic_us=r.default_us,
                                              chosen=dict(r.best), chosen_us=r.best_us, gain=r.gain,
                                              rejected={fmt_params(p): d for p, d in r.rejected.items()})
                                         for r in results], indent=1))
    entries = entries_for(results, args.n, args.dtype)
    changed = [r for r in results if r.changed]
    if changed:
        mean_gain = math.exp(sum(math.log(r.gain) for r in changed) / len(changed))
        print(f"\n{len(changed)} of {len(results)} shapes beat the heuristic by >= {args.min_gain:.0%} "
              f"(geometric mean gain {mean_gain:.2f}x on those)")
    else:
        print(f"\nno shape beat the heuristic by >= {args.min_gain:.0%}")
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    path = args.output or tuning.default_path()
    try:
        existing = tuning.load(path)
    except (ValueError, OSError) as e:  # a malformed file is replaced
        print(f"replacing the malformed tuning file {path} ({e})")
        existing = None
    tuned = {(op, C) for op, C, _ in shapes}
    table = merged_table(entries, existing, device, args.n, args.dtype, tuned)
    tuning.save(table, path)
    print(f"wrote {len(table['entries'])} entries ({len(entries)} from this run) to {path}")
    if args.output and Path(args.output).resolve() != tuning.default_path().resolve():
        print(f"the library reads {tuning.default_path()}; to use this file: export MHC_TUNING_FILE={path}")
    else:
        status = _C.reload_tuning()
        print(f"the library loads it by itself in every new process: {status['entries']} entries apply to this GPU"
              + (f" (ERROR: {status['error']})" if status["error"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
