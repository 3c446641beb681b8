"""The n-stream mHC ops as PyTorch custom ops (``torch.ops.mhc.*``) backed by the C++/CUDA core.

Public functions (same arguments and results as :mod:`mhc.reference`):

- ``mhc_pre(x, fn, base, scale, *, iters, post_mult, eps, norm_eps, pre_eps)`` -> ``(layer_input, h_pre, h_post, comb)``
- ``mhc_post(x, y, h_post, comb)`` -> ``x_next``
- ``mhc_post_pre(x, y, h_post, comb, fn, base, scale, *, ...)`` -> ``(x_next, layer_input, h_pre, h_post, comb)``
- ``sinkhorn(logits, *, iters, eps)``, ``expand_streams(x, n)``, ``mhc_head(x, fn, base, scale, *, eps)``,
  ``residual_add_agg(x, res, h_pre)`` -> ``(x_out, agg)``

Every op accepts any leading batch dims (flattened to T tokens for the core and restored after),
runs on CPU tensors, and on CUDA tensors on torch's current stream. Each forward and each backward
is one ``torch.library`` custom op with a fake (meta) implementation, so ``torch.compile(fullgraph=True)``
traces forward and backward without graph breaks. Torch allocates every output and workspace; no op
reads a value back to the host.

Dtype policy (also under ``torch.autocast``): the residual ``x`` decides. Stream tensors (``y``, ``res``)
are cast to ``x``'s dtype; coefficients and parameters (``fn``, ``base``, ``scale``, ``h_pre``, ``h_post``,
``comb``) to float32, or float64 when ``x`` is float64. The casts are differentiable, so e.g. a bf16 ``y``
produced by an autocast matmul meets an fp32 residual without error and its gradient comes back in bf16.
Supported stream dtypes: bfloat16, float16, float32, float64.

Backend selection (CPU): ``"auto"`` (default: the fast CPU path, CUDA for CUDA tensors), ``"reference"``
(the fp64-accumulating C++ oracle), ``"fast"``, ``"cuda"``. Use ``with mhc.ops.use_backend("reference"):``
or ``mhc.ops.set_backend(...)``; the backward of an op runs on the backend its forward ran on.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._plumbing import (BACKENDS, Op, eager, eager_apply, get_backend, new, once_differentiable, set_backend,
                        use_backend)
from ._checks import check_expand, check_head, check_post, check_pre, check_residual_add_agg, check_sinkhorn
from .reference import coef_dtype

__all__ = [
    "BACKENDS",
    "get_backend",
    "set_backend",
    "use_backend",
    "mhc_pre",
    "mhc_post",
    "mhc_post_pre",
    "sinkhorn",
    "expand_streams",
    "mhc_head",
    "residual_add_agg",
]


def _new_or_placeholder(t: Optional[Tensor], like: Tensor) -> Tensor:
    # Custom ops cannot return None: an absent parameter's gradient is a [0] placeholder.
    return new(t) if t is not None else like.new_empty((0,))


def _param_grads(fn, scale, grad_fn, grad_base, grad_scale):
    return (grad_fn if fn is not None else None, grad_base, grad_scale if scale is not None else None)


# ---- pre -------------------------------------------------------------------------------------------------


def _pre_outputs(x: Tensor):
    """(layer_input [T, C], h_pre [T, n], h_post [T, n], comb [T, n, n], mixes [T, m], rstd [T]) of x [T, n, C]."""
    T, n, C = x.shape
    k = coef_dtype(x.dtype)
    m = n * n + 2 * n
    return (new(x, (T, C)), new(x, (T, n), k), new(x, (T, n), k), new(x, (T, n, n), k), new(x, (T, m), k),
            new(x, (T,), k))


def _pre_fake(x, fn, base, scale, iters, post_mult, eps, norm_eps, pre_eps, backend):
    return _pre_outputs(x)


def _pre_backward_fake(x, fn, base, scale, mixes, rstd, grad_layer_input, grad_h_pre, grad_h_post, grad_comb,
                       grad_x_accum, iters, post_mult, eps, norm_eps, pre_eps, backend):
    return new(x), _new_or_placeholder(fn, base), new(base), _new_or_placeholder(scale, base)


_pre_backward_op = Op("pre_backward", _pre_backward_fake)


def _pre_setup_context(ctx, inputs, output):
    x, fn, base, scale, *hyper = inputs
    *_, mixes, rstd = output
    ctx.save_for_backward(x, fn, base, scale, mixes, rstd)
    ctx.hyper = hyper  # iters, post_mult, eps, norm_eps, pre_eps, backend
    ctx.mark_non_differentiable(mixes, rstd)


def _pre_backward(ctx, grad_layer_input, grad_h_pre, grad_h_post, grad_comb, _grad_mixes, _grad_rstd):
    x, fn, base, scale, mixes, rstd = ctx.saved_tensors
    grad_x, grad_fn, grad_base, grad_scale = _pre_backward_op(
        x, fn, base, scale, mixes, rstd, grad_layer_input, grad_h_pre, grad_h_post, grad_comb, None, *ctx.hyper)
    return (grad_x, *_param_grads(fn, scale, grad_fn, grad_base, grad_scale)) + (None,) * len(ctx.hyper)


_pre_op = Op("pre", _pre_fake, setup_context=_pre_setup_context, backward=_pre_backward)


# ---- post ------------------------------------------------------------------------------------------------


def _post_fake(x, y, h_post, comb, backend):
    return new(x)


def _post_backward_fake(grad_x_next, x, y, h_post, comb, backend):
    return new(x), new(y), new(h_post), new(comb)


_post_backward_op = Op("post_backward", _post_backward_fake)


def _post_setup_context(ctx, inputs, output):
    x, y, h_post, comb, backend = inputs
    ctx.save_for_backward(x, y, h_post, comb)
    ctx.backend = backend


def _post_backward(ctx, grad_x_next):
    x, y, h_post, comb = ctx.saved_tensors
    grads = _post_backward_op(grad_x_next, x, y, h_post, comb, ctx.backend)
    return (*grads, None)


_post_op = Op("post", _post_fake, setup_context=_post_setup_context, backward=_post_backward)


# ---- post of one site fused with pre of the next ----------------------------------------------------------


def _post_pre_fake(x, y, h_post, comb, fn, base, scale, iters, post_mult, eps, norm_eps, pre_eps, backend):
    return (new(x), *_pre_outputs(x))


def _post_pre_setup_context(ctx, inputs, output):
    x, y, h_post, comb, fn, base, scale, *hyper = inputs
    x_next, *_, mixes, rstd = output
    ctx.save_for_backward(x, y, h_post, comb, fn, base, scale, x_next, mixes, rstd)
    ctx.hyper = hyper
    ctx.mark_non_differentiable(mixes, rstd)


def _post_pre_backward(ctx, grad_x_next, grad_layer_input, grad_h_pre, grad_h_post_next, grad_comb_next,
                       _grad_mixes, _grad_rstd):
    x, y, h_post, comb, fn, base, scale, x_next, mixes, rstd = ctx.saved_tensors
    # x_next feeds both the caller and the next pre: pre_backward adds the caller's gradient in.
    grad_x_next_total, grad_fn, grad_base, grad_scale = _pre_backward_op(
        x_next, fn, base, scale, mixes, rstd, grad_layer_input, grad_h_pre, grad_h_post_next, grad_comb_next,
        grad_x_next, *ctx.hyper)
    grad_x, grad_y, grad_h_post, grad_comb = _post_backward_op(grad_x_next_total, x, y, h_post, comb, ctx.hyper[-1])
    return ((grad_x, grad_y, grad_h_post, grad_comb) + _param_grads(fn, scale, grad_fn, grad_base, grad_scale)
            + (None,) * len(ctx.hyper))


_post_pre_op = Op("post_pre", _post_pre_fake, setup_context=_post_pre_setup_context,
                  backward=_post_pre_backward)


# ---- Sinkhorn ------------------------------------------------------------------------------------------------


def _sinkhorn_fake(logits, iters, eps, backend):
    return new(logits)


def _sinkhorn_backward_fake(logits, grad_comb, iters, eps, backend):
    return new(logits)


_sinkhorn_backward_op = Op("sinkhorn_backward", _sinkhorn_backward_fake)


def _sinkhorn_setup_context(ctx, inputs, output):
    logits, *hyper = inputs
    ctx.save_for_backward(logits)
    ctx.hyper = hyper


def _sinkhorn_backward(ctx, grad_comb):
    (logits,) = ctx.saved_tensors
    return _sinkhorn_backward_op(logits, grad_comb, *ctx.hyper), None, None, None


_sinkhorn_op = Op("sinkhorn", _sinkhorn_fake, setup_context=_sinkhorn_setup_context,
                  backward=_sinkhorn_backward)


# ---- stream expand ---------------------------------------------------------------------------------------


def _expand_fake(x, n, backend):
    return new(x, (x.shape[0], n, x.shape[1]))


def _expand_backward_fake(grad_out, backend):
    return new(grad_out, (grad_out.shape[0], grad_out.shape[2]))


_expand_backward_op = Op("expand_streams_backward", _expand_backward_fake)


def _expand_setup_context(ctx, inputs, output):
    ctx.backend = inputs[2]


def _expand_backward(ctx, grad_out):
    return _expand_backward_op(grad_out, ctx.backend), None, None


_expand_op = Op("expand_streams", _expand_fake, setup_context=_expand_setup_context,
                backward=_expand_backward)


# ---- head ------------------------------------------------------------------------------------------------


def _head_outputs(x: Tensor):
    T, n, C = x.shape
    k = coef_dtype(x.dtype)
    return new(x, (T, C)), new(x, (T, n), k), new(x, (T, n), k), new(x, (T,), k)


def _head_fake(x, fn, base, scale, eps, backend):
    return _head_outputs(x)


def _head_backward_fake(x, fn, base, scale, mixes, rstd, grad_out, grad_weights, eps, backend):
    return new(x), _new_or_placeholder(fn, base), new(base), _new_or_placeholder(scale, base)


_head_backward_op = Op("head_backward", _head_backward_fake)


def _head_setup_context(ctx, inputs, output):
    x, fn, base, scale, eps, backend = inputs
    _, _, mixes, rstd = output
    ctx.save_for_backward(x, fn, base, scale, mixes, rstd)
    ctx.hyper = (eps, backend)
    ctx.mark_non_differentiable(mixes, rstd)


def _head_backward(ctx, grad_out, grad_weights, _grad_mixes, _grad_rstd):
    x, fn, base, scale, mixes, rstd = ctx.saved_tensors
    grad_x, grad_fn, grad_base, grad_scale = _head_backward_op(
        x, fn, base, scale, mixes, rstd, grad_out, grad_weights, *ctx.hyper)
    return (grad_x, *_param_grads(fn, scale, grad_fn, grad_base, grad_scale), None, None)


_head_op = Op("head", _head_fake, setup_context=_head_setup_context, backward=_head_backward)


# ---- residual add + aggregate ---------------------------------------------------------------------------


def _residual_add_agg_fake(x, res, h_pre, backend):
    return new(x), new(x, (x.shape[0], x.shape[2]))


def _residual_add_agg_backward_fake(grad_x_out, grad_agg, x_out, h_pre, backend):
    return new(x_out), new(h_pre)


_residual_add_agg_backward_op = Op("residual_add_agg_backward", _residual_add_agg_backward_fake)


def _residual_add_agg_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[0], inputs[2])
    ctx.backend = inputs[3]


def _residual_add_agg_backward(ctx, grad_x_out, grad_agg):
    x_out, h_pre = ctx.saved_tensors
    grad_sum, grad_h_pre = _residual_add_agg_backward_op(grad_x_out, grad_agg, x_out, h_pre, ctx.backend)
    return grad_sum, grad_sum, grad_h_pre, None


_residual_add_agg_op = Op("residual_add_agg", _residual_add_agg_fake,
                          setup_context=_residual_add_agg_setup_context, backward=_residual_add_agg_backward)


# ---- one site's pre and post on the same x: grad_x written once ---------------------------------------------
#
# Used as a pair, ``mhc_pre(x, ...)`` then ``mhc_post(x, y, h_post, comb)`` (or ``mhc_post_pre``) with pre's own
# h_post and comb, x has two consumers, and autograd would add their grad_x in an extra pass over [T, n, C]. Paired,
# post's autograd node returns no grad_x: its backward leaves it in the pair's link, and pre's backward, which
# autograd always runs after post's (post's gradients of h_post and comb flow into it), passes it to pre_backward as
# grad_x_accum. Eager autograd only: under torch.compile, tracing and torch.func transforms the ops run unpaired.

_pair_sites = True  # tests turn it off to compare with the unpaired path


def _pairing(x: Tensor) -> bool:
    return _pair_sites and torch.is_grad_enabled() and x.requires_grad and eager(x)


class _PairLink:
    """Shared by the pre and the post of one site: the pair's tensors, and post's grad_x until pre's backward."""

    __slots__ = ("x", "h_post", "comb", "claimed", "grad_x", "task")

    def __init__(self):
        self.x = self.h_post = self.comb = None  # weak references, set by _tie
        self.claimed = False
        self.grad_x: Optional[Tensor] = None
        self.task = None

    def claim(self, x: Tensor, h_post: Tensor, comb: Tensor) -> bool:
        """True for the first post that reads pre's own x, h_post and comb."""
        if self.claimed or self.x() is not x or self.h_post() is not h_post or self.comb() is not comb:
            return False
        self.claimed = True
        return True

    def deposit(self, grad_x: Tensor) -> None:
        self.grad_x, self.task = grad_x, torch._C._current_graph_task_id()

    def take(self) -> Optional[Tensor]:
        # Only from this backward pass: one that stopped before pre (autograd.grad of h_post) leaves nothing behind.
        grad_x, self.grad_x = self.grad_x, None
        return grad_x if self.task == torch._C._current_graph_task_id() else None


