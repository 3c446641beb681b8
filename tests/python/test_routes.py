"""The two routes of an op call (mhc._plumbing.Op): plain eager calls go straight to the kernels, everything else
dispatches torch.ops.mhc. Both must give the same bits, forward and backward, and each must be taken when it should."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mhc
from mhc import history_ops as hops
from mhc import ops


class _Passthrough(TorchDispatchMode):
    """Any active dispatch mode sends calls down the dispatch route; this one changes nothing else."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _cases(dtype):
    g = torch.Generator().manual_seed(7)
    n, C, T = 4, 19, 5
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=dt)  # noqa: E731
    site, nxt = mhc.MHC(n, C).to(torch.float64 if dtype == torch.float64 else torch.float32), mhc.MHC(n, C)
    head = mhc.MHCHead(n, C)
    k = torch.float64 if dtype == torch.float64 else torch.float32
    h_post, comb = torch.rand(T, n, generator=g, dtype=k) * 2, torch.rand(T, n, n, generator=g, dtype=k)
    return {
        "pre": (lambda x: ops.mhc_pre(x, site.fn, site.base, site.scale), (r(T, n, C),)),
        "post": (lambda x, y: ops.mhc_post(x, y, h_post, comb), (r(T, n, C), r(T, C))),
        "post_pre": (lambda x, y: ops.mhc_post_pre(x, y, h_post, comb, nxt.fn.to(k), nxt.base.to(k),
                                                     nxt.scale.to(k)), (r(T, n, C), r(T, C))),
        "sinkhorn": (lambda logits: ops.sinkhorn(logits), (r(T, n, n, dt=k),)),
        "expand": (lambda x: ops.expand_streams(x, n), (r(2, 3, C),)),
        "head": (lambda x: ops.mhc_head(x, head.fn.to(k), head.base.to(k), head.scale.to(k)), (r(T, n, C),)),
        "residual_add_agg": (lambda x, res: ops.residual_add_agg(x, res, h_post), (r(T, n, C), r(T, n, C))),
    }


def _history_cases(dtype):
    g = torch.Generator().manual_seed(11)
    H, shape = 3, (5, 7)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=dt)  # noqa: E731
    k = torch.float64 if dtype == torch.float64 else torch.float32
    gate, w, w2 = r(1, dt=k), torch.rand(H, generator=g, dtype=k), torch.rand(2, H, generator=g, dtype=k)
    return {
        "project_logits": (lambda z: hops.project_logits(z, "simplex"), (r(4, H, dt=k),)),
        "project_logits_sinkhorn": (lambda z: hops.project_logits(z, "doubly_stochastic"), (r(2, H, H, dt=k),)),
        "history_mix": (lambda x, s0, s1, s2: hops.history_mix(x, [s0, s1, s2], w, gate=gate),
                        (r(*shape), r(*shape), r(*shape), r(*shape))),
        "history_mix_matrix": (lambda s0, s1, s2: hops.history_mix(None, [s0, s1, s2], w2),
                               (r(*shape), r(*shape), r(*shape))),
        "history_mix_detached": (lambda x, s0: hops.history_mix(x, [s0, s0.detach() * 2, s0.detach()], w),
                                 (r(*shape), r(*shape))),
        "history_skip": (lambda x, z, s0, s1, s2: hops.history_skip(x, [s0, s1, s2], z, constraint="softmax",
                                                                    gate=gate)[0],
                         (r(*shape), r(H, dt=k), r(*shape), r(*shape), r(*shape))),
        "history_skip_detached": (lambda x, z, s0: hops.history_skip(x, [s0, s0.detach(), s0.detach() * 3], z,
                                                                     constraint="identity")[0],
                                  (r(*shape), r(H, dt=k), r(*shape))),
    }


def _run(fn, inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)).sum()
               for o in outs)
    loss.backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", list(_cases(torch.float32)))
def test_eager_and_dispatch_routes_give_the_same_bits(name, dtype):
    _assert_routes_give_the_same_bits(name, *_cases(dtype)[name])


def _assert_routes_give_the_same_bits(name, fn, inputs):
    eager = _run(fn, inputs)
    with _Passthrough():
        dispatched = _run(fn, inputs)
    assert len(eager) == len(dispatched)
    for a, b in zip(eager, dispatched):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", list(_history_cases(torch.float32)))
