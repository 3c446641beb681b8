"""Argument checks shared by the public functions of both op families (:mod:`mhc.ops`, :mod:`mhc.history_ops`).

They run in Python before any cast or kernel, read only metadata (type, dtype, device, shape), and so work the
same on real, meta and fake tensors and under torch.compile. Messages read ``mhc.<op>: <argument>: expected ...``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

STREAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, t, *, optional: bool = False) -> None:
    """A tensor of a supported floating dtype (None too when ``optional``)."""
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"mhc.{op}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in STREAM_DTYPES:
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
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"mhc.{op}: {name}: expected an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"mhc.{op}: {name}: expected an int {bounds}, got {value}")
    return int(value)


def real_arg(op: str, name: str, value, *, low: Optional[float] = None, positive: bool = False) -> float:
    """A finite Python number, ``>= low`` (or ``> 0`` when ``positive``)."""
    if type(value) is not float:  # the common case skips the slower abstract-class checks
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"mhc.{op}: {name}: expected a number, got {type(value).__name__}")
        value = float(value)
    if not math.isfinite(value) or (positive and not value > 0) or (low is not None and value < low):
        wanted = "a finite value" + (" > 0" if positive else f" >= {low:g}" if low is not None else "")
        raise ValueError(f"mhc.{op}: {name}: expected {wanted}, got {value}")
    return value