def _claimed_link(x: Tensor, h_post: Tensor, comb: Tensor) -> Optional[_PairLink]:
    link = getattr(comb, "_mhc_pair_link", None) if _pairing(x) else None
    return link if link is not None and link.claim(x, h_post, comb) else None


class _PairedPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, link, x, fn, base, scale, *hyper):
        outs = _pre_op.all_outputs(x, fn, base, scale, *hyper)
        _pre_setup_context(ctx, (x, fn, base, scale, *hyper), outs)
        ctx.link = link
        return outs

    @staticmethod
    @once_differentiable  # no double backward: refused, not wrong
    def backward(ctx, grad_layer_input, grad_h_pre, grad_h_post, grad_comb, _grad_mixes, _grad_rstd):
        x, fn, base, scale, mixes, rstd = ctx.saved_tensors
        grad_x, grad_fn, grad_base, grad_scale = _pre_backward_op(
            x, fn, base, scale, mixes, rstd, grad_layer_input, grad_h_pre, grad_h_post, grad_comb, ctx.link.take(),
            *ctx.hyper)
        return (None, grad_x, *_param_grads(fn, scale, grad_fn, grad_base, grad_scale)) + (None,) * len(ctx.hyper)


class _PairedPost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, link, x, y, h_post, comb, backend):
        x_next = _post_op.all_outputs(x, y, h_post, comb, backend)
        _post_setup_context(ctx, (x, y, h_post, comb, backend), x_next)
        ctx.link = link
        return x_next

    @staticmethod
    @once_differentiable  # no double backward: refused, not wrong
    def backward(ctx, grad_x_next):
        grad_x, *rest = _post_backward(ctx, grad_x_next)
        ctx.link.deposit(grad_x)
        return (None, None, *rest)


