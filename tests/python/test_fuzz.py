"""Fuzz of the public Python ops and modules: seeded random calls, valid and invalid, each batch in a subprocess.

Every case is built from its seed: random ranks and sizes (zero sizes included), n up to 1000, stream dtypes and
int / bool / complex ones, NaN / Inf, non-contiguous and stride-0 inputs, meta tensors and mixed devices. A case
knows whether it is valid. Then:

- a valid call must return, and match the fp64 oracle (``mhc.reference`` / ``mhc.history_ops.reference_*`` for the
  ops, the module in float64 on the C++ fp64 reference backend for the modules; gradients too for some cases);
  with NaN / Inf inputs the non-finite elements must be where the oracle has them;
- an invalid call must raise ValueError, TypeError or RuntimeError whose message names an argument of the call;
- nothing may crash or hang (a batch runs in its own process, with a time limit).

``python tests/python/test_fuzz.py FAMILY SEED`` replays one case and prints its verdict.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from typing import Callable, List, NamedTuple, Optional

import torch

SEED = 20260
CASES_PER_FAMILY = 60
BATCHES = 4  # subprocesses, two at a time
BATCH_TIMEOUT_S = 120

STREAM_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BAD_DTYPES = [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class Case(NamedTuple):
    call: Callable[[], object]           # the call under test
    oracle: Optional[Callable[[], object]]  # fp64 oracle of a valid call (None: an invalid call)
    names: List[str]                     # the call's argument names (an error must name one)
    dtype: torch.dtype = torch.float32   # tolerance of the comparison
    grads: Optional[Callable[[object], List]] = None  # valid call: gradients to compare (got, want) pairs


# ---- random pieces --------------------------------------------------------------------------------------


def _lead(rng: random.Random, max_rank: int = 3) -> tuple:
    sizes = [0, 1, 2, 3, 5] if rng.random() < 0.15 else [1, 2, 3, 5]
    return tuple(rng.choice(sizes) for _ in range(rng.randint(0, max_rank)))


def _layout(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    """The same tensor contiguous, strided (every other element of a wider buffer) or, when it has a dim > 1,
    with one dim broadcast (stride 0: the values change, the oracle sees the same ones)."""
    kind = rng.random()
    if t.dim() == 0 or kind < 0.6:
        return t
    if kind < 0.8:
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    dims = [d for d in range(t.dim()) if t.shape[d] > 1]
    if not dims:
        return t
    d = rng.choice(dims)
    return t.narrow(d, 0, 1).expand(t.shape)


def _non_finite(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:
        return t
    t = t.clone()
    t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    return t


def _bad_tensor(rng: random.Random, t: torch.Tensor, kinds=("dtype", "list", "meta", "shape")):
    """An invalid stand-in for tensor t: a non-floating dtype, a non-tensor, a meta tensor (invalid next to CPU
    tensors), or a wrong last dim (invalid where another argument fixes it)."""
    kind = rng.choice(kinds)
    if kind == "dtype":
        return t.detach().to(rng.choice(BAD_DTYPES))
    if kind == "list":
        return t.detach().tolist() if t.numel() < 50 else 1.5
    if kind == "meta":
        return t.detach().to("meta")
    return torch.randn(*t.shape[:-1], t.shape[-1] + rng.randint(1, 3)) if t.dim() else torch.randn(2)


def _f64(value):
    if isinstance(value, torch.Tensor):
        return value.detach().double()
    if isinstance(value, list):
        return [_f64(v) for v in value]
    return value


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


# ---- the n-stream ops -----------------------------------------------------------------------------------


def _site_tensors(rng, n, C, head=False):
    coef = rng.choice(STREAM_DTYPES)
    rows = n if head else n * n + 2 * n
    static = rng.random() < 0.25
    fn = None if static else (torch.randn(rows, n * C) / (n * C) ** 0.5).to(coef)
    base = torch.randn(rows).to(coef)
    scale = None if static else (torch.rand(1 if head else 3) + 0.5).to(coef)
    return fn, base, scale


def _hyper(rng):
    return dict(iters=rng.randint(1, 25), post_mult=rng.choice([2.0, 1.5, 0.5]), eps=rng.choice([0.0, 1e-6, 1e-3]),
                norm_eps=rng.choice([1e-6, 1e-3]), pre_eps=rng.choice([0.0, 1e-6]))


BAD_HYPER = [("iters", 0), ("iters", 2.5), ("iters", "20"), ("eps", -1.0), ("eps", float("nan")),
             ("norm_eps", float("inf")), ("pre_eps", -0.5), ("post_mult", float("nan"))]


def _nstream_case(rng: random.Random, op: str) -> Case:
    from mhc import ops, reference

    n = rng.choice([1, 2, 3, 4, 5, 8]) if rng.random() < 0.9 else rng.choice([16, 33, 64])
    C = rng.choice([1, 2, 3, 7, 8, 16, 33])
    lead = _lead(rng) if n <= 8 else _lead(rng, max_rank=1)
    dtype = rng.choice(STREAM_DTYPES)
    x = torch.randn(*lead, n, C).to(dtype)
    fn, base, scale = _site_tensors(rng, n, C, head=op == "mhc_head")
    h_pre, h_post = torch.rand(*lead, n) + 0.1, 2 * torch.rand(*lead, n)
    comb = reference.sinkhorn(torch.randn(*lead, n, n))
    if op == "mhc_pre":
        args, kw = dict(x=x, fn=fn, base=base, scale=scale), _hyper(rng)
    elif op == "mhc_post":
        args, kw = dict(x=x, y=torch.randn(*lead, C).to(rng.choice(STREAM_DTYPES)), h_post=h_post, comb=comb), {}
    elif op == "mhc_post_pre":
        args = dict(x=x, y=torch.randn(*lead, C), h_post=h_post, comb=comb, fn=fn, base=base, scale=scale)
        kw = _hyper(rng)
    elif op == "mhc_head":
        args, kw = dict(x=x, fn=fn, base=base, scale=scale), dict(eps=rng.choice([0.0, 1e-6, 0.1]))
    elif op == "residual_add_agg":
        args, kw = dict(x=x, res=torch.randn(*lead, n, C).to(rng.choice(STREAM_DTYPES)), h_pre=h_pre), {}
    elif op == "sinkhorn":
        dtype = rng.choice([torch.float32, torch.float64])
        args, kw = dict(logits=torch.randn(*lead, n, n).to(dtype)), dict(iters=rng.randint(1, 25), eps=1e-6)
    else:  # expand_streams
        args, kw = dict(x=torch.randn(*lead, C).to(dtype)), dict(n=n)
    function, oracle_fn = getattr(ops, op), getattr(reference, op)
    names = list(args) + list(kw)
    valid = rng.random() < 0.55
    if valid:
        args = {k: (_layout(rng, v) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        if rng.random() < 0.1:
            first = next(iter(args))
            args[first] = _non_finite(rng, args[first])
    else:
        kind = rng.random()
        tensors = [k for k, v in args.items() if v is not None]
        if kind < 0.45:
            name = rng.choice(tensors)
            kinds = ["dtype", "list"] + (["meta"] if len(tensors) > 1 else []) + (["shape"] if name != names[0] else [])
            args[name] = _bad_tensor(rng, args[name], kinds)
        elif kind < 0.6 and op in ("mhc_pre", "mhc_post_pre"):
            name, value = rng.choice(BAD_HYPER)
            kw[name] = value
        elif kind < 0.7 and op in ("mhc_pre", "mhc_post_pre", "mhc_head") and args["fn"] is not None:
            args["scale"] = None  # fn without scale
        elif kind < 0.85 and op != "expand_streams":
            big = rng.choice([65, 100, 1000])  # too many streams; the other arguments stay small
            args[names[0]] = torch.randn(2, big, big if op == "sinkhorn" else 1)
        elif op == "expand_streams":
            kw["n"] = rng.choice([0, 65, 1000, 4.0, "4", None])
        else:
            args[names[0]] = torch.randn(*lead, n, 0) if op != "sinkhorn" else torch.randn(n)  # C = 0 / rank 1
    values = list(args.values())
    call = lambda: function(*values, **kw)  # noqa: E731
    if not valid:
        return Case(call, None, names)
    oracle = lambda: oracle_fn(*[_f64(v) for v in values], **_as_config(kw))  # noqa: E731
    grads = None
    if dtype in (torch.float32, torch.float64) and all(not isinstance(v, torch.Tensor) or v.is_contiguous()
                                                       and bool(torch.isfinite(v).all()) for v in values):
        grads = _grad_pairs(function, oracle_fn, values, kw)
    return Case(call, oracle, names, dtype, grads)


def _grad_pairs(function, oracle_fn, values, kw):
    """(got, want) gradient pairs of every floating tensor argument for a random cotangent of the outputs."""
    def run(_out):
        leaves = [_leaf(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in values]
        leaves64 = [_leaf(v.detach().double()) if isinstance(v, torch.Tensor) else v for v in leaves]
        got, want = _as_tuple(function(*leaves, **kw)), _as_tuple(oracle_fn(*leaves64, **_as_config(kw)))
        cot = [torch.randn(w.shape, dtype=torch.float64) for w in want]
        inputs = [v for v in leaves if isinstance(v, torch.Tensor)]
        inputs64 = [v for v in leaves64 if isinstance(v, torch.Tensor)]
        g = torch.autograd.grad([o.double() for o in got], inputs, cot, allow_unused=True)
        w = torch.autograd.grad(want, inputs64, cot, allow_unused=True)
        return [(a, b, leaf.dtype) for a, b, leaf in zip(g, w, inputs)]
    return run


def _as_config(kw: dict) -> dict:
    """The hyper-parameters as the core holds them (its config stores float32)."""
    return {k: float(torch.tensor(v, dtype=torch.float32)) if type(v) is float else v for k, v in kw.items()}


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# ---- the history ops ------------------------------------------------------------------------------------


def _history_case(rng: random.Random, op: str) -> Case:
    from mhc import history_ops as hops

    H = rng.randint(1, 6) if rng.random() < 0.9 else rng.choice([33, 64])
    shape = _lead(rng, max_rank=4) if rng.random() < 0.9 else (1, 2, 1, 2, 1, 1, 2, 1, 3)  # rank 9
    dtype = rng.choice(STREAM_DTYPES)
    storage = rng.choice([dtype, dtype, torch.float32, torch.bfloat16])
    x = torch.randn(shape).to(dtype)
    states = [torch.randn(shape).to(storage) for _ in range(H)]
    constraint = rng.choice(["simplex", "softmax", "identity"])
    kw = dict(constraint=constraint, temperature=rng.choice([1.0, 0.5, 2.0]), epsilon=rng.choice([0.0, 0.1, 1.0]))
    gate = torch.rand(rng.choice([(), (1,)])) + 0.5 if rng.random() < 0.4 else None
    if op == "project_logits":
        constraint = rng.choice(["simplex", "softmax", "identity", "doubly_stochastic"])
        square = constraint == "doubly_stochastic"
        logits = torch.randn(*_lead(rng), H, *((H,) if square else ())).to(rng.choice(STREAM_DTYPES))
        args = dict(logits=logits)
        kw = dict(constraint=constraint, temperature=kw["temperature"], epsilon=kw["epsilon"],
                  sinkhorn_iters=rng.randint(1, 25))
    elif op == "history_mix":
        rows = rng.choice([None, 1, 3])
        weights = torch.rand(*((rows,) if rows else ()), H).to(rng.choice(STREAM_DTYPES))
        with_x = rng.random() < 0.7
        x_in = torch.randn(((rows,) if rows else ()) + tuple(shape)).to(dtype) if with_x else None
        args = dict(x=x_in, states=states, weights=weights)
        kw = dict(gate=gate)
    else:
        args = dict(x=x, states=states, logits=torch.randn(H).to(rng.choice(STREAM_DTYPES)))
        kw = dict(kw, gate=gate)
    names = list(args) + list(kw) + [f"states[{k}]" for k in range(H)]
    valid = rng.random() < 0.55
    if valid:
        for name, value in args.items():
            if isinstance(value, torch.Tensor):
                args[name] = _layout(rng, value)
        if rng.random() < 0.1 and args.get("x") is not None:
            args["x"] = _non_finite(rng, args["x"])
    else:
        kind = rng.random()
        tensors = [k for k, v in args.items() if isinstance(v, torch.Tensor)]
        if kind < 0.4:
            name = rng.choice(tensors)
            single = op == "project_logits"  # one tensor, whose shape is free: meta and other shapes are valid
            args[name] = _bad_tensor(rng, args[name], ["dtype", "list"] + ([] if single else ["meta", "shape"]))
        elif kind < 0.55 and "states" in args:
            k = rng.randrange(H)
            args["states"] = list(states)
            free = H == 1 and args.get("x") is None  # a lone state fixes its own shape and device
            args["states"][k] = _bad_tensor(rng, states[k], ["dtype", "list"] + ([] if free else ["meta", "shape"]))
        elif kind < 0.65 and "states" in args:
            args["states"] = rng.choice([[], 3, [torch.randn(shape)] * 65])
        elif kind < 0.75 and "gate" in kw:
            kw["gate"] = rng.choice([torch.ones(3), torch.ones(1, dtype=torch.int32), torch.ones(1, device="meta")])
        elif kind < 0.9:
            name, value = rng.choice([("temperature", 0.0), ("temperature", float("nan")), ("epsilon", 1.5),
                                      ("constraint", "orthogonal"), ("constraint", 3)]
                                     + ([("sinkhorn_iters", 0)] if op == "project_logits" else []))
            kw[name] = value
            if op == "history_mix":
                return Case(lambda: hops.project_logits(torch.randn(H), **{name: value}), None, [name])
        else:
            big = rng.choice([65, 1000])
            if op == "project_logits":
                args["logits"] = torch.randn(2, big)
            elif op == "history_mix":
                args["weights"] = torch.rand(big, H)
            else:
                args["logits"] = torch.randn(H + 1)
    values = list(args.values())
    function = getattr(hops, op)
    call = lambda: function(*values, **kw)  # noqa: E731
    if not valid:
        return Case(call, None, names)

    def oracle():
        v64 = [_f64(v) for v in values]
        if op == "project_logits":
            return hops.reference_project_logits(*v64, **kw)
        if op == "history_mix":
            return hops.reference_history_mix(*v64, gate=_f64(kw["gate"]))
        x64, states64, logits64 = v64
        w = hops.reference_project_logits(logits64, kw["constraint"], temperature=kw["temperature"],
                                          epsilon=kw["epsilon"])
        return hops.reference_history_mix(x64, states64, w, gate=_f64(kw["gate"])), w

    out_dtype = values[0].dtype if op == "project_logits" else dtype if args.get("x") is not None else storage
    return Case(call, oracle, names, out_dtype)


# ---- modules --------------------------------------------------------------------------------------------


MODULE_NAMES = ["n", "C", "x", "history", "mode", "impl", "io", "residual", "max_history", "constraint", "temperature",
                "sinkhorn_iters", "table", "modules", "states", "fn", "base", "scale", "y", "h_post", "comb", "logits",
                "weights", "gate"] + [f"states[{k}]" for k in range(8)]

BAD_CONSTRUCTION = {
    "MHC": [("n", 0), ("n", 65), ("n", 4.0), ("C", 0), ("C", "8"), ("impl", "numpy")],
    "MHCLayer": [("n", 0), ("C", -1)],
    "MHCHead": [("n", 0), ("mode", "max"), ("C", 2.5)],
    "StreamExpand": [("n", 0), ("n", 1000), ("impl", "x")],
    "MHCRewire": [("io", "auto"), ("io", "both"), ("n", 65), ("residual", "yes")],
    "MHCSequential": [("max_history", 0), ("max_history", 65), ("temperature", 0.0), ("constraint", "orthogonal")],
    "MHCSkip": [("max_history", 0), ("max_history", 2.5), ("temperature", -1.0), ("constraint", "x")],
    "MatrixMHCSkip": [("max_history", 0), ("max_history", 65), ("temperature", float("nan")), ("sinkhorn_iters", 0)],
}


def _module_case(rng: random.Random, kind: str) -> Case:
    """A module built with random valid arguments, called on a random input; or one bad argument or input."""
    import mhc
    from torch import nn

    n, C = rng.choice([1, 2, 3, 4, 6]), rng.choice([1, 3, 8, 12])
    lead = _lead(rng, max_rank=2)
    dtype = rng.choice(STREAM_DTYPES)
    tolerance = None
    ctor, streams = {}, True  # streams: the input is [..., n, C] (else [..., C])
    if kind == "MHC":
        ctor = dict(static=rng.random() < 0.3, iters=rng.randint(1, 20), impl=rng.choice(["fused", "torch"]))

        def use(m, x):
            layer_input, state = m.pre(x)
            return m.post(x, torch.tanh(layer_input), state), state.comb
    elif kind in ("MHCHead", "StreamExpand", "MHCLayer"):
        ctor = dict(mode=rng.choice(["learned", "mean"])) if kind == "MHCHead" else {}
        streams = kind != "StreamExpand"
        use = lambda m, x: m(x)  # noqa: E731
    elif kind == "MHCRewire":
        ctor = dict(io=rng.choice(["plain", "streams"]), static=rng.random() < 0.3)
        if ctor["io"] == "plain":
            ctor["residual"] = rng.random() < 0.5
        streams = ctor["io"] == "streams"
        use = lambda m, x: m(x)  # noqa: E731
    elif kind == "MHCSequential":
        depth = rng.randint(1, 4)
        ctor = dict(max_history=rng.randint(1, 5), use_gating=rng.random() < 0.3,
                    constraint=rng.choice(["simplex", "softmax", "identity", "doubly_stochastic"]),
                    history_dtype=rng.choice([None, torch.bfloat16]))
        streams = False
        use = lambda m, x: m(x)  # noqa: E731
    else:  # the skips take x and a list of states
        H = rng.randint(1, 5)
        available = H if kind == "WeightedSum" else rng.randint(1, H)
        if kind == "MHCSkip":
            ctor = dict(max_history=H, constraint=rng.choice(["simplex", "softmax", "identity"]),
                        use_gating=rng.random() < 0.3)
        elif kind == "MatrixMHCSkip":
            ctor = dict(max_history=H, sinkhorn_iters=rng.randint(1, 20))
        streams = False
        state_values = [torch.randn(*lead, C) for _ in range(available)]

        def use(m, x):
            floating = isinstance(x, torch.Tensor) and x.is_floating_point()
            return m(x, [s.to(x.dtype) for s in state_values] if floating else state_values)
    if kind in ("MHCLayer", "MHCRewire", "MHCSequential"):  # torch's own layers inside: one dtype throughout
        dtype = rng.choice([torch.float32, torch.float64])
    if kind == "MHCSequential" and ctor["history_dtype"] is not None:
        tolerance = torch.bfloat16  # the oracle's float64 states round to other bf16 neighbours

    def make(**overrides):
        kw = dict(ctor, **overrides)
        size = dict(n=kw.pop("n", n), C=kw.pop("C", C))
        if kind == "MHC":
            return mhc.MHC(size["n"], size["C"], **kw)
        if kind == "MHCLayer":
            return mhc.MHCLayer(size["n"], size["C"], **kw)
        if kind == "MHCHead":
            return mhc.MHCHead(size["n"], size["C"], **kw)
        if kind == "StreamExpand":
            return mhc.StreamExpand(size["n"], **kw)
        if kind == "MHCRewire":
            return mhc.MHCRewire(nn.Linear(C, C), C, size["n"], **kw)
        if kind == "MHCSequential":
            return mhc.MHCSequential(*[nn.Sequential(nn.Linear(C, C), nn.Tanh()) for _ in range(depth)], **kw)
        if kind == "MHCSkip":
            return mhc.MHCSkip(**kw)
        if kind == "MatrixMHCSkip":
            return mhc.MatrixMHCSkip(**kw)
        return mhc.WeightedSum(kw.get("table", torch.rand(H)))

    shape = (*lead, n, C) if streams else (*lead, C)
    if kind == "MHCLayer":  # [B, n, C] or [B, S, n, C]
        shape = (rng.randint(1, 3), *lead[:1], n, C)
    if rng.random() < 0.55:  # valid
        module = make()
        if kind in ("MHC", "MHCLayer", "MHCHead", "MHCRewire"):
            _randomise(module, rng)
        if kind in ("MHCLayer", "MHCRewire", "MHCSequential"):
            module.to(dtype)
        x = _layout(rng, torch.randn(*shape).to(dtype))

        def call():
            with torch.no_grad():
                return use(module, x)

        def oracle():
            twin = copy.deepcopy(module).double()
            with torch.no_grad(), mhc.ops.use_backend("reference"):
                return use(twin, x.double())
        return Case(call, oracle, MODULE_NAMES, tolerance or dtype)
    if rng.random() < 0.5:  # a bad construction argument
        if kind == "WeightedSum":
            table = rng.choice([torch.tensor([0.5, float("nan")]), torch.ones(2, 3), torch.tensor([1, 0]), [0.5, 0.5]])
            return Case(lambda: make(table=table), None, MODULE_NAMES)
        name, value = rng.choice(BAD_CONSTRUCTION[kind])
        return Case(lambda: make(**{name: value}), None, MODULE_NAMES)
    module = make()
    if kind in ("MHCSkip", "MatrixMHCSkip", "WeightedSum") and rng.random() < 0.3:
        history = rng.choice([5, torch.tensor(1.0), [], "h"])
        return Case(lambda: module(torch.randn(*shape), history), None, MODULE_NAMES)
    # a bad input: the dim the module fixes, a non-floating dtype, a meta tensor among CPU parameters, a list.
    # (StreamExpand takes any width; parameter-free modules run meta inputs; MHCSequential's blocks are the user's.)
    kinds = ["dtype", "list"] + (["shape"] if kind not in ("StreamExpand", "MHCSequential") else [])
    kinds += ["meta"] if kind not in ("StreamExpand", "MHCSequential") and not (
        kind == "MHCHead" and ctor["mode"] == "mean") else []
    bad = rng.choice(kinds)
    x = torch.randn(*shape).to(dtype)
    if bad == "shape":
        x = torch.randn(*shape[:-2], n + 1, C) if streams else torch.randn(*shape[:-1], C + 1)
    elif bad == "dtype":
        x = x.to(rng.choice(BAD_DTYPES))
    elif bad == "meta":
        x = x.to("meta")
    else:
        x = x.tolist() if x.numel() < 30 else 2.0
    return Case(lambda: use(module, x), None, MODULE_NAMES)


def _randomise(module, rng):
    """Parameters away from the initialisation, so every coefficient path matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape) * (p.shape[-1] ** -0.5 if p.dim() == 2 else 1.0))


