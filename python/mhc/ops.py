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

import atexit
import contextlib
import functools
import math
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.dlpack import to_dlpack

from . import _C
from ._checks import (check_expand, check_head, check_post, check_pre, check_residual_add_agg, check_sinkhorn,
                      eager)
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

# ---- backend selection ----------------------------------------------------------------------------

BACKENDS = ("auto", "reference", "fast", "cuda")
_backend = "auto"


def get_backend() -> str:
    """The backend the next op call will use."""
    return _backend


def set_backend(name: str) -> None:
    """Select the backend for subsequent op calls: one of :data:`BACKENDS`."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"mhc.ops.set_backend: backend: expected one of {BACKENDS}, got {name!r}")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the ops inside on backend ``name`` (e.g. ``"reference"``)."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


# ---- helpers shared by the custom-op implementations --------------------------------------------------


def _dl(t: Optional[Tensor]):
    # A DLPack capsule straight from C++: unlike Tensor.__dlpack__ it neither refuses tensors that
    # require grad nor makes the default stream wait on the current one (illegal in graph capture).
    return None if t is None else to_dlpack(t)


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=256)  # building the extension's Config object costs a few us per call
def _config(n: int, iters: int = 20, post_mult: float = 2.0, eps: float = 1e-6, norm_eps: float = 1e-6,
            pre_eps: float = 1e-6):
    return _C.Config(n=n, iters=iters, eps=eps, norm_eps=norm_eps, pre_eps=pre_eps, post_mult=post_mult)


atexit.register(_config.cache_clear)  # before the extension is torn down (nanobind counts live objects)


# Tests set this: every output is NaN-filled before the op runs, so elements it fails to write show.
_poison_outputs = False


def _new(like: Tensor, shape=None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An output buffer with like's device (and shape / dtype unless given)."""
    shape = like.shape if shape is None else shape
    dtype = like.dtype if dtype is None else dtype
    if _poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _workspace(nbytes: int, like: Tensor) -> Optional[Tensor]:
    if nbytes == 0:
        return None
    return _new(like, (math.ceil(nbytes / 4),), torch.float32)  # poisoned too: backends may not assume zeros


def _new_or_placeholder(t: Optional[Tensor], like: Tensor) -> Tensor:
    # Custom ops cannot return None: an absent parameter's gradient is a [0] placeholder.
    return _new(t) if t is not None else like.new_empty((0,))


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


# ---- pre -------------------------------------------------------------------------------------------------


def _pre_outputs(x: Tensor):
    T, n, C = x.shape
    k = coef_dtype(x.dtype)
    m = n * n + 2 * n
    return (_new(x, (T, C)), _new(x, (T, n), k), _new(x, (T, n), k), _new(x, (T, n, n), k), _new(x, (T, m), k),
            _new(x, (T,), k))


