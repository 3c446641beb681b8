"""torch.utils.flop_counter counts every mhc custom op (forward and backward, both op families) by the formulas of
mhc.flops: every op of the namespace has one, and the counts under FlopCounterMode are the formulas' values."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import mhc
from mhc import ops
from mhc.flops import sinkhorn_flops

from conftest import coefficients, site_params

T, n, C, iters = 6, 4, 8, 20
m, nC = n * n + 2 * n, n * C


def _mhc_ops():
    names = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("mhc::")}
    return sorted(names)


def test_every_mhc_op_has_a_flop_formula():
    ops_found = _mhc_ops()
    assert "pre" in ops_found and "history_skip_backward" in ops_found
    missing = [name for name in ops_found if getattr(torch.ops.mhc, name) not in flop_registry]
    assert not missing, f"no FLOP formula registered for torch.ops.mhc.{missing}"


def _counts(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op).split(".")[-1]: count for op, count in counter.get_flop_counts()["Global"].items()}


def test_n_stream_ops_forward_and_backward_are_counted():
    x = torch.randn(T, n, C, requires_grad=True)
    fn, base, scale = (p.requires_grad_() for p in site_params(n, C))
    y = torch.randn(T, C, requires_grad=True)
    h_pre, h_post, comb = (t.requires_grad_() for t in coefficients((T,), n))
    head = [p.requires_grad_() for p in site_params(n, C, head=True)]

    def run():
        layer_input, *_ = ops.mhc_pre(x, fn, base, scale, iters=iters)
        x_next = ops.mhc_post(x, y, h_post, comb)
        x_out, agg = ops.residual_add_agg(x, x_next, h_pre)
        x2, *_ = ops.mhc_post_pre(x_out, layer_input, h_post, comb, fn, base, scale, iters=iters)
        out = ops.mhc_head(x2 + ops.expand_streams(agg, n), *head)
        s = ops.sinkhorn(comb, iters=iters)
        (out.sum() + s.sum()).backward()

    counts = _counts(run)
    site = T * (2 * m * nC + 4 * nC + sinkhorn_flops(n, iters))
    post = T * (2 * n * nC + 2 * nC)
    assert counts["pre"] == site
    assert counts["post"] == post
    assert counts["post_pre"] == post + site
    assert counts["residual_add_agg"] == 3 * T * nC
    assert counts["head"] == T * (2 * n * nC + 4 * nC)
    assert counts["expand_streams"] == 0 and counts["expand_streams_backward"] == T * (n - 1) * C
    assert counts["sinkhorn"] == T * sinkhorn_flops(n, iters)
    assert counts["pre_backward"] == 2 * T * (4 * m * nC + 8 * nC + 2 * sinkhorn_flops(n, iters))  # pre, post_pre
    assert counts["post_backward"] == 2 * 2 * post
    for name in ("residual_add_agg_backward", "head_backward", "sinkhorn_backward"):
        assert counts[name] > 0, name


def test_history_ops_forward_and_backward_are_counted_in_eager_mode():
    shape, H = (3, 10), 4
    x = torch.randn(*shape, requires_grad=True)
    states = [torch.randn(*shape, requires_grad=True) for _ in range(H)]
    logits = torch.randn(H, requires_grad=True)
    matrix = torch.randn(H, H, requires_grad=True)

    def run():
        out, _ = mhc.history_skip(x, states, logits, constraint="softmax")
        weights = mhc.project_logits(matrix, "doubly_stochastic", sinkhorn_iters=iters)
        mixed = mhc.history_mix(None, states, weights)
        (out.sum() + mixed.sum()).backward()

    counts = _counts(run)
    N = 30
    assert counts["history_skip"] == 4 * H + N * (2 * H + 1)
    assert counts["history_skip_backward"] == 2 * 4 * H + 2 * (2 * H * N)
    assert counts["project_logits"] == sinkhorn_flops(H, iters)
    assert counts["project_logits_backward"] == 2 * sinkhorn_flops(H, iters)
    assert counts["history_mix"] == H * N * (2 * H + 1)
    assert counts["history_mix_backward"] == 2 * (2 * H * H * N)


def test_modules_report_flops_per_module():
    model = torch.nn.Sequential(mhc.StreamExpand(n), mhc.MHCLayer(n, C), mhc.MHCHead(n, C))
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, C)).sum().backward()
    per_module = counter.get_flop_counts()
    assert sum(per_module["Sequential.1"].values()) > 0 and sum(per_module["Sequential.2"].values()) > 0