FAMILIES = {
    **{op: (lambda op: lambda rng: _nstream_case(rng, op))(op)
       for op in ("mhc_pre", "mhc_post", "mhc_post_pre", "mhc_head", "residual_add_agg", "sinkhorn", "expand_streams")},
    **{op: (lambda op: lambda rng: _history_case(rng, op))(op)
       for op in ("project_logits", "history_mix", "history_skip")},
    **{kind: (lambda kind: lambda rng: _module_case(rng, kind))(kind)
       for kind in ("MHC", "MHCLayer", "MHCHead", "StreamExpand", "MHCRewire", "MHCSequential", "MHCSkip",
                    "MatrixMHCSkip", "WeightedSum")},
}


# ---- verdicts -------------------------------------------------------------------------------------------


def _compare(got, want, dtype) -> Optional[str]:
    got, want = _as_tuple(got), _as_tuple(want)
    if len(got) != len(want):
        return f"{len(got)} outputs, the oracle has {len(want)}"
    tol = TOL[dtype]
    for i, (g, w) in enumerate(zip(got, want)):
        if tuple(g.shape) != tuple(w.shape):
            return f"output {i}: shape {list(g.shape)}, the oracle's {list(w.shape)}"
        g = g.double()
        finite = torch.isfinite(w)
        if not torch.equal(torch.isfinite(g), finite):
            return f"output {i}: non-finite elements where the oracle has finite ones (or the reverse)"
        err = (g[finite] - w[finite]).abs()
        if err.numel() and bool((err > tol + tol * w[finite].abs()).any()):
            return f"output {i}: max error {float(err.max()):.3g} (tolerance {tol:g}, dtype {dtype})"
    return None