def test_history_eager_and_dispatch_routes_give_the_same_bits(name, dtype):
    _assert_routes_give_the_same_bits(name, *_history_cases(dtype)[name])


def _count_dispatches(monkeypatch, op):
    calls = []
    original = op.dispatch
    monkeypatch.setattr(op, "dispatch", lambda *a: calls.append(1) or original(*a))
    return calls


def test_plain_eager_calls_skip_the_dispatcher(monkeypatch):
    calls = _count_dispatches(monkeypatch, ops._pre_op)
    site = mhc.MHC(4, 8)
    x = torch.randn(2, 4, 8, requires_grad=True)
    site.pre(x)[0].sum().backward()
    with torch.no_grad():
        site.pre(x)
    assert calls == [] and x.grad is not None


def test_plain_eager_history_calls_skip_the_dispatcher(monkeypatch):
    calls = []
    for name in ("_mix_op", "_mix_backward_op", "_skip_op", "_skip_backward_op"):
        original = getattr(hops, name)
        monkeypatch.setattr(hops, name, lambda *a, _op=original: calls.append(_op) or _op(*a))
    projections = _count_dispatches(monkeypatch, hops._project_op)
    x, logits = torch.randn(2, 8, requires_grad=True), torch.randn(3, requires_grad=True)
    states = [torch.randn(2, 8, requires_grad=True), torch.randn(2, 8), torch.randn(2, 8)]
    weights = hops.project_logits(logits, "softmax")
    hops.history_mix(x, states, weights).sum().backward()
    hops.history_skip(x, states, logits)[0].sum().backward()
    with torch.no_grad():
        hops.history_mix(x, states, weights)
        hops.history_skip(x, states, logits)
    assert calls == [] and projections == [] and states[0].grad is not None and logits.grad is not None


def test_modes_meta_and_compile_take_the_dispatch_route(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    calls = _count_dispatches(monkeypatch, ops._pre_op)
    site = mhc.MHC(4, 8)
    x = torch.randn(2, 4, 8)
    with FlopCounterMode(display=False):
        site.pre(x)
    assert len(calls) == 1
    out = ops.mhc_pre(x.to("meta"), site.fn.to("meta"), site.base.to("meta"), site.scale.to("meta"))[0]
    assert out.is_meta and len(calls) == 2
    compiled = torch.compile(lambda t: site.pre(t)[0], backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), site.pre(x)[0])


def test_bindings_take_named_fields_and_reject_unknown_ones():
    from mhc import _C

    logits = torch.randn(3, 4, 4)
    comb = torch.full_like(logits, float("nan"))
    cfg = _C.Config(n=4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'comb_out'"):
        _C.sinkhorn_forward(logits=logits, comb_out=comb, config=cfg)
    with pytest.raises(TypeError, match="config"):
        _C.sinkhorn_forward(logits=logits, comb=comb)
    with pytest.raises(TypeError, match="logits: expected a tensor"):
        _C.sinkhorn_forward(logits=[1.0], comb=comb, config=cfg)
    with pytest.raises(ValueError, match="comb"):  # a missing field is absent; the front end names it
        _C.sinkhorn_forward(logits=logits, config=cfg)
    _C.sinkhorn_forward(logits=logits, comb=comb, config=cfg)
    assert torch.equal(comb, ops.sinkhorn(logits))


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from /proc")
def test_kernel_calls_do_not_leak_their_string_arguments():
    # torch's stable-ABI conversion of a str argument leaked 48 bytes a call (torch_ops.cpp, Str): 10 MB here.
    def resident_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    logits = torch.rand(1, 2, 2)
    for _ in range(2000):
        ops._sinkhorn_op.kernel(logits, 2, 1e-6, "auto")
    growth = []
    for _ in range(2):  # a leak grows the resident set every round; the allocator's own growth (after many other
        before = resident_mib()  # tests in the process) shows once
        for _ in range(200_000):
            ops._sinkhorn_op.kernel(logits, 2, 1e-6, "auto")
        growth.append(resident_mib() - before)
    assert min(growth) < 3, growth
