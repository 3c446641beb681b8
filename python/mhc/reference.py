"""Plain-PyTorch implementations of the n-stream mHC ops (docs/MATH.md section 1).

These are the oracle the tests compare the C++/CUDA ops against, and the "torch eager" and
"torch.compile" baselines of the benchmarks and the demo. They take the same arguments and return
the same values as :mod:`mhc.ops`, with autograd handled by PyTorch.

Conventions (identical to :mod:`mhc.ops`):

- ``x`` is the residual ``[..., n, C]``; any number of leading dims.
- Coefficients and parameters use float32 math (float64 when ``x`` is float64); stream outputs
  (``layer_input``, ``x_next``, ...) are stored in ``x``'s dtype.
- ``fn [n*n + 2n, n*C]``, ``base [n*n + 2n]``, ``scale [3] = (alpha_pre, alpha_post, alpha_res)``;
  the coefficient vector is laid out pre ``[0:n]``, post ``[n:2n]``, comb ``[2n + j*n + k]``.
- ``comb[..., i, o]`` is H_res transposed: ``x_next[o] = h_post[o] * y + sum_i comb[i, o] * x[i]``.
- Static mode: ``fn`` and ``scale`` are None and the coefficients come from ``base`` alone.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._checks import check_expand, check_head, check_post, check_pre, check_residual_add_agg, check_sinkhorn

__all__ = [
    "coef_dtype",
    "sinkhorn",
    "projection",
    "mhc_pre",
    "mhc_post",
    "mhc_post_pre",
    "expand_streams",
    "mhc_head",
    "residual_add_agg",
]


def coef_dtype(stream_dtype: torch.dtype) -> torch.dtype:
    """Dtype of coefficients and parameters for a stream dtype: float64 for float64, else float32."""
    return torch.float64 if stream_dtype == torch.float64 else torch.float32


def sinkhorn(logits: Tensor, *, iters: int = 20, eps: float = 1e-6) -> Tensor:
    """Sinkhorn normalisation of ``[..., n, n]`` logits into a (near) doubly stochastic matrix.

    ``comb = softmax(logits, -1) + eps; comb /= colsum + eps``, then ``iters - 1`` times
    ``{comb /= rowsum + eps; comb /= colsum + eps}``.
    """
    iters, eps = check_sinkhorn("reference.sinkhorn", logits, iters, eps)
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def projection(x: Tensor, fn: Optional[Tensor], rows: int, *, norm_eps: float = 1e-6) -> Tensor:
    """``mixes = (vec(x) @ fn^T) * rsqrt(mean(vec(x)^2) + norm_eps)`` in coefficient precision.

    ``x [..., n, C]`` -> ``[..., rows]``; zeros when ``fn`` is None (static mode).
    """
    k = coef_dtype(x.dtype)
    if fn is None:
        return x.new_zeros(x.shape[:-2] + (rows,), dtype=k)
    flat = x.to(k).flatten(-2)
    rstd = torch.rsqrt(flat.square().mean(dim=-1, keepdim=True) + norm_eps)
    return (flat @ fn.to(k).t()) * rstd


def _gate(mixes: Tensor, base: Tensor, alpha: Optional[Tensor]) -> Tensor:
    return mixes * alpha + base if alpha is not None else mixes + base


def _coefficients(x: Tensor, fn, base, scale, iters, post_mult, eps, norm_eps, pre_eps):
    n = x.shape[-2]
    k = coef_dtype(x.dtype)
    base = base.to(k)
    scale = scale.to(k) if scale is not None else None
    mixes = projection(x, fn, n * n + 2 * n, norm_eps=norm_eps)
    alpha = (lambda i: scale[i]) if scale is not None else (lambda i: None)
    h_pre = torch.sigmoid(_gate(mixes[..., :n], base[:n], alpha(0))) + pre_eps
    h_post = torch.sigmoid(_gate(mixes[..., n : 2 * n], base[n : 2 * n], alpha(1))) * post_mult
    logits = _gate(mixes[..., 2 * n :], base[2 * n :], alpha(2))
    comb = sinkhorn(logits.unflatten(-1, (n, n)), iters=iters, eps=eps)
    return h_pre, h_post, comb


def _aggregate(x: Tensor, weights: Tensor) -> Tensor:
    """``sum_i weights[i] * x[i]`` in coefficient precision, stored in x's dtype."""
    return (weights.unsqueeze(-1) * x.to(weights.dtype)).sum(dim=-2).to(x.dtype)