@torch.library.custom_op("mhc::pre", mutates_args=())
def _pre_op(x: Tensor, fn: Optional[Tensor], base: Tensor, scale: Optional[Tensor], iters: int, post_mult: float,
            eps: float, norm_eps: float, pre_eps: float, backend: str
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x [T, n, C] -> (layer_input [T, C], h_pre [T, n], h_post [T, n], comb [T, n, n], mixes [T, m], rstd [T])."""
    outs = _pre_outputs(x)
    layer_input, h_pre, h_post, comb, mixes, rstd = outs
    with _device(x):
        _C.pre_forward(x=_dl(x), fn=_dl(fn), base=_dl(base), scale=_dl(scale), layer_input=_dl(layer_input),
                       h_pre=_dl(h_pre), h_post=_dl(h_post), comb=_dl(comb), mixes=_dl(mixes), rstd=_dl(rstd),
                       config=_config(x.shape[1], iters, post_mult, eps, norm_eps, pre_eps), backend=backend,
                       stream=_stream(x))
    return outs


@_pre_op.register_fake
def _(x, fn, base, scale, iters, post_mult, eps, norm_eps, pre_eps, backend):
    return _pre_outputs(x)


@torch.library.custom_op("mhc::pre_backward", mutates_args=())
def _pre_backward_op(x: Tensor, fn: Optional[Tensor], base: Tensor, scale: Optional[Tensor], mixes: Tensor,
                     rstd: Tensor, grad_layer_input: Optional[Tensor], grad_h_pre: Optional[Tensor],
                     grad_h_post: Optional[Tensor], grad_comb: Optional[Tensor], grad_x_accum: Optional[Tensor],
                     iters: int, post_mult: float, eps: float, norm_eps: float, pre_eps: float, backend: str
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_x, grad_fn, grad_base, grad_scale); grad_fn / grad_scale are [0] when fn / scale are None."""
    grad_x = _new(x)
    grad_fn, grad_scale = _new_or_placeholder(fn, base), _new_or_placeholder(scale, base)
    grad_base = _new(base)
    cfg = _config(x.shape[1], iters, post_mult, eps, norm_eps, pre_eps)
    with _device(x):
        stream = _stream(x)
        nbytes = _C.pre_backward_workspace_bytes(x=_dl(x), fn=_dl(fn), base=_dl(base), scale=_dl(scale),
                                                 config=cfg, backend=backend, stream=stream)
        _C.pre_backward(x=_dl(x), fn=_dl(fn), base=_dl(base), scale=_dl(scale), mixes=_dl(mixes), rstd=_dl(rstd),
                        grad_layer_input=_dl(grad_layer_input), grad_h_pre=_dl(grad_h_pre),
                        grad_h_post=_dl(grad_h_post), grad_comb=_dl(grad_comb), grad_x_accum=_dl(grad_x_accum),
                        grad_x=_dl(grad_x), grad_fn=_dl(grad_fn if fn is not None else None),
                        grad_base=_dl(grad_base), grad_scale=_dl(grad_scale if scale is not None else None),
                        workspace=_dl(_workspace(nbytes, x)), config=cfg, backend=backend, stream=stream)
    return grad_x, grad_fn, grad_base, grad_scale


@_pre_backward_op.register_fake
def _(x, fn, base, scale, mixes, rstd, grad_layer_input, grad_h_pre, grad_h_post, grad_comb, grad_x_accum, iters,
      post_mult, eps, norm_eps, pre_eps, backend):
    return (_new(x), _new_or_placeholder(fn, base), _new(base),
            _new_or_placeholder(scale, base))


def _pre_setup_context(ctx, inputs, output):
    x, fn, base, scale, *hyper = inputs
    *_, mixes, rstd = output
    ctx.save_for_backward(x, fn, base, scale, mixes, rstd)
    ctx.hyper = hyper  # iters, post_mult, eps, norm_eps, pre_eps, backend
    ctx.mark_non_differentiable(mixes, rstd)


def _param_grads(fn, scale, grad_fn, grad_base, grad_scale):
    return (grad_fn if fn is not None else None, grad_base, grad_scale if scale is not None else None)


def _pre_backward(ctx, grad_layer_input, grad_h_pre, grad_h_post, grad_comb, _grad_mixes, _grad_rstd):
    x, fn, base, scale, mixes, rstd = ctx.saved_tensors
    grad_x, grad_fn, grad_base, grad_scale = torch.ops.mhc.pre_backward(
        x, fn, base, scale, mixes, rstd, _contig(grad_layer_input), _contig(grad_h_pre), _contig(grad_h_post),
        _contig(grad_comb), None, *ctx.hyper)
    return (grad_x, *_param_grads(fn, scale, grad_fn, grad_base, grad_scale)) + (None,) * len(ctx.hyper)


_pre_op.register_autograd(_pre_backward, setup_context=_pre_setup_context)


# ---- post ------------------------------------------------------------------------------------------------


@torch.library.custom_op("mhc::post", mutates_args=())
def _post_op(x: Tensor, y: Tensor, h_post: Tensor, comb: Tensor, backend: str) -> Tensor:
    """x_next[o] = h_post[o] * y + sum_i comb[i, o] * x[i] on [T, n, C]."""
    x_next = _new(x)
    with _device(x):
        _C.post_forward(x=_dl(x), y=_dl(y), h_post=_dl(h_post), comb=_dl(comb), x_next=_dl(x_next),
                        config=_config(x.shape[1]), backend=backend, stream=_stream(x))
    return x_next


@_post_op.register_fake
def _(x, y, h_post, comb, backend):
    return _new(x)


@torch.library.custom_op("mhc::post_backward", mutates_args=())
def _post_backward_op(grad_x_next: Tensor, x: Tensor, y: Tensor, h_post: Tensor, comb: Tensor, backend: str
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_x, grad_y, grad_h_post, grad_comb)."""
    grads = (_new(x), _new(y), _new(h_post), _new(comb))
    with _device(x):
        _C.post_backward(grad_x_next=_dl(grad_x_next), x=_dl(x), y=_dl(y), h_post=_dl(h_post), comb=_dl(comb),
                         grad_x=_dl(grads[0]), grad_y=_dl(grads[1]), grad_h_post=_dl(grads[2]),
                         grad_comb=_dl(grads[3]), config=_config(x.shape[1]), backend=backend, stream=_stream(x))
    return grads


@_post_backward_op.register_fake
def _(grad_x_next, x, y, h_post, comb, backend):
    return _new(x), _new(y), _new(h_post), _new(comb)


def _post_setup_context(ctx, inputs, output):
    x, y, h_post, comb, backend = inputs
    ctx.save_for_backward(x, y, h_post, comb)
    ctx.backend = backend


def _post_backward(ctx, grad_x_next):
    x, y, h_post, comb = ctx.saved_tensors
    grads = torch.ops.mhc.post_backward(grad_x_next.contiguous(), x, y, h_post, comb, ctx.backend)
    return (*grads, None)


_post_op.register_autograd(_post_backward, setup_context=_post_setup_context)


# ---- post of one site fused with pre of the next ----------------------------------------------------------


@torch.library.custom_op("mhc::post_pre", mutates_args=())
def _post_pre_op(x: Tensor, y: Tensor, h_post: Tensor, comb: Tensor, fn: Optional[Tensor], base: Tensor,
                 scale: Optional[Tensor], iters: int, post_mult: float, eps: float, norm_eps: float, pre_eps: float,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (x_next, layer_input, h_pre, h_post_next, comb_next, mixes, rstd) of the next site."""
    x_next = _new(x)
    layer_input, h_pre, h_post_next, comb_next, mixes, rstd = _pre_outputs(x)
    with _device(x):
        _C.post_pre_forward(x=_dl(x), y=_dl(y), h_post=_dl(h_post), comb=_dl(comb), fn=_dl(fn), base=_dl(base),
                            scale=_dl(scale), x_next=_dl(x_next), layer_input=_dl(layer_input), h_pre=_dl(h_pre),
                            h_post_next=_dl(h_post_next), comb_next=_dl(comb_next), mixes=_dl(mixes),
                            rstd=_dl(rstd), config=_config(x.shape[1], iters, post_mult, eps, norm_eps, pre_eps),
                            backend=backend, stream=_stream(x))
    return x_next, layer_input, h_pre, h_post_next, comb_next, mixes, rstd


@_post_pre_op.register_fake
def _(x, y, h_post, comb, fn, base, scale, iters, post_mult, eps, norm_eps, pre_eps, backend):
    return (_new(x), *_pre_outputs(x))


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
    grad_x_next_total, grad_fn, grad_base, grad_scale = torch.ops.mhc.pre_backward(
        x_next, fn, base, scale, mixes, rstd, _contig(grad_layer_input), _contig(grad_h_pre),
        _contig(grad_h_post_next), _contig(grad_comb_next), _contig(grad_x_next), *ctx.hyper)
    grad_x, grad_y, grad_h_post, grad_comb = torch.ops.mhc.post_backward(
        grad_x_next_total, x, y, h_post, comb, ctx.hyper[-1])
    return ((grad_x, grad_y, grad_h_post, grad_comb) + _param_grads(fn, scale, grad_fn, grad_base, grad_scale)
            + (None,) * len(ctx.hyper))


_post_pre_op.register_autograd(_post_pre_backward, setup_context=_post_pre_setup_context)


# ---- Sinkhorn ------------------------------------------------------------------------------------------------


@torch.library.custom_op("mhc::sinkhorn", mutates_args=())
def _sinkhorn_op(logits: Tensor, iters: int, eps: float, backend: str) -> Tensor:
    """[T, n, n] logits -> comb."""
    comb = _new(logits)
    with _device(logits):
        _C.sinkhorn_forward(logits=_dl(logits), comb=_dl(comb), config=_config(logits.shape[-1], iters, eps=eps),
                            backend=backend, stream=_stream(logits))
    return comb


@_sinkhorn_op.register_fake
def _(logits, iters, eps, backend):
    return _new(logits)


@torch.library.custom_op("mhc::sinkhorn_backward", mutates_args=())
def _sinkhorn_backward_op(logits: Tensor, grad_comb: Tensor, iters: int, eps: float, backend: str) -> Tensor:
    grad_logits = _new(logits)
    with _device(logits):
        _C.sinkhorn_backward(logits=_dl(logits), grad_comb=_dl(grad_comb), grad_logits=_dl(grad_logits),
                             config=_config(logits.shape[-1], iters, eps=eps), backend=backend,
                             stream=_stream(logits))
    return grad_logits


@_sinkhorn_backward_op.register_fake
def _(logits, grad_comb, iters, eps, backend):
    return _new(logits)


def _sinkhorn_setup_context(ctx, inputs, output):
    logits, *hyper = inputs
    ctx.save_for_backward(logits)
    ctx.hyper = hyper


def _sinkhorn_backward(ctx, grad_comb):
    (logits,) = ctx.saved_tensors
    return torch.ops.mhc.sinkhorn_backward(logits, grad_comb.contiguous(), *ctx.hyper), None, None, None


_sinkhorn_op.register_autograd(_sinkhorn_backward, setup_context=_sinkhorn_setup_context)


# ---- stream expand ---------------------------------------------------------------------------------------


@torch.library.custom_op("mhc::expand_streams", mutates_args=())
def _expand_op(x: Tensor, n: int, backend: str) -> Tensor:
    """[T, C] -> [T, n, C]."""
    out = _new(x, (x.shape[0], n, x.shape[1]))
    with _device(x):
        _C.expand_forward(x=_dl(x), out=_dl(out), config=_config(n), backend=backend, stream=_stream(x))
    return out


@_expand_op.register_fake
def _(x, n, backend):
    return _new(x, (x.shape[0], n, x.shape[1]))


@torch.library.custom_op("mhc::expand_streams_backward", mutates_args=())
def _expand_backward_op(grad_out: Tensor, backend: str) -> Tensor:
    """[T, n, C] -> sum over streams [T, C]."""
    grad_x = _new(grad_out, (grad_out.shape[0], grad_out.shape[2]))
    with _device(grad_out):
        _C.expand_backward(grad_out=_dl(grad_out), grad_x=_dl(grad_x), config=_config(grad_out.shape[1]),
                           backend=backend, stream=_stream(grad_out))
    return grad_x


@_expand_backward_op.register_fake
def _(grad_out, backend):
    return _new(grad_out, (grad_out.shape[0], grad_out.shape[2]))


def _expand_setup_context(ctx, inputs, output):
    ctx.backend = inputs[2]


def _expand_backward(ctx, grad_out):
    return torch.ops.mhc.expand_streams_backward(grad_out.contiguous(), ctx.backend), None, None


_expand_op.register_autograd(_expand_backward, setup_context=_expand_setup_context)


# ---- head ------------------------------------------------------------------------------------------------


def _head_outputs(x: Tensor):
    T, n, C = x.shape
    k = coef_dtype(x.dtype)
    return _new(x, (T, C)), _new(x, (T, n), k), _new(x, (T, n), k), _new(x, (T,), k)


@torch.library.custom_op("mhc::head", mutates_args=())
def _head_op(x: Tensor, fn: Optional[Tensor], base: Tensor, scale: Optional[Tensor], eps: float, backend: str
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [T, n, C] -> (out [T, C], weights [T, n], mixes [T, n], rstd [T])."""
    outs = _head_outputs(x)
    out, weights, mixes, rstd = outs
    with _device(x):
        _C.head_forward(x=_dl(x), fn=_dl(fn), base=_dl(base), scale=_dl(scale), out=_dl(out), weights=_dl(weights),
                        mixes=_dl(mixes), rstd=_dl(rstd), config=_config(x.shape[1], pre_eps=eps), backend=backend,
                        stream=_stream(x))
    return outs


@_head_op.register_fake
def _(x, fn, base, scale, eps, backend):
    return _head_outputs(x)


@torch.library.custom_op("mhc::head_backward", mutates_args=())
def _head_backward_op(x: Tensor, fn: Optional[Tensor], base: Tensor, scale: Optional[Tensor], mixes: Tensor,
                      rstd: Tensor, grad_out: Optional[Tensor], grad_weights: Optional[Tensor], eps: float,
                      backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (grad_x, grad_fn, grad_base, grad_scale); grad_fn / grad_scale are [0] when fn / scale are None."""
    grad_x = _new(x)
    grad_fn, grad_scale = _new_or_placeholder(fn, base), _new_or_placeholder(scale, base)
    grad_base = _new(base)
    cfg = _config(x.shape[1], pre_eps=eps)
    with _device(x):
        stream = _stream(x)
        nbytes = _C.head_backward_workspace_bytes(x=_dl(x), fn=_dl(fn), base=_dl(base), scale=_dl(scale),
                                                  config=cfg, backend=backend, stream=stream)
        _C.head_backward(x=_dl(x), fn=_dl(fn), base=_dl(base), scale=_dl(scale), mixes=_dl(mixes), rstd=_dl(rstd),
                         grad_out=_dl(grad_out), grad_weights=_dl(grad_weights), grad_x=_dl(grad_x),
                         grad_fn=_dl(grad_fn if fn is not None else None), grad_base=_dl(grad_base),
                         grad_scale=_dl(grad_scale if scale is not None else None),
                         workspace=_dl(_workspace(nbytes, x)), config=cfg, backend=backend, stream=stream)
    return grad_x, grad_fn, grad_base, grad_scale


@_head_backward_op.register_fake
def _(x, fn, base, scale, mixes, rstd, grad_out, grad_weights, eps, backend):
    return (_new(x), _new_or_placeholder(fn, base), _new(base),
            _new_or_placeholder(scale, base))


def _head_setup_context(ctx, inputs, output):
    x, fn, base, scale, eps, backend = inputs
    _, _, mixes, rstd = output
    ctx.save_for_backward(x, fn, base, scale, mixes, rstd)
    ctx.hyper = (eps, backend)
    ctx.mark_non_differentiable(mixes, rstd)


def _head_backward(ctx, grad_out, grad_weights, _grad_mixes, _grad_rstd):
    x, fn, base, scale, mixes, rstd = ctx.saved_tensors
    grad_x, grad_fn, grad_base, grad_scale = torch.ops.mhc.head_backward(
        x, fn, base, scale, mixes, rstd, _contig(grad_out), _contig(grad_weights), *ctx.hyper)
    return (grad_x, *_param_grads(fn, scale, grad_fn, grad_base, grad_scale), None, None)


_head_op.register_autograd(_head_backward, setup_context=_head_setup_context)


# ---- residual add + aggregate ---------------------------------------------------------------------------


def _residual_add_agg_impl(x: Tensor, res: Tensor, h_pre: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    x_out, agg = _new(x), _new(x, (x.shape[0], x.shape[2]))
    with _device(x):
        _C.residual_add_agg_forward(x=_dl(x), res=_dl(res), h_pre=_dl(h_pre), x_out=_dl(x_out), agg=_dl(agg),
                                    config=_config(x.shape[1]), backend=backend, stream=_stream(x))
    return x_out, agg


def _residual_add_agg_backward_impl(grad_x_out: Optional[Tensor], grad_agg: Optional[Tensor], x_out: Tensor,
                                    h_pre: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    grad_sum, grad_h_pre = _new(x_out), _new(h_pre)
    with _device(x_out):
        _C.residual_add_agg_backward(grad_x_out=_dl(grad_x_out), grad_agg=_dl(grad_agg), x_out=_dl(x_out),
                                     h_pre=_dl(h_pre), grad_sum=_dl(grad_sum), grad_h_pre=_dl(grad_h_pre),
                                     config=_config(x_out.shape[1]), backend=backend, stream=_stream(x_out))
    return grad_sum, grad_h_pre


@torch.library.custom_op("mhc::residual_add_agg", mutates_args=())
def _residual_add_agg_op(x: Tensor, res: Tensor, h_pre: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """-> (x_out = x + res [T, n, C], agg = sum_i h_pre[i] x_out[i] [T, C])."""
    return _residual_add_agg_impl(x, res, h_pre, backend)


@_residual_add_agg_op.register_fake
def _(x, res, h_pre, backend):
    return _new(x), _new(x, (x.shape[0], x.shape[2]))


@torch.library.custom_op("mhc::residual_add_agg_backward", mutates_args=())
def _residual_add_agg_backward_op(grad_x_out: Optional[Tensor], grad_agg: Optional[Tensor], x_out: Tensor,
                                  h_pre: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """-> (grad_sum: the gradient of both x and res, grad_h_pre)."""
    return _residual_add_agg_backward_impl(grad_x_out, grad_agg, x_out, h_pre, backend)


@_residual_add_agg_backward_op.register_fake
def _(grad_x_out, grad_agg, x_out, h_pre, backend):
    return _new(x_out), _new(h_pre)


def _residual_add_agg_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[0], inputs[2])
    ctx.backend = inputs[3]


def _residual_add_agg_backward(ctx, grad_x_out, grad_agg):
    x_out, h_pre = ctx.saved_tensors
    grad_sum, grad_h_pre = torch.ops.mhc.residual_add_agg_backward(_contig(grad_x_out), _contig(grad_agg), x_out,
                                                                    h_pre, ctx.backend)
    return grad_sum, grad_sum, grad_h_pre, None


_residual_add_agg_op.register_autograd(_residual_add_agg_backward, setup_context=_residual_add_agg_setup_context)


class _ResidualAddAggFunction(torch.autograd.Function):
    """Eager path of mhc::residual_add_agg (same kernels, less Python per call: the op is elementwise-cheap,
    so the custom op's dispatch cost would decide whether fusing pays on the CPU)."""

    @staticmethod
    def forward(ctx, x, res, h_pre, backend):
        x_out, agg = _residual_add_agg_impl(x, res, h_pre, backend)
        ctx.save_for_backward(x_out, h_pre)
        ctx.backend = backend
        return x_out, agg

    @staticmethod
    def backward(ctx, grad_x_out, grad_agg):
        x_out, h_pre = ctx.saved_tensors
        grad_sum, grad_h_pre = _residual_add_agg_backward_impl(_contig(grad_x_out), _contig(grad_agg), x_out, h_pre,
                                                               ctx.backend)
        return grad_sum, grad_sum, grad_h_pre, None


# ---- public API: argument checks, casts, leading dims ----------------------------------------------------


def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype).contiguous()


def _params(x: Tensor, fn, base, scale):
    """Checked parameters cast to the coefficient dtype."""
    k = coef_dtype(x.dtype)
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
    *lead, n, C = x.shape
    outs = torch.ops.mhc.pre(x.reshape(-1, n, C).contiguous(), fn, base, scale, *hyper, _backend)
    layer_input, h_pre, h_post, comb = outs[:4]
    return (layer_input.view(*lead, C), h_pre.view(*lead, n), h_post.view(*lead, n), comb.view(*lead, n, n))


def _post_inputs(op: str, x, y, h_post, comb):
    check_post(op, x, y, h_post, comb)
    n, C = x.shape[-2:]
    k = coef_dtype(x.dtype)
    return (x.reshape(-1, n, C).contiguous(), y.to(x.dtype).reshape(-1, C).contiguous(),
            h_post.to(k).reshape(-1, n).contiguous(), comb.to(k).reshape(-1, n, n).contiguous())


def mhc_post(x: Tensor, y: Tensor, h_post: Tensor, comb: Tensor) -> Tensor:
    """mHC post: ``x_next[o] = h_post[o] * y + sum_i comb[i, o] * x[i]``; ``x [..., n, C]``, ``y [..., C]``."""
    flat = _post_inputs("mhc_post", x, y, h_post, comb)
    return torch.ops.mhc.post(*flat, _backend).view(x.shape)


def mhc_post_pre(x: Tensor, y: Tensor, h_post: Tensor, comb: Tensor, fn: Optional[Tensor], base: Tensor,
                 scale: Optional[Tensor], *, iters: int = 20, post_mult: float = 2.0, eps: float = 1e-6,
                 norm_eps: float = 1e-6, pre_eps: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """post of this site fused with pre of the next (whose parameters are fn, base, scale).

    -> ``(x_next [..., n, C], layer_input [..., C], h_pre [..., n], h_post [..., n], comb [..., n, n])``.
    """
    hyper = check_pre("mhc_post_pre", x, fn, base, scale, iters, post_mult, eps, norm_eps, pre_eps)
    flat = _post_inputs("mhc_post_pre", x, y, h_post, comb)
    fn, base, scale = _params(x, fn, base, scale)
    *lead, n, C = x.shape
    outs = torch.ops.mhc.post_pre(*flat, fn, base, scale, *hyper, _backend)
    x_next, layer_input, h_pre, h_post_next, comb_next = outs[:5]
    return (x_next.view(x.shape), layer_input.view(*lead, C), h_pre.view(*lead, n), h_post_next.view(*lead, n),
            comb_next.view(*lead, n, n))


def sinkhorn(logits: Tensor, *, iters: int = 20, eps: float = 1e-6) -> Tensor:
    """Sinkhorn normalisation of ``[..., n, n]`` logits (float32; float64 stays float64)."""
    iters, eps = check_sinkhorn("sinkhorn", logits, iters, eps)
    n = logits.shape[-1]
    flat = logits.to(coef_dtype(logits.dtype)).reshape(-1, n, n).contiguous()
    return torch.ops.mhc.sinkhorn(flat, iters, eps, _backend).view(logits.shape)


def expand_streams(x: Tensor, n: int) -> Tensor:
    """``[..., C]`` -> ``[..., n, C]``, every stream a copy of x (the backward sums over streams)."""
    n = check_expand("expand_streams", x, n)
    C = x.shape[-1]
    out = torch.ops.mhc.expand_streams(x.reshape(-1, C).contiguous(), n, _backend)
    return out.view(*x.shape[:-1], n, C)


def mhc_head(x: Tensor, fn: Optional[Tensor], base: Tensor, scale: Optional[Tensor], *, eps: float = 1e-6
             ) -> Tensor:
    """Learned head collapse ``[..., n, C]`` -> ``[..., C]``: ``w = sigmoid(mixes * scale + base) + eps``,
    ``out = sum_i w[i] x[i]``; ``fn [n, n*C]`` (or None), ``base [n]``, ``scale [1]`` (or None)."""
    eps = check_head("mhc_head", x, fn, base, scale, eps)
    fn, base, scale = _params(x, fn, base, scale)
    *lead, n, C = x.shape
    out = torch.ops.mhc.head(x.reshape(-1, n, C).contiguous(), fn, base, scale, eps, _backend)[0]
    return out.view(*lead, C)


def residual_add_agg(x: Tensor, res: Tensor, h_pre: Tensor) -> Tuple[Tensor, Tensor]:
    """``x_out = x + res`` and ``agg = sum_i h_pre[i] * x_out[i]`` in one pass; ``x, res [..., n, C]``, ``h_pre [..., n]``."""
    check_residual_add_agg("residual_add_agg", x, res, h_pre)
    *lead, n, C = x.shape
    flat = x.dim() == 3  # already [T, n, C]: no reshapes (a cheap op feels every us of Python)
    x_in = x.contiguous() if flat else x.reshape(-1, n, C).contiguous()
    res_in = res if res.dtype == x.dtype else res.to(x.dtype)
    res_in = res_in.contiguous() if flat else res_in.reshape(-1, n, C).contiguous()
    k = coef_dtype(x.dtype)
    h_in = h_pre if h_pre.dtype == k else h_pre.to(k)
    h_in = h_in.contiguous() if flat else h_in.reshape(-1, n).contiguous()
    if not eager(x_in, res_in, h_in):
        x_out, agg = torch.ops.mhc.residual_add_agg(x_in, res_in, h_in, _backend)
    elif torch.is_grad_enabled() and (x_in.requires_grad or res_in.requires_grad or h_in.requires_grad):
        x_out, agg = _ResidualAddAggFunction.apply(x_in, res_in, h_in, _backend)
    else:  # nothing to differentiate: the kernel alone
        x_out, agg = _residual_add_agg_impl(x_in, res_in, h_in, _backend)
    return (x_out, agg) if flat else (x_out.view(x.shape), agg.view(*lead, C))


# The multi-history skip ops live in history_ops.py; re-exported so every functional op is in mhc.ops.
from .history_ops import history_mix, history_skip, project_logits  # noqa: E402

__all__ += ["history_mix", "history_skip", "project_logits"]
