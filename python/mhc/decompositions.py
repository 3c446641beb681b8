"""Decompositions of the n-stream custom ops (``torch.ops.mhc.*``) into plain PyTorch ops, for export.

The custom ops are opaque to exporters: ``torch.onnx.export`` met ``mhc::expand_streams`` and stopped. These
functions compute every output of each forward op (the values saved for the backward too) with the math
of :mod:`mhc.reference`, and are registered in PyTorch's decomposition table when :mod:`mhc` is imported.
The ONNX exporter (``torch.onnx.export(..., dynamo=True)``, torch's default) decomposes through that table,
so every model built from the mhc modules exports to standard ONNX operators: MatMul, Sigmoid, Softmax,
ReduceSum, Div, ... with the Sinkhorn iterations unrolled. ``torch.export.export(model, args)
.run_decompositions(mhc.decompositions.DECOMPOSITIONS)`` gives the same plain-op program for other uses.

The table is consulted by fake tensors only under symbolic shapes, where these functions give the same
output shapes and dtypes as the ops' fake implementations; torch.compile keeps the ops themselves.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch._decomp
from torch import Tensor

from . import reference
from .reference import coef_dtype

__all__ = ["DECOMPOSITIONS"]


def _projection(x: Tensor, fn: Optional[Tensor], rows: int, norm_eps: float):
    """(mixes [T, rows], rstd [T]) of x [T, n, C]; mixes are zeros in static mode, as the kernels write."""
    k = coef_dtype(x.dtype)
    flat = x.to(k).flatten(-2)
    rstd = torch.rsqrt(flat.square().mean(dim=-1) + norm_eps)
    if fn is None:
        return flat.new_zeros(flat.shape[:-1] + (rows,)), rstd
    return (flat @ fn.to(k).t()) * rstd.unsqueeze(-1), rstd


def _gate(mixes: Tensor, base: Tensor, alpha: Optional[Tensor]) -> Tensor:
    return mixes * alpha + base if alpha is not None else mixes + base


def _aggregate(x: Tensor, weights: Tensor) -> Tensor:
    return (weights.unsqueeze(-1) * x.to(weights.dtype)).sum(dim=-2).to(x.dtype)


def pre(x, fn, base, scale, iters, post_mult, eps, norm_eps, pre_eps, backend):
    n = x.shape[1]
    mixes, rstd = _projection(x, fn, n * n + 2 * n, norm_eps)
    alpha = (lambda i: scale[i]) if scale is not None else (lambda i: None)
    h_pre = torch.sigmoid(_gate(mixes[:, :n], base[:n], alpha(0))) + pre_eps
    h_post = torch.sigmoid(_gate(mixes[:, n:2 * n], base[n:2 * n], alpha(1))) * post_mult
    logits = _gate(mixes[:, 2 * n:], base[2 * n:], alpha(2)).unflatten(-1, (n, n))
    comb = reference.sinkhorn(logits, iters=iters, eps=eps)
    return _aggregate(x, h_pre), h_pre, h_post, comb, mixes, rstd


def post(x, y, h_post, comb, backend):
    return reference.mhc_post(x, y, h_post, comb)


def post_pre(x, y, h_post, comb, fn, base, scale, iters, post_mult, eps, norm_eps, pre_eps, backend):
    x_next = reference.mhc_post(x, y, h_post, comb)
    return (x_next, *pre(x_next, fn, base, scale, iters, post_mult, eps, norm_eps, pre_eps, backend))


def sinkhorn(logits, iters, eps, backend):
    return reference.sinkhorn(logits, iters=iters, eps=eps)


def expand_streams(x, n, backend):
    return reference.expand_streams(x, n)


def head(x, fn, base, scale, eps, backend):
    # The kernels' RMS epsilon of the head is the config default (1e-6); its `eps` is the weights' floor.
    mixes, rstd = _projection(x, fn, x.shape[1], 1e-6)
    weights = torch.sigmoid(_gate(mixes, base, scale[0] if scale is not None else None)) + eps
    return _aggregate(x, weights), weights, mixes, rstd


def residual_add_agg(x, res, h_pre, backend):
    return reference.residual_add_agg(x, res, h_pre)


def _table() -> Dict[torch._ops.OpOverload, Callable]:
    ops = torch.ops.mhc
    return {ops.pre.default: pre, ops.post.default: post, ops.post_pre.default: post_pre,
            ops.sinkhorn.default: sinkhorn, ops.expand_streams.default: expand_streams, ops.head.default: head,
            ops.residual_add_agg.default: residual_add_agg}


DECOMPOSITIONS: Dict[torch._ops.OpOverload, Callable] = _table()


def _torchscript_unsupported(g, *args):
    raise RuntimeError("mhc: the n-stream ops export to ONNX with the torch.export-based exporter only: "
                       "torch.onnx.export(..., dynamo=True) (needs onnxscript) or mhc.export.export_onnx")


def _register() -> None:
    table = torch._decomp.decomposition_table
    for op, fn in DECOMPOSITIONS.items():
        table.setdefault(op, fn)
        # The TorchScript exporter (dynamo=False) cannot use decompositions: say so instead of
        # "unrecognized namespace mhc".
        torch.onnx.register_custom_op_symbolic(op.name(), _torchscript_unsupported, 9)


_register()
