"""One site's pre and post on the same x (mhc.ops, "grad_x written once"): post's grad_x reaches pre's backward as
grad_x_accum instead of being added by autograd. Same gradients as the unpaired path, fp64 gradcheck, the fallbacks
(another x, a second post, a partial backward), checkpoint and torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import mhc
from mhc import ops
from mhc import reference as ref
from conftest import TARGETS, TOL, assert_close, coef, site_params

HYPER = dict(iters=7, post_mult=1.5, eps=1e-5, norm_eps=1e-4, pre_eps=1e-3)


class OpLog(TorchDispatchMode):
    """The ops a region dispatches, with their arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))

    def pre_backward_accums(self):
        return [args[10] is not None for func, args in self.calls if func is torch.ops.mhc.pre_backward.default]

    def stream_adds(self, numel):
        """Additions of two residual-sized tensors (autograd's sum of the gradients of one x)."""
        adds = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
        return sum(1 for func, args in self.calls if func in adds and args[0].numel() == numel)


def site_step(lib, x, params, next_params, weight, fused: bool):
    """pre -> F (a fixed linear map of the layer input) -> post (or post_pre into a second site) on the same x."""
    fn, base, scale, proj = params
    layer_input, h_pre, h_post, comb = lib.mhc_pre(x, fn, base, scale, **HYPER)
    y = layer_input @ proj
    if fused:
        outs = lib.mhc_post_pre(x, y, h_post, comb, *next_params, **HYPER)
        return sum((o.double() * w).sum() for o, w in zip(outs, weight))
    return (lib.mhc_post(x, y, h_post, comb).double() * weight[0]).sum() + (h_pre.double() * weight[2]).sum()


def make_inputs(n, C, lead, dtype, static=False, device="cpu"):
    k = coef(dtype)
    x = torch.randn(*lead, n, C, dtype=dtype, device=device)
    params = (*site_params(n, C, dtype=k, static=static, device=device),
              torch.randn(C, C, dtype=dtype, device=device) / C ** 0.5)
    next_params = site_params(n, C, dtype=k, static=static, device=device)
    shapes = [(*lead, n, C), (*lead, C), (*lead, n), (*lead, n), (*lead, n, n)]
    weight = [torch.randn(s, dtype=torch.float64, device=device) for s in shapes]
    return x, params, next_params, weight


def grads(lib, x, params, next_params, weight, fused, *, log=None):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, *params, *next_params)]
    loss = site_step(lib, leaves[0], leaves[1:5], leaves[5:], weight, fused)
    with log if log is not None else torch.enable_grad():
        loss.backward()
    return [t.grad for t in leaves if t is not None and t.grad is not None]


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("fused", [False, True], ids=["post", "post_pre"])
@pytest.mark.parametrize("n, C, lead, static", [(4, 33, (2, 3), False), (1, 5, (3,), False), (3, 7, (), True),
                                                (8, 9, (5,), False)])
def test_pair_writes_grad_x_once_with_the_same_gradients(device, backend, dtype, fused, n, C, lead, static,
                                                         monkeypatch):
    x, params, next_params, weight = make_inputs(n, C, lead, dtype, static, device)
    with ops.use_backend(backend):
        log = OpLog()
        paired = grads(ops, x, params, next_params, weight, fused, log=log)
        monkeypatch.setattr(ops, "_pair_sites", False)
        unpaired_log = OpLog()
        unpaired = grads(ops, x, params, next_params, weight, fused, log=unpaired_log)
    oracle = grads(ref, x.double(), [p.double() if p is not None else None for p in params],
                   [p.double() if p is not None else None for p in next_params], weight, fused)
    # This site's pre_backward gets post's grad_x (post_pre's own pre, of the next site, gets the caller's), and no
    # add over the residual is left in the backward.
    assert log.pre_backward_accums()[-1] is True
    assert unpaired_log.pre_backward_accums()[-1] is False
    assert log.stream_adds(x.numel()) == 0 and unpaired_log.stream_adds(x.numel()) == 1
    for got, want in zip(paired[1:], unpaired[1:]):  # every gradient but x's is computed the same way
        assert torch.equal(got, want)
    # x's: one rounding instead of two (pre's and post's grad_x, then their sum) in the stream dtype.
    assert_close(paired[0], unpaired[0], name="grad x, paired vs unpaired")
    if dtype == torch.bfloat16:  # relative to the largest element: the chain's 16-bit roundings add up
        scale = oracle[0].abs().max()
        torch.testing.assert_close(paired[0].double() / scale, oracle[0] / scale, rtol=2e-2, atol=2e-2)
    else:
        tol = dict(rtol=1e-8, atol=1e-8) if dtype == torch.float64 else TOL[dtype]  # a chain of ops, not one
        for got, exact in zip(paired, oracle):
            torch.testing.assert_close(got.double(), exact, **tol)


