"""Argument checks shared by the public functions of both op families (:mod:`mhc.ops`,
:mod:`mhc.history_ops`).

They run in Python before any cast or kernel, read only metadata (type, dtype, device, shape), and so work the
same on real, meta and fake tensors and under torch.compile. Messages read ``mhc.<op>: <argument>: expected ...``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

STREAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_PLAIN = (Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling  # exact types of the fast checks; subclasses (DTensor, fake) take the full ones


_STREAM_DTYPE_SET = frozenset(STREAM_DTYPES)


def check_tensor(op: str, name: str, t, *, optional: bool = False) -> None:
    """A tensor of a supported floating dtype (None too when ``optional``)."""
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"mhc.{op}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _STREAM_DTYPE_SET:
        raise TypeError(f"mhc.{op}: {name}: expected dtype bfloat16, float16, float32 or float64, got {t.dtype}")


def same_device(op: str, lead_name: str, lead: Tensor, **others: Optional[Tensor]) -> None:
    """Every tensor in ``others`` (None entries skipped) on ``lead``'s device, as torch's own ops require.

    Without it a meta tensor among CPU ones would reach the fake implementation, which allocates real,
    uninitialised outputs."""
    device = lead.device
    for name, t in others.items():
        if t is not None and t.device != device:
            raise RuntimeError(f"mhc.{op}: {name}: expected a tensor on {lead_name}'s device ({device}), got one "
                               f"on {t.device}")


def int_arg(op: str, name: str, value, low: int, high: Optional[int] = None) -> int:
    """A Python int (not a bool, not a float) in ``[low, high]``."""
    if type(value) is int and not _is_compiling() and value >= low and (high is None or value <= high):
        return value  # the common case, first (under torch.compile an int may stand for a symbol)
    if isinstance(value, torch.SymInt):  # traced (also a decomposition run on fake tensors): checked when real
        return value
    if torch.compiler.is_compiling():  # numbers may be symbolic there; eager calls and the C++ core check them
        return int(value)
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"mhc.{op}: {name}: expected an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"mhc.{op}: {name}: expected an int {bounds}, got {value}")
    return int(value)


def real_arg(op: str, name: str, value, *, low: Optional[float] = None, positive: bool = False) -> float:
    """A finite Python number, ``>= low`` (or ``> 0`` when ``positive``)."""
    if type(value) is float and not _is_compiling() and math.isfinite(value) and (not positive or value > 0) \
            and (low is None or value >= low):  # the common case, first (torch.compile: see below)
        return value
    if isinstance(value, (torch.SymInt, torch.SymFloat)):  # traced: checked when real
        return value
    if torch.compiler.is_compiling():  # numbers may be symbolic there; eager calls and the C++ core check them
        return float(value)
    if type(value) is not float:  # the common case skips the slower abstract-class checks
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"mhc.{op}: {name}: expected a number, got {type(value).__name__}")
        value = float(value)
    if not math.isfinite(value) or (positive and not value > 0) or (low is not None and value < low):
        wanted = "a finite value" + (" > 0" if positive else f" >= {low:g}" if low is not None else "")
        raise ValueError(f"mhc.{op}: {name}: expected {wanted}, got {value}")
    return value


# ---- the n-stream ops (mhc.ops and mhc.reference take the same arguments and check them alike) -------------

MAX_STREAMS = 64


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


_N_C = ("n", "C")


def _stream_input(op: str, name: str, x, trailing: Tuple[str, ...]) -> None:
    """The tensor that fixes an op's shapes: layout [..., *trailing], each trailing dim >= 1 (n <= 64 too)."""
    check_tensor(op, name, x)
    shape = x.shape
    if trailing == _N_C:  # the common case of the common layout, in one test
        if len(shape) >= 2 and 1 <= shape[-2] <= MAX_STREAMS and shape[-1] >= 1:
            return
    elif len(shape) >= len(trailing) and min(shape[-len(trailing):]) >= 1 and all(
            size <= MAX_STREAMS for dim_name, size in zip(trailing, shape[-len(trailing):]) if dim_name == "n"):
        return
    layout = lambda: "[..., " + ", ".join(trailing) + "]"  # noqa: E731  (only an error message needs it)
    if x.dim() < len(trailing):
        raise ValueError(f"mhc.{op}: {name}: expected a tensor {layout()}, got shape {_shape_str(x.shape)}")
    for dim_name, size in zip(trailing, x.shape[-len(trailing):]):
        if size < 1:
            raise ValueError(f"mhc.{op}: {name}: {layout()} needs {dim_name} >= 1, got shape {_shape_str(x.shape)}")
        if dim_name == "n" and size > MAX_STREAMS:
            raise ValueError(f"mhc.{op}: {name}: {layout()} needs n <= {MAX_STREAMS} streams, got shape "
                             f"{_shape_str(x.shape)}")


def _per_token(op: str, name: str, t, shape: Tuple[int, ...], layout: str) -> None:
    """A per-token tensor whose full shape is fixed by the leading stream tensor."""
    check_tensor(op, name, t)
    if t.shape != shape:
        raise ValueError(f"mhc.{op}: {name}: expected shape {layout} = {_shape_str(shape)}, "
                         f"got {_shape_str(t.shape)}")