class _PairedPostPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, link, x, y, h_post, comb, fn, base, scale, *hyper):
        outs = _post_pre_op.all_outputs(x, y, h_post, comb, fn, base, scale, *hyper)
        _post_pre_setup_context(ctx, (x, y, h_post, comb, fn, base, scale, *hyper), outs)
        ctx.link = link
        return outs

    @staticmethod
    @once_differentiable  # no double backward: refused, not wrong
    def backward(ctx, *grad_outputs):
        grad_x, *rest = _post_pre_backward(ctx, *grad_outputs)
        ctx.link.deposit(grad_x)
        return (None, None, *rest)


# Paired calls are plain eager ones (_pairing): the autograd Functions' C entry point, without apply's wrapper.
_paired_pre, _paired_post, _paired_post_pre = map(eager_apply, (_PairedPre, _PairedPost, _PairedPostPre))


def _pre_maybe_paired(x: Tensor, fn, base, scale, hyper, paired: bool) -> Tuple[Tensor, ...]:
    """The pre op on flat x; paired (its public comb carries the link) when x takes gradients in eager autograd
    (``paired``: _pairing of the public x)."""
    if not paired:
        return _pre_op(x, fn, base, scale, *hyper), None
    link = _PairLink()
    return _paired_pre(link, x, fn, base, scale, *hyper), link