@pytest.mark.parametrize("fused", [False, True], ids=["post", "post_pre"])
def test_pair_gradcheck_fp64(fused):
    n, C = 3, 6
    x, params, next_params, weight = make_inputs(n, C, (2,), torch.float64)

    def f(x, fn, base, scale, proj, fn2, base2, scale2):
        return site_step(ops, x, (fn, base, scale, proj), (fn2, base2, scale2), weight, fused)

    leaves = [t.detach().requires_grad_() for t in (x, *params, *next_params)]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_unpaired_when_post_reads_another_x_or_a_second_time():
    n, C = 4, 16
    site = mhc.MHC(n, C)
    x = torch.randn(2, n, C, requires_grad=True)
    layer_input, state = site.pre(x)
    other = torch.randn(2, n, C, requires_grad=True)
    first = site.post(other, layer_input, state)  # not pre's x: an ordinary post
    second = site.post(x, layer_input, state)  # pre's x: the pair
    third = site.post(x, layer_input, state)  # the pair is taken: an ordinary post
    detached = site.post(x, layer_input, mhc.MHCState(state.h_pre, state.h_post, state.comb.detach()))
    log = OpLog()
    with log:
        (first.sum() + 2 * second.sum() + 3 * third.sum() + 4 * detached.sum()).backward()
    assert log.pre_backward_accums() == [True]
    got = [x.grad, other.grad] + [p.grad for p in site.parameters()]

    ops._pair_sites = False
    try:
        x2, other2 = x.detach().requires_grad_(), other.detach().requires_grad_()
        site.zero_grad()
        layer_input, state = site.pre(x2)
        outs = [site.post(other2, layer_input, state), site.post(x2, layer_input, state),
                site.post(x2, layer_input, state),
                site.post(x2, layer_input, mhc.MHCState(state.h_pre, state.h_post, state.comb.detach()))]
        sum((k + 1) * o.sum() for k, o in enumerate(outs)).backward()
    finally:
        ops._pair_sites = True
    for a, b in zip(got, [x2.grad, other2.grad] + [p.grad for p in site.parameters()]):
        assert_close(a, b)


def test_no_pairing_without_gradients_of_x():
    site = mhc.MHC(4, 8)
    x = torch.randn(3, 4, 8)  # the parameters take gradients, x does not
    layer_input, state = site.pre(x)
    assert not hasattr(state.comb, "_mhc_pair_link")
    site.post(x, layer_input, state).sum().backward()
    assert site.fn.grad is not None
    with torch.no_grad():
        _, state = site.pre(x.requires_grad_())
    assert not hasattr(state.comb, "_mhc_pair_link")


def test_a_partial_backward_leaves_nothing_for_the_next():
    """A backward that runs post but stops before pre (gradient of comb only) must not leak post's grad_x into a
    later backward that runs pre alone."""
    n, C = 4, 16
    site = mhc.MHC(n, C)
    with torch.no_grad():
        site.fn.normal_()
    x = torch.randn(2, n, C, requires_grad=True)
    y = torch.randn(2, C, requires_grad=True)
    layer_input, state = site.pre(x)
    out = site.post(x, y, state)
    torch.autograd.grad(out.sum(), state.comb, retain_graph=True)
    (got,) = torch.autograd.grad(layer_input.sum(), x, retain_graph=True)
    x2 = x.detach().requires_grad_()
    (want,) = torch.autograd.grad(site.pre(x2)[0].sum(), x2)
    assert torch.equal(got, want)
    # and the whole backward afterwards is the unpaired one
    (full,) = torch.autograd.grad(out.sum() + layer_input.sum(), x)
    ops._pair_sites = False
    try:
        x3 = x.detach().requires_grad_()
        li3, st3 = site.pre(x3)
        (unpaired,) = torch.autograd.grad(site.post(x3, y, st3).sum() + li3.sum(), x3)
    finally:
        ops._pair_sites = True
    assert_close(full, unpaired)


def test_retained_graph_and_checkpointed_layer():
    n, C = 4, 16
    layer = mhc.MHCLayer(n, C, sublayer=torch.nn.Linear(C, C))
    x0 = torch.randn(2, 5, n, C)

    def grads_of(forward, twice=False):
        x = x0.clone().requires_grad_()
        loss = forward(x).square().sum()
        loss.backward(retain_graph=twice)
        if twice:
            loss.backward()
        result = [x.grad] + [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        return result

    want = grads_of(layer)
    for got, w in zip(grads_of(layer, twice=True), want):
        assert torch.equal(got, 2 * w)
    for use_reentrant in (False, True):
        for got, w in zip(grads_of(lambda x: checkpoint(layer, x, use_reentrant=use_reentrant)), want):
            assert torch.equal(got, w)


def test_compiled_layer_runs_unpaired_in_one_graph(monkeypatch):
    n, C = 4, 16
    layer = mhc.MHCLayer(n, C, sublayer=torch.nn.Linear(C, C))
    x0 = torch.randn(2, 5, n, C)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = x0.clone().requires_grad_()
    compiled(x).square().sum().backward()
    monkeypatch.setattr(ops, "_pair_sites", False)
    x2 = x0.clone().requires_grad_()
    layer.zero_grad()
    layer(x2).square().sum().backward()
    assert torch.equal(x.grad, x2.grad)