def _param_shape(op: str, name: str, t: Optional[Tensor], shape: Tuple[int, ...], layout: str) -> None:
    if t is not None and t.shape != shape:
        raise ValueError(f"mhc.{op}: {name}: expected shape {layout} = {_shape_str(shape)}, got {_shape_str(t.shape)}")


def _site_params(op: str, x: Tensor, fn, base, scale, *, head: bool = False) -> None:
    """A site's (or, with ``head``, a head's) parameters, checked in Python so fake and meta tensors (which never
    reach the C++ checks) are held to the same rules."""
    n, C = x.shape[-2:]
    rows = n if head else n * n + 2 * n
    scales = 1 if head else 3
    device = x.device
    if (type(base) in _PLAIN and base.dtype in _STREAM_DTYPE_SET and base.device == device and base.shape == (rows,)
            and (fn is None and scale is None
                 or type(fn) in _PLAIN and type(scale) in _PLAIN and fn.dtype in _STREAM_DTYPE_SET
                 and scale.dtype in _STREAM_DTYPE_SET and fn.device == device and scale.device == device
                 and fn.shape == (rows, n * C) and scale.shape == (scales,))):
        return  # the common case (plain tensors, all valid), in one test
    check_tensor(op, "fn", fn, optional=True)
    check_tensor(op, "base", base)
    check_tensor(op, "scale", scale, optional=True)
    same_device(op, "x", x, fn=fn, base=base, scale=scale)
    rows_name = "n" if head else "n*n+2n"
    _param_shape(op, "fn", fn, (rows, n * C), f"[{rows_name}, n*C]")
    _param_shape(op, "base", base, (rows,), f"[{rows_name}]")
    _param_shape(op, "scale", scale, (scales,), f"[{scales}]")
    if fn is not None and scale is None:
        raise ValueError(f"mhc.{op}: scale: required when fn is given (both None is static mode)")
    if fn is None and scale is not None:  # it would scale nothing: static mode has no projection
        raise ValueError(f"mhc.{op}: scale: expected None when fn is None (static mode), got a tensor")


def check_pre(op: str, x, fn, base, scale, iters, post_mult, eps, norm_eps, pre_eps) -> tuple:
    """Arguments of a site's pre; returns the hyper-parameters ``(iters, post_mult, eps, norm_eps, pre_eps)``."""
    _stream_input(op, "x", x, ("n", "C"))
    _site_params(op, x, fn, base, scale)
    # The common case (a module's own values) in one test; is_compiling first: numbers may be symbolic there.
    if (not _is_compiling() and type(iters) is int and type(post_mult) is float and type(eps) is float
            and type(norm_eps) is float and type(pre_eps) is float and iters >= 1 and eps >= 0.0 and norm_eps >= 0.0
            and pre_eps >= 0.0 and math.isfinite(post_mult + eps + norm_eps + pre_eps)):
        return iters, post_mult, eps, norm_eps, pre_eps
    return (int_arg(op, "iters", iters, 1), real_arg(op, "post_mult", post_mult),
            real_arg(op, "eps", eps, low=0.0), real_arg(op, "norm_eps", norm_eps, low=0.0),
            real_arg(op, "pre_eps", pre_eps, low=0.0))


def check_post(op: str, x, y, h_post, comb) -> None:
    _stream_input(op, "x", x, ("n", "C"))
    shape, device = x.shape, x.device
    lead = shape[:-2]
    n, C = shape[-2:]
    if (type(y) in _PLAIN and type(h_post) in _PLAIN and type(comb) in _PLAIN and y.dtype in _STREAM_DTYPE_SET
            and h_post.dtype in _STREAM_DTYPE_SET and comb.dtype in _STREAM_DTYPE_SET and y.shape == lead + (C,)
            and h_post.shape == lead + (n,) and comb.shape == lead + (n, n) and y.device == device
            and h_post.device == device and comb.device == device):
        return  # the common case (plain tensors, all valid), in one test
    _per_token(op, "y", y, lead + (C,), "[..., C]")
    _per_token(op, "h_post", h_post, lead + (n,), "[..., n]")
    _per_token(op, "comb", comb, lead + (n, n), "[..., n, n]")
    same_device(op, "x", x, y=y, h_post=h_post, comb=comb)


def check_sinkhorn(op: str, logits, iters, eps) -> Tuple[int, float]:
    _stream_input(op, "logits", logits, ("n", "n"))
    if logits.shape[-2] != logits.shape[-1]:
        raise ValueError(f"mhc.{op}: logits: expected square [..., n, n] matrices, got shape "
                         f"{_shape_str(logits.shape)}")
    return int_arg(op, "iters", iters, 1), real_arg(op, "eps", eps, low=0.0)


def check_expand(op: str, x, n) -> int:
    _stream_input(op, "x", x, ("C",))
    return int_arg(op, "n", n, 1, MAX_STREAMS)


def check_head(op: str, x, fn, base, scale, eps) -> float:
    _stream_input(op, "x", x, ("n", "C"))
    _site_params(op, x, fn, base, scale, head=True)
    return real_arg(op, "eps", eps, low=0.0)


def check_residual_add_agg(op: str, x, res, h_pre) -> None:
    _stream_input(op, "x", x, ("n", "C"))
    *lead, n, C = x.shape
    lead = tuple(lead)
    _per_token(op, "res", res, lead + (n, C), "[..., n, C]")
    _per_token(op, "h_pre", h_pre, lead + (n,), "[..., n]")
    same_device(op, "x", x, res=res, h_pre=h_pre)