def _tie(link: Optional[_PairLink], x: Tensor, h_post: Tensor, comb: Tensor) -> None:
    """Marks the public h_post and comb of a paired pre: a post that reads them and x is the pair's post."""
    if link is not None:
        link.x, link.h_post, link.comb = weakref.ref(x), weakref.ref(h_post), weakref.ref(comb)
        comb._mhc_pair_link = link


# ---- public API: argument checks (mhc._checks, shared with mhc.reference), casts, leading dims --------------


# Strided tensors pass as they are: the C++ kernels copy an input contiguous only when it is not (torch_ops.cpp,
# Views), which costs nothing in the common case and saves a .contiguous() call per tensor here.


def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # Casts only when needed: each no-op .to() still costs a microsecond or two of host time.
    if t is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def _tokens(t: Tensor, trailing: int, *shape: int) -> Tensor:
    """t [..., *shape] as [T, *shape]; no reshape when it already has that rank."""
    return t if t.dim() == trailing + 1 else t.reshape(-1, *shape)


def _restore(t: Tensor, lead: Sequence[int], *shape: int) -> Tensor:
    """The [T, *shape] result back to [*lead, *shape]."""
    return t if len(lead) == 1 else t.view(*lead, *shape)


def _params(x: Tensor, fn, base, scale):
    """Checked parameters cast to the coefficient dtype."""
    k = coef_dtype(x.dtype)
    if base.dtype == k and (fn is None or fn.dtype == k) and (scale is None or scale.dtype == k):
        return fn, base, scale  # the common case: fp32 parameters as the module keeps them
    return _as(fn, k), _as(base, k), _as(scale, k)