def mhc_pre(
    x: Tensor,
    fn: Optional[Tensor],
    base: Tensor,
    scale: Optional[Tensor],
    *,
    iters: int = 20,
    post_mult: float = 2.0,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
    pre_eps: float = 1e-6,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """mHC pre: ``x [..., n, C]`` -> ``(layer_input [..., C], h_pre [..., n], h_post [..., n], comb [..., n, n])``."""
    check_pre("reference.mhc_pre", x, fn, base, scale, iters, post_mult, eps, norm_eps, pre_eps)
    h_pre, h_post, comb = _coefficients(x, fn, base, scale, iters, post_mult, eps, norm_eps, pre_eps)
    return _aggregate(x, h_pre), h_pre, h_post, comb


def mhc_post(x: Tensor, y: Tensor, h_post: Tensor, comb: Tensor) -> Tensor:
    """mHC post: ``x_next[o] = h_post[o] * y + sum_i comb[i, o] * x[i]``, stored in x's dtype."""
    check_post("reference.mhc_post", x, y, h_post, comb)
    k = coef_dtype(x.dtype)
    mixed = torch.einsum("...io,...ic->...oc", comb.to(k), x.to(k))
    return (mixed + h_post.to(k).unsqueeze(-1) * y.to(k).unsqueeze(-2)).to(x.dtype)


def mhc_post_pre(
    x: Tensor,
    y: Tensor,
    h_post: Tensor,
    comb: Tensor,
    fn: Optional[Tensor],
    base: Tensor,
    scale: Optional[Tensor],
    *,
    iters: int = 20,
    post_mult: float = 2.0,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
    pre_eps: float = 1e-6,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """post of this site then pre of the next: ``(x_next, layer_input, h_pre, h_post, comb)``."""
    x_next = mhc_post(x, y, h_post, comb)
    pre = mhc_pre(x_next, fn, base, scale, iters=iters, post_mult=post_mult, eps=eps, norm_eps=norm_eps,
                  pre_eps=pre_eps)
    return (x_next, *pre)


def expand_streams(x: Tensor, n: int) -> Tensor:
    """``[..., C]`` -> ``[..., n, C]`` with every stream a copy of x."""
    n = check_expand("reference.expand_streams", x, n)
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).contiguous()


def mhc_head(x: Tensor, fn: Optional[Tensor], base: Tensor, scale: Optional[Tensor], *, eps: float = 1e-6,
             norm_eps: float = 1e-6) -> Tensor:
    """Learned head collapse: ``w = sigmoid(mixes * scale + base) + eps``; ``out = sum_i w[i] x[i]``."""
    eps = check_head("reference.mhc_head", x, fn, base, scale, eps)
    n = x.shape[-2]
    k = coef_dtype(x.dtype)
    mixes = projection(x, fn, n, norm_eps=norm_eps)
    weights = torch.sigmoid(_gate(mixes, base.to(k), scale.to(k)[0] if scale is not None else None)) + eps
    return _aggregate(x, weights)


def residual_add_agg(x: Tensor, res: Tensor, h_pre: Tensor) -> Tuple[Tensor, Tensor]:
    """``x_out = x + res`` (stored in x's dtype); ``agg = sum_i h_pre[i] * x_out[i]``."""
    check_residual_add_agg("reference.residual_add_agg", x, res, h_pre)
    k = coef_dtype(x.dtype)
    x_out = (x.to(k) + res.to(k)).to(x.dtype)
    return x_out, _aggregate(x_out, h_pre.to(k))
