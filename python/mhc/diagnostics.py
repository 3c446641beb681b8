"""Stability diagnostics from the mHC paper: the Amax gain magnitude of the composite residual mapping.

Site ``l`` mixes the streams with ``H_res(l) = comb(l)^T`` (``x_next[o] = sum_i comb[i, o] x[i]``), so after L sites
the residual path is ``P = H_res(L) ... H_res(1) = (comb(1) comb(2) ... comb(L))^T``. The paper's Amax gain
magnitude measures how much that product can amplify a signal:

- forward: the largest absolute row sum of ``P`` (``max_o sum_i |P[o, i]|``, the infinity norm);
- backward: the largest absolute column sum of ``P`` (``max_i sum_o |P[o, i]|``, the 1-norm), which bounds
  the gradient flowing back through the residual path.

A doubly stochastic ``comb`` keeps both at 1 for any depth; unconstrained hyper-connections let them grow
(or shrink) geometrically.

:class:`CombRecorder` collects the ``comb`` of every :class:`mhc.MHC` site of a model during a forward (detached
tensors left on their device: no host synchronisation), and :meth:`CombRecorder.amax_gain` reduces them after.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .modules import MHC

__all__ = ["AmaxGain", "amax_gain", "CombRecorder"]


class AmaxGain(NamedTuple):
    forward: Tensor   # max absolute row sum of the composite H_res
    backward: Tensor  # max absolute column sum of the composite H_res


_REDUCTIONS = ("max", "mean", "none")


def amax_gain(combs: Sequence[Tensor], *, reduce: str = "max", cumulative: bool = False) -> AmaxGain:
    """Amax gain magnitudes of ``H_res(L) ... H_res(1)`` from the per-site ``combs`` (in layer order).

    Args:
        combs: a non-empty sequence of ``[..., n, n]`` tensors (``comb = H_res^T``, as :meth:`mhc.MHC.pre` returns),
            all with the same ``n`` and leading dims that broadcast (one entry per token, or one matrix per site).
        reduce: over the leading (token) dims: ``"max"`` (the worst token, default), ``"mean"`` or ``"none"``.
        cumulative: if True, the gains of every prefix ``H_res(l) ... H_res(1)`` for ``l = 1..L``, stacked on a new
            leading axis of size L (the paper's curve against depth); else only the full product.

    Returns:
        :class:`AmaxGain` ``(forward, backward)``, computed in float64.
    """
    if reduce not in _REDUCTIONS:
        raise ValueError(f"mhc.diagnostics.amax_gain: reduce: expected one of {_REDUCTIONS}, got {reduce!r}")
    if isinstance(combs, Tensor) or not isinstance(combs, (list, tuple)):
        raise TypeError(f"mhc.diagnostics.amax_gain: combs: expected a list or tuple of [..., n, n] tensors, got "
                        f"{type(combs).__name__}")
    if len(combs) == 0:
        raise ValueError("mhc.diagnostics.amax_gain: combs: expected at least one tensor, got an empty sequence")
    n = None
    for index, comb in enumerate(combs):
        if not isinstance(comb, Tensor):
            raise TypeError(f"mhc.diagnostics.amax_gain: combs[{index}]: expected a Tensor, got {type(comb).__name__}")
        if not comb.is_floating_point():
            raise TypeError(f"mhc.diagnostics.amax_gain: combs[{index}]: expected a floating dtype, got {comb.dtype}")
        if comb.dim() < 2 or comb.shape[-1] != comb.shape[-2]:
            raise ValueError(f"mhc.diagnostics.amax_gain: combs[{index}]: expected [..., n, n], got {list(comb.shape)}")
        if n is None:
            n = comb.shape[-1]
        elif comb.shape[-1] != n:
            raise ValueError(f"mhc.diagnostics.amax_gain: combs[{index}]: expected n = {n} like combs[0], got "
                             f"{comb.shape[-1]}")
    forward, backward = [], []
    product: Optional[Tensor] = None  # comb(1) ... comb(l) = P^T
    for index, comb in enumerate(combs):
        comb = comb.detach().to(torch.float64)
        product = comb if product is None else product @ comb
        if cumulative or index == len(combs) - 1:
            absolute = product.abs()
            # P = product^T: the row sums of P are the column sums of product, and vice versa.
            forward.append(_reduce(absolute.sum(dim=-2).amax(dim=-1), reduce))
            backward.append(_reduce(absolute.sum(dim=-1).amax(dim=-1), reduce))
    if cumulative:
        return AmaxGain(torch.stack(torch.broadcast_tensors(*forward)), torch.stack(torch.broadcast_tensors(*backward)))
    return AmaxGain(forward[-1], backward[-1])


def _reduce(values: Tensor, reduce: str) -> Tensor:
    if reduce == "max":
        return values.amax() if values.dim() > 0 else values
    if reduce == "mean":
        return values.mean()
    return values


class CombRecorder:
    """Records the ``comb`` of every :class:`mhc.MHC` site of ``model`` each time the site's ``post`` (or
    ``post_pre``) consumes it, in call order, i.e. layer order within one forward.

    Use as a context manager; the recording hooks are removed on exit::

        with mhc.diagnostics.CombRecorder(model) as recorder:
            model(tokens)
        gain = recorder.amax_gain()          # AmaxGain(forward, backward), reduced after the forward

    The recorded tensors are detached and stay on their device (nothing is copied to the host during the forward).
    A model run several times inside the context records each run; :meth:`clear` empties the list.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"mhc.diagnostics.CombRecorder: model: expected an nn.Module, got "
                            f"{type(model).__name__}")
        self.sites = [module for module in model.modules() if isinstance(module, MHC)]
        if not self.sites:
            raise ValueError(f"mhc.diagnostics.CombRecorder: model: it has no mhc.MHC site "
                             f"({type(model).__name__})")
        self.combs: List[Tensor] = []
        self.site_names: List[str] = []
        names = {id(module): name for name, module in model.named_modules()}
        self._names = {id(site): names.get(id(site), "") for site in self.sites}
        self._active = False

    def _wrap(self, site: MHC) -> None:
        post, post_pre = site.post, site.post_pre  # bound methods of the class
        name = self._names[id(site)]

        def recording_post(x, y, state):
            self._record(name, state.comb)
            return post(x, y, state)

        def recording_post_pre(x, y, state, next_site):
            self._record(name, state.comb)
            return post_pre(x, y, state, next_site)

        site.post, site.post_pre = recording_post, recording_post_pre  # instance attributes shadow the methods

    def _record(self, name: str, comb: Tensor) -> None:
        self.combs.append(comb.detach())
        self.site_names.append(name)

    def __enter__(self) -> "CombRecorder":
        if self._active:
            raise RuntimeError("mhc.diagnostics.CombRecorder: already recording")
        for site in self.sites:
            self._wrap(site)
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        for site in self.sites:
            for attribute in ("post", "post_pre"):
                site.__dict__.pop(attribute, None)
        self._active = False

    def clear(self) -> None:
        self.combs.clear()
        self.site_names.clear()

    def amax_gain(self, *, reduce: str = "max", cumulative: bool = False) -> AmaxGain:
        """:func:`amax_gain` of the recorded combs, in recording order."""
        if not self.combs:
            raise ValueError("mhc.diagnostics.CombRecorder.amax_gain: nothing recorded (run the model inside the "
                             "`with` block)")
        return amax_gain(self.combs, reduce=reduce, cumulative=cumulative)