def mhc_pre(x: Tensor, fn: Optional[Tensor], base: Tensor, scale: Optional[Tensor], *, iters: int = 20,
            post_mult: float = 2.0, eps: float = 1e-6, norm_eps: float = 1e-6, pre_eps: float = 1e-6
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """mHC pre of one site.

    ``x [..., n, C]``, ``fn [n*n+2n, n*C]`` (or None: static mode), ``base [n*n+2n]``, ``scale [3]`` (or None)
    -> ``(layer_input [..., C], h_pre [..., n], h_post [..., n], comb [..., n, n])``.
    """
    hyper = check_pre("mhc_pre", x, fn, base, scale, iters, post_mult, eps, norm_eps, pre_eps)
    fn, base, scale = _params(x, fn, base, scale)
    paired = _pairing(x)
    if x.dim() == 3 and not paired:  # the common case (tokens already flat, nothing paired), kept short
        outs = _pre_op(x, fn, base, scale, *hyper, get_backend())
        return outs[0], outs[1], outs[2], outs[3]
    *lead, n, C = x.shape
    outs, link = _pre_maybe_paired(_tokens(x, 2, n, C), fn, base, scale, (*hyper, get_backend()), paired)
    layer_input, h_pre, h_post, comb = outs[:4]
    h_post, comb = _restore(h_post, lead, n), _restore(comb, lead, n, n)
    _tie(link, x, h_post, comb)
    return _restore(layer_input, lead, C), _restore(h_pre, lead, n), h_post, comb


def _post_inputs(op: str, x, y, h_post, comb):
    check_post(op, x, y, h_post, comb)
    k = coef_dtype(x.dtype)
    if x.dim() == 3 and y.dtype == x.dtype and h_post.dtype == k and comb.dtype == k:
        return x, y, h_post, comb  # the common case: flat tokens, the dtypes the ops take
    n, C = x.shape[-2:]
    return (_tokens(x, 2, n, C), _tokens(_as(y, x.dtype), 1, C), _tokens(_as(h_post, k), 1, n),
            _tokens(_as(comb, k), 2, n, n))


def mhc_post(x: Tensor, y: Tensor, h_post: Tensor, comb: Tensor) -> Tensor:
    """mHC post: ``x_next[o] = h_post[o] * y + sum_i comb[i, o] * x[i]``; ``x [..., n, C]``, ``y [..., C]``."""
    flat = _post_inputs("mhc_post", x, y, h_post, comb)
    link = _claimed_link(x, h_post, comb)
    if link is not None:
        x_next = _paired_post(link, *flat, get_backend())
    else:
        x_next = _post_op(*flat, get_backend())
    return x_next if x.dim() == 3 else x_next.view(x.shape)


def mhc_post_pre(x: Tensor, y: Tensor, h_post: Tensor, comb: Tensor, fn: Optional[Tensor], base: Tensor,
                 scale: Optional[Tensor], *, iters: int = 20, post_mult: float = 2.0, eps: float = 1e-6,
                 norm_eps: float = 1e-6, pre_eps: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """post of this site fused with pre of the next (whose parameters are fn, base, scale).

    -> ``(x_next [..., n, C], layer_input [..., C], h_pre [..., n], h_post [..., n], comb [..., n, n])``.
    """
    hyper = (*check_pre("mhc_post_pre", x, fn, base, scale, iters, post_mult, eps, norm_eps, pre_eps), get_backend())
    flat = _post_inputs("mhc_post_pre", x, y, h_post, comb)
    fn, base, scale = _params(x, fn, base, scale)
    *lead, n, C = x.shape
    link = _claimed_link(x, h_post, comb)
    if link is not None:
        outs = _paired_post_pre(link, *flat, fn, base, scale, *hyper)
    else:
        outs = _post_pre_op(*flat, fn, base, scale, *hyper)
    x_next, layer_input, h_pre, h_post_next, comb_next = outs[:5]
    return (_restore(x_next, lead, n, C), _restore(layer_input, lead, C), _restore(h_pre, lead, n),
            _restore(h_post_next, lead, n), _restore(comb_next, lead, n, n))


def sinkhorn(logits: Tensor, *, iters: int = 20, eps: float = 1e-6) -> Tensor:
    """Sinkhorn normalisation of ``[..., n, n]`` logits (float32; float64 stays float64)."""
    iters, eps = check_sinkhorn("sinkhorn", logits, iters, eps)
    n = logits.shape[-1]
    flat = _tokens(_as(logits, coef_dtype(logits.dtype)), 2, n, n)
    return _restore(_sinkhorn_op(flat, iters, eps, get_backend()), logits.shape[:-2], n, n)


def expand_streams(x: Tensor, n: int) -> Tensor:
    """``[..., C]`` -> ``[..., n, C]``, every stream a copy of x (the backward sums over streams)."""
    n = check_expand("expand_streams", x, n)
    C = x.shape[-1]
    out = _expand_op(_tokens(x, 1, C), n, get_backend())
    return _restore(out, x.shape[:-1], n, C)


def mhc_head(x: Tensor, fn: Optional[Tensor], base: Tensor, scale: Optional[Tensor], *, eps: float = 1e-6
             ) -> Tensor:
    """Learned head collapse ``[..., n, C]`` -> ``[..., C]``: ``w = sigmoid(mixes * scale + base) + eps``,
    ``out = sum_i w[i] x[i]``; ``fn [n, n*C]`` (or None), ``base [n]``, ``scale [1]`` (or None)."""
    eps = check_head("mhc_head", x, fn, base, scale, eps)
    fn, base, scale = _params(x, fn, base, scale)
    *lead, n, C = x.shape
    out = _head_op(_tokens(x, 2, n, C), fn, base, scale, eps, get_backend())[0]
    return _restore(out, lead, C)


def residual_add_agg(x: Tensor, res: Tensor, h_pre: Tensor) -> Tuple[Tensor, Tensor]:
    """``x_out = x + res`` and ``agg = sum_i h_pre[i] * x_out[i]`` in one pass; ``x, res [..., n, C]``, ``h_pre [..., n]``."""
    check_residual_add_agg("residual_add_agg", x, res, h_pre)
    *lead, n, C = x.shape
    x_out, agg = _residual_add_agg_op(_tokens(x, 2, n, C), _tokens(_as(res, x.dtype), 2, n, C),
                                      _tokens(_as(h_pre, coef_dtype(x.dtype)), 1, n), get_backend())
    return _restore(x_out, lead, n, C), _restore(agg, lead, C)


# The multi-history skip ops live in history_ops.py; re-exported so every functional op is in mhc.ops.
from .history_ops import history_mix, history_skip, project_logits  # noqa: E402

__all__ += ["history_mix", "history_skip", "project_logits"]