def _names_an_argument(message: str, names: List[str]) -> bool:
    return any(re.search(rf"(^|[\s:(]){re.escape(name)}(\[\d+\])?:", message) for name in names)


def verdict(family: str, seed: int) -> dict:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    try:
        case = FAMILIES[family](rng)
    except Exception as error:  # noqa: BLE001 - a bug of this file, reported as such
        return dict(family=family, seed=seed, valid=None, verdict="case_not_built", detail=repr(error)[:300])
    result = dict(family=family, seed=seed, valid=case.oracle is not None)
    try:
        out = case.call()
    except (ValueError, TypeError, RuntimeError) as error:
        message = f"{type(error).__name__}: {error}"
        if case.oracle is not None:
            return dict(result, verdict="false_rejection", detail=message[:300])
        ok = _names_an_argument(str(error), case.names)
        return dict(result, verdict="ok" if ok else "unclear_error", detail=message[:300])
    except Exception as error:  # noqa: BLE001 - any other type is the finding
        return dict(result, verdict="unclear_error", detail=f"{type(error).__name__}: {error}"[:300])
    if case.oracle is None:
        return dict(result, verdict="accepted_invalid", detail="returned")
    try:
        problem = _compare(out, case.oracle(), case.dtype)
        pairs = case.grads(out) if problem is None and case.grads is not None else []
    except Exception as error:  # noqa: BLE001 - the oracle itself failed on a valid call
        return dict(result, verdict="oracle_failed", detail=f"{type(error).__name__}: {error}"[:300])
    for i, (g, w, leaf_dtype) in enumerate(pairs):
        tol = max(TOL[case.dtype], TOL[leaf_dtype])  # a gradient comes back in its argument's dtype
        g = torch.zeros_like(w) if g is None and w is not None else g
        w = torch.zeros_like(g) if w is None and g is not None else w
        if g is not None and float((g.double() - w).norm()) > tol * (float(w.norm()) + 1.0):
            problem = f"gradient {i}: error {float((g.double() - w).norm()):.3g} (norm {float(w.norm()):.3g})"
            break
    return dict(result, verdict="ok" if problem is None else "wrong_result", detail=problem or "")


