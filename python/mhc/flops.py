"""FLOP formulas of every ``torch.ops.mhc`` custom op, registered with ``torch.utils.flop_counter``.

``FlopCounterMode`` then counts the mhc ops next to torch's own (forward and backward). The counts are the
arithmetic of the math, a multiply-add being 2 FLOPs as in torch's matmul formula; copies are free, and a
weight that is exactly 0 still counts (the kernels skip such states, the nominal count does not). Per token
(``x [T, n, C]``, ``m = n*n + 2n``, ``nC = n*C``) and with ``S(n) = (4 iters + 3) n^2`` for a Sinkhorn of
``iters`` iterations (softmax, then a row and a column normalisation per iteration):

==========================  ==================================================
op                          FLOPs per token (static mode: no ``fn`` terms)
==========================  ==================================================
pre                         ``2 m nC`` (projection) + ``4 nC`` (RMS, aggregation) + ``S(n)``
pre_backward                ``4 m nC + 8 nC + 2 S(n)``
post                        ``2 n nC + 2 nC``
post_backward               ``4 n nC + 4 nC``
post_pre                    post + pre
sinkhorn / backward         ``S(n)`` / ``2 S(n)`` per matrix
expand_streams / backward   0 / ``(n - 1) C``
head / backward             ``2 n nC + 4 nC`` / ``4 n nC + 8 nC``
residual_add_agg / backward ``3 nC`` / ``4 nC``
==========================  ==================================================

History ops, with ``N`` elements per state, ``H`` states and ``R`` rows of weights (1 for vector weights):
``project_logits`` costs ``4 H`` per row (``S(H)`` per matrix for doubly_stochastic), its backward twice that;
``history_mix`` ``R N (2 H + 1)`` (``+ R N`` with a gate), its backward ``2 R H N`` for the weights (and the gate)
plus ``2 R H N`` when the states need gradients (``2 R N`` per state that needs one for the eager route's
``*_per_state_backward``); ``history_skip`` is the projection plus the mix with ``R = 1``.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

__all__ = ["sinkhorn_flops"]

mhc = torch.ops.mhc


def sinkhorn_flops(n: int, iters: int) -> int:
    """FLOPs of one Sinkhorn normalisation of an ``n x n`` matrix."""
    return (4 * iters + 3) * n * n


def _site(x_shape, fn_shape, iters: int) -> int:
    T, n, C = x_shape
    m = n * n + 2 * n
    projection = 2 * m * n * C if fn_shape is not None else 0
    return T * (projection + 4 * n * C + sinkhorn_flops(n, iters))


def _post(x_shape) -> int:
    T, n, C = x_shape
    return T * (2 * n * n * C + 2 * n * C)


@register_flop_formula(mhc.pre)
def _pre(x, fn, base, scale, iters, *args, out_shape=None, **kwargs) -> int:
    return _site(x, fn, iters)


@register_flop_formula(mhc.pre_backward)
def _pre_backward(x, fn, base, scale, mixes, rstd, grad_layer_input, grad_h_pre, grad_h_post, grad_comb,
                  grad_x_accum, iters, *args, out_shape=None, **kwargs) -> int:
    T, n, C = x
    m = n * n + 2 * n
    projection = 4 * m * n * C if fn is not None else 0
    return T * (projection + 8 * n * C + 2 * sinkhorn_flops(n, iters))


@register_flop_formula(mhc.post)
def _post_formula(x, *args, out_shape=None, **kwargs) -> int:
    return _post(x)


@register_flop_formula(mhc.post_backward)
def _post_backward(grad_x_next, *args, out_shape=None, **kwargs) -> int:
    return 2 * _post(grad_x_next)


@register_flop_formula(mhc.post_pre)
def _post_pre(x, y, h_post, comb, fn, base, scale, iters, *args, out_shape=None, **kwargs) -> int:
    return _post(x) + _site(x, fn, iters)


@register_flop_formula(mhc.sinkhorn)
def _sinkhorn(logits, iters, *args, out_shape=None, **kwargs) -> int:
    T, n, _ = logits
    return T * sinkhorn_flops(n, iters)


@register_flop_formula(mhc.sinkhorn_backward)
def _sinkhorn_backward(logits, grad_comb, iters, *args, out_shape=None, **kwargs) -> int:
    T, n, _ = logits
    return 2 * T * sinkhorn_flops(n, iters)


@register_flop_formula(mhc.expand_streams)
def _expand(x, n, *args, out_shape=None, **kwargs) -> int:
    return 0  # copies


@register_flop_formula(mhc.expand_streams_backward)
def _expand_backward(grad_out, *args, out_shape=None, **kwargs) -> int:
    T, n, C = grad_out
    return T * (n - 1) * C


@register_flop_formula(mhc.head)
def _head(x, fn, *args, out_shape=None, **kwargs) -> int:
    T, n, C = x
    projection = 2 * n * n * C if fn is not None else 0
    return T * (projection + 4 * n * C)


@register_flop_formula(mhc.head_backward)
def _head_backward(x, fn, *args, out_shape=None, **kwargs) -> int:
    T, n, C = x
    projection = 4 * n * n * C if fn is not None else 0
    return T * (projection + 8 * n * C)


@register_flop_formula(mhc.residual_add_agg)
def _residual_add_agg(x, *args, out_shape=None, **kwargs) -> int:
    return 3 * math.prod(x)


@register_flop_formula(mhc.residual_add_agg_backward)
def _residual_add_agg_backward(grad_x_out, grad_agg, x_out, *args, out_shape=None, **kwargs) -> int:
    return 4 * math.prod(x_out)


def _projection(logits, constraint: str, sinkhorn_iters: int) -> int:
    if constraint == "doubly_stochastic":
        H = logits[-1]
        return math.prod(logits[:-2]) * sinkhorn_flops(H, sinkhorn_iters)
    return 4 * math.prod(logits)


@register_flop_formula(mhc.project_logits)
def _project(logits, constraint, temperature, epsilon, sinkhorn_iters, *args, out_shape=None, **kwargs) -> int:
    return _projection(logits, constraint, sinkhorn_iters)


@register_flop_formula(mhc.project_logits_backward)
def _project_backward(logits, weights, grad_weights, constraint, temperature, epsilon, sinkhorn_iters, *args,
                      out_shape=None, **kwargs) -> int:
    return 2 * _projection(logits, constraint, sinkhorn_iters)


def _mix(states, weights, gate) -> int:
    rows = weights[0] if len(weights) == 2 else 1
    N = math.prod(states[0])
    return rows * N * (2 * len(states) + 1 + (gate is not None))


def _mix_backward(states, weights, need_states) -> int:
    """need_states: one flag for every state, or one per state (the *_per_state_backward ops)."""
    rows = weights[0] if len(weights) == 2 else 1
    needed = sum(map(bool, need_states)) if isinstance(need_states, (list, tuple)) else len(states) * bool(need_states)
    return 2 * rows * (len(states) + needed) * math.prod(states[0])


@register_flop_formula(mhc.history_mix)
def _history_mix(x, states, weights, gate, *args, out_shape=None, **kwargs) -> int:
    return _mix(states, weights, gate)


@register_flop_formula([mhc.history_mix_backward, mhc.history_mix_per_state_backward])
def _history_mix_backward(grad_out, states, weights, gate, need_states, *args, out_shape=None, **kwargs) -> int:
    return _mix_backward(states, weights, need_states)


@register_flop_formula(mhc.history_skip)
def _history_skip(x, states, logits, gate, constraint, *args, out_shape=None, **kwargs) -> int:
    return _projection(logits, constraint, 0) + _mix(states, logits, gate)


@register_flop_formula([mhc.history_skip_backward, mhc.history_skip_per_state_backward])
def _history_skip_backward(grad_out, states, logits, weights, gate, need_states, constraint, *args,
                           out_shape=None, **kwargs) -> int:
    return 2 * _projection(logits, constraint, 0) + _mix_backward(states, logits, need_states)
