"""torch.func over the ops: grad, jacrev and vmap(grad) (per-sample gradients) match the plain-PyTorch reference
(mhc.reference, mhc.history_ops.reference_*) in float64; forward mode is refused with a clear error (test_errors.py).

Under a torch.func transform an op runs through an autograd Function of the form torch.func accepts, with the op's
registered formula, and dispatches the op through every key (mhc._plumbing.transformable_function); vmap runs the
ops that take a list of states once per batch element (register_vmap_by_element)."""

from __future__ import annotations

import warnings

import pytest
import torch

import mhc
from mhc import history_ops, ops, reference
from conftest import site_params

F64 = dict(dtype=torch.float64)
T, n, C = 3, 2, 4


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _transforms(f, fr, arg):
    """grad, jacrev and vmap(grad) of f against those of fr."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "performance drop" note for the per-element batching
        _close(torch.func.grad(f)(arg), torch.func.grad(fr)(arg))
        _close(torch.func.jacrev(f)(arg), torch.func.jacrev(fr)(arg))
        batch = torch.randn(4, *arg.shape, **F64)
        _close(torch.func.vmap(torch.func.grad(f))(batch), torch.func.vmap(torch.func.grad(fr))(batch))


def _site_chain(impl, x, fn, base, scale, y, head_base):
    layer_input, _, h_post, comb = impl.mhc_pre(x, fn, base, scale)
    x_next = impl.mhc_post(x, y + layer_input.sin(), h_post, comb)
    return impl.mhc_head(x_next, None, head_base, None).square().sum()


@pytest.mark.parametrize("static", [False, True])
def test_site_chain(static):
    torch.manual_seed(0)
    fn, base, scale = site_params(n, C, dtype=torch.float64, static=static)
    y, head_base = torch.randn(T, C, **F64), torch.randn(n, **F64)
    x = torch.randn(T, n, C, **F64)
    _transforms(lambda x: _site_chain(ops, x, fn, base, scale, y, head_base),
                lambda x: _site_chain(reference, x, fn, base, scale, y, head_base), x)
    # with respect to the parameters
    if not static:
        _transforms(lambda fn: _site_chain(ops, x, fn, base, scale, y, head_base),
                    lambda fn: _site_chain(reference, x, fn, base, scale, y, head_base), fn)


def test_post_pre_sinkhorn_expand_residual_add_agg():
    torch.manual_seed(0)
    fn, base, scale = site_params(n, C, dtype=torch.float64)
    y, h_post, comb = torch.randn(T, C, **F64), torch.rand(T, n, **F64), torch.rand(T, n, n, **F64)
    h_pre = torch.rand(T, n, **F64)

    def post_pre(impl, x):
        x_next, layer_input, *_ = impl.mhc_post_pre(x, y, h_post, comb, fn, base, scale)
        return x_next.square().sum() + layer_input.cos().sum()

    x = torch.randn(T, n, C, **F64)
    _transforms(lambda x: post_pre(ops, x), lambda x: post_pre(reference, x), x)
    _transforms(lambda l: ops.sinkhorn(l).square().sum(), lambda l: reference.sinkhorn(l).square().sum(),
                torch.randn(T, n, n, **F64))
    _transforms(lambda e: ops.expand_streams(e, n).sin().sum(), lambda e: reference.expand_streams(e, n).sin().sum(),
                torch.randn(T, C, **F64))
    _transforms(lambda x: sum(t.square().sum() for t in ops.residual_add_agg(x, x.cos(), h_pre)),
                lambda x: sum(t.square().sum() for t in reference.residual_add_agg(x, x.cos(), h_pre)), x)


@pytest.mark.parametrize("gated", [False, True])
def test_history_ops(gated):
    torch.manual_seed(0)
    states = [torch.randn(T, C, **F64) for _ in range(3)]
    gate = torch.tensor([0.7], **F64) if gated else None
    logits = torch.tensor([0.3, -0.2, 0.1, 0.0], **F64)
    weights = torch.softmax(torch.randn(4, **F64), 0)
    project, mix = history_ops.reference_project_logits, history_ops.reference_history_mix
    x = torch.randn(T, 2, C, **F64)
    _transforms(lambda x: ops.history_mix(x[:, 0], [x[:, 1], *states], weights, gate=gate).square().sum(),
                lambda x: mix(x[:, 0], [x[:, 1], *states], weights, gate=gate).square().sum(), x)
    _transforms(lambda w: ops.history_mix(x[:, 0], [x[:, 1], *states], w, gate=gate).square().sum(),
                lambda w: mix(x[:, 0], [x[:, 1], *states], w, gate=gate).square().sum(), weights)
    for constraint in ("softmax", "identity"):  # smooth in the logits (sparsemax has kinks)
        _transforms(lambda l: ops.history_skip(x[:, 0], [x[:, 1], *states], l, constraint=constraint,
                                               gate=gate)[0].square().sum(),
                    lambda l: mix(x[:, 0], [x[:, 1], *states], project(l, constraint),
                                  gate=gate).square().sum(), logits)
    _transforms(lambda x: ops.history_skip(x[:, 0], [x[:, 1], *states], logits, gate=gate)[0].square().sum(),
                lambda x: mix(x[:, 0], [x[:, 1], *states], project(logits), gate=gate).square().sum(), x)
    _transforms(lambda l: ops.project_logits(l, "softmax").square().sum(),
                lambda l: project(l, "softmax").square().sum(), logits)


def test_per_sample_gradients_of_modules():
    # functional_call + vmap(grad): per-sample gradients of an n-stream layer and of a history stack, against a loop.
    from torch import nn
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    width = 8
    models = [
        nn.Sequential(mhc.StreamExpand(n), mhc.MHCLayer(n, width, nn.Linear(width, width)), mhc.MHCHead(n, width)),
        mhc.MHCSequential(*[nn.Linear(width, width) for _ in range(3)], max_history=3, constraint="softmax"),
    ]
    x = torch.randn(5, 2, width)
    for model in models:
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, sample):
            return functional_call(model, p, (sample[None],)).square().sum()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
        for i in range(x.shape[0]):
            model.zero_grad()
            model(x[i:i + 1]).square().sum().backward()
            for name, p in model.named_parameters():
                torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_vmap_of_a_history_stack_without_grad():
    # Under a transform the history holds references (a batched state cannot be copied into the ring).
    from torch import nn

    torch.manual_seed(0)
    model = mhc.MHCSequential(*[nn.Linear(8, 8) for _ in range(3)], max_history=3, constraint="softmax")
    x = torch.randn(5, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = torch.func.vmap(lambda sample: model(sample[None]))(x)
        torch.testing.assert_close(batched[:, 0], model(x), rtol=1e-6, atol=1e-6)