def _worker() -> None:
    torch.set_num_threads(1)
    for line in sys.stdin:
        family, seed = json.loads(line)
        print(json.dumps(["start", family, seed]), flush=True)
        print(json.dumps(verdict(family, seed)), flush=True)


# ---- the test -------------------------------------------------------------------------------------------


def _cases() -> List[tuple]:
    rng = random.Random(SEED)
    return [(family, rng.randrange(2 ** 31)) for family in sorted(FAMILIES) for _ in range(CASES_PER_FAMILY)]


def _run_batches(cases: List[tuple]) -> List[dict]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    batches = [cases[i::BATCHES] for i in range(BATCHES)]
    results: List[dict] = []
    for pair in (batches[i:i + 2] for i in range(0, BATCHES, 2)):
        procs = [subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for _ in pair]
        for proc, batch in zip(procs, pair):
            try:
                stdout, stderr = proc.communicate("".join(json.dumps(c) + "\n" for c in batch),
                                                  timeout=BATCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
                stderr = f"timed out after {BATCH_TIMEOUT_S} s\n{stderr}"
            lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
            results += [line for line in lines if isinstance(line, dict)]
            finished = {(r["family"], r["seed"]) for r in results}
            started = [tuple(line[1:]) for line in lines if isinstance(line, list)]
            if proc.returncode != 0 or len(finished & set(map(tuple, batch))) < len(batch):
                last = started[-1] if started else None
                results.append(dict(family=last[0] if last else "?", seed=last[1] if last else -1, valid=None,
                                    verdict="crash", detail=f"exit {proc.returncode}: {stderr[-400:]}"))
    return results


def test_fuzz_public_ops_and_modules():
    results = _run_batches(_cases())
    tally = Counter((r["valid"], r["verdict"]) for r in results)
    bad = [r for r in results if r["verdict"] != "ok"]
    summary = (f"{len(results)} cases: {tally[(True, 'ok')]} valid calls matched the fp64 oracle, "
               f"{tally[(False, 'ok')]} invalid ones raised naming an argument")
    print(summary)
    details = "\n".join(f"  {r['verdict']}: python {__file__} {r['family']} {r['seed']}  # {r['detail']}"
                        for r in bad[:25])
    assert not bad, f"{summary}; {len(bad)} findings:\n{details}"
    assert tally[(True, "ok")] > len(results) // 3 and tally[(False, "ok")] > len(results) // 4


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker()
    else:
        print(json.dumps(verdict(sys.argv[1], int(sys.argv[2])), indent=1))
