"""nn.Modules of the n-stream mHC layer: one site (:class:`MHC`), the drop-in layer (:class:`MHCLayer`),
stream expansion (:class:`StreamExpand`) and the head collapse (:class:`MHCHead`).

Initialisation (every learned site): a fresh model computes exactly what a plain residual network
computes, up to ``alpha_init``-sized perturbations. With the embedding expanded to ``n`` identical
streams ``x_i = e``:

- ``h_pre = 1/n`` (``base_pre = logit(1/n)``), so ``layer_input = sum_i h_pre[i] x_i = e``;
- ``h_post = 1`` (``base_post = logit(1/post_mult)``, 0 for the default ``post_mult = 2``), so every stream
  receives ``+F(layer_input)``;
- ``comb`` is doubly stochastic with 0.95 on the diagonal and 0.05/(n-1) elsewhere
  (``base_comb`` = ``log(19 (n-1))`` on the diagonal, 0 off it; the softmax already is doubly stochastic, so
  Sinkhorn keeps it). Identical streams stay identical under any doubly stochastic ``comb``, and near-identity
  keeps streams apart once they diverge, while the logits stay far from saturation so they still learn;
- ``fn ~ N(0, 1/(n*C))`` so the RMS-normalised ``mixes`` have unit variance, and ``scale = alpha_init``
  (0.01, paper Table 5): the dynamic part perturbs the logits by about 0.01 and breaks the symmetry
  between streams. ``n = 1`` uses ``h_pre = 0.99`` (``logit(1)`` is infinite).

So ``x_next_i = e + F(e)`` for every stream at step 0 (to within about 1%), i.e. the residual network
``x + F(x)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops, reference
from ._checks import check_tensor, int_arg, real_arg

__all__ = ["MHCState", "MHC", "MHCLayer", "StreamExpand", "MHCHead"]

_COMB_INIT_DIAG = 0.95  # initial diagonal of comb (H_res): near identity, not saturated
_IMPLS = {"fused": ops, "torch": reference}


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _pre_base(n: int) -> float:
    return _logit(min(1.0 / n, 0.99))


_PLAIN_TENSOR_TYPES = (Tensor, nn.Parameter)


def _parameters_for_ops(module: nn.Module, x: Tensor, params: tuple) -> tuple:
    """``params`` as the ops take them for the streams ``x``. Plain tensors pass as they are; other tensor types
    go through :mod:`mhc.distributed`, which gives the local copy of a replicated DTensor parameter (tensor
    parallelism) or says why a DTensor layout cannot work, and passes the rest (fake tensors). It is imported
    only here: it loads ``torch.distributed.tensor``, 0.7 s."""
    if type(x) in _PLAIN_TENSOR_TYPES:
        for p in params:
            if p is not None and type(p) not in _PLAIN_TENSOR_TYPES:
                break
        else:
            return params
    if not torch.distributed.is_available():  # a build without torch.distributed has no DTensor
        return params
    from . import distributed

    return distributed.local_parameters(module, x, params)


def _width_args(owner: str, n, C) -> Tuple[int, int]:
    return int_arg(owner, "n", n, 1, 64), int_arg(owner, "C", C, 1)


def _impl(name: str):
    if name not in _IMPLS:
        raise ValueError(f"mhc: impl: expected 'fused' or 'torch', got {name!r}")
    return _IMPLS[name]


class MHCState(NamedTuple):
    """Per-token coefficients of one site, computed by :meth:`MHC.pre` and consumed by :meth:`MHC.post`."""

    h_pre: Tensor   # [..., n]
    h_post: Tensor  # [..., n]
    comb: Tensor    # [..., n, n], comb[i, o] = H_res[o, i]


class MHC(nn.Module):
    """One mHC site around a sub-layer F: ``layer_input, state = site.pre(x)``, ``y = F(norm(layer_input))``,
    ``x = site.post(x, y, state)``.

    Args:
        n: number of residual streams (1..64); C: width of each stream.
        iters, post_mult, eps, norm_eps, pre_eps: docs/MATH.md section 1 hyper-parameters (paper defaults).
        alpha_init: initial gating scales (alpha_pre, alpha_post, alpha_res).
        static: no projection (``fn`` and ``scale`` are None): coefficients come from ``base`` alone.
        impl: ``"fused"`` (mhc.ops, the C++/CUDA kernels) or ``"torch"`` (mhc.reference, plain PyTorch).

    Parameters (float32): ``fn [n*n+2n, n*C]``, ``base [n*n+2n]``, ``scale [3]``. See the module docstring
    for the initialisation, which starts the model as a plain residual network.
    """

    def __init__(self, n: int, C: int, *, iters: int = 20, post_mult: float = 2.0, eps: float = 1e-6,
                 norm_eps: float = 1e-6, pre_eps: float = 1e-6, alpha_init: float = 0.01, static: bool = False,
                 impl: str = "fused"):
        super().__init__()
        n, C = _width_args("MHC", n, C)
        self.n, self.C = n, C
        # Checked here as the ops check them, so a bad value fails at construction, not at the first call.
        self.iters, self.post_mult = int_arg("MHC", "iters", iters, 1), real_arg("MHC", "post_mult", post_mult)
        self.eps, self.norm_eps, self.pre_eps = (real_arg("MHC", name, value, low=0.0) for name, value in
                                                 (("eps", eps), ("norm_eps", norm_eps), ("pre_eps", pre_eps)))
        self.alpha_init, self.static = alpha_init, static
        _impl(impl)
        self.impl = impl
        m = n * n + 2 * n
        # Registered even when None (static mode), so the ops read them from _parameters: a dict lookup, where
        # attribute access goes through nn.Module.__getattr__ (about 1 us each per call).
        self.register_parameter("fn", None if static else nn.Parameter(torch.empty(m, n * C)))
        self.base = nn.Parameter(torch.empty(m))
        self.register_parameter("scale", None if static else nn.Parameter(torch.empty(3)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n = self.n
        base = torch.zeros(n * n + 2 * n)
        base[:n] = _pre_base(n)
        base[n:2 * n] = _logit(1.0 / self.post_mult) if self.post_mult > 1 else 0.0
        if n > 1:
            base[2 * n:].view(n, n).diagonal().fill_(math.log(_COMB_INIT_DIAG * (n - 1) / (1 - _COMB_INIT_DIAG)))
        self.base.copy_(base)
        if self.fn is not None:
            nn.init.normal_(self.fn, std=1.0 / math.sqrt(n * self.C))
            self.scale.fill_(self.alpha_init)

    @property
    def _ops(self):
        return _IMPLS[self.impl]  # a property: module objects must not be attributes (deepcopy, pickle)

    def _hyper(self) -> dict:
        return dict(iters=self.iters, post_mult=self.post_mult, eps=self.eps, norm_eps=self.norm_eps,
                    pre_eps=self.pre_eps)

    def forward(self, x: Tensor, y: Optional[Tensor] = None, state: Optional[MHCState] = None, *,
                then_pre: bool = False):
        """Every use of the site is one call of the module, so that module hooks see it (FSDP2 gathers the
        parameters in one, profilers time it); :meth:`pre`, :meth:`post` and :meth:`post_pre` call this.

        - ``site(x)`` -> ``(layer_input, state)``: the pre.
        - ``site(x, y, state)`` -> ``x_next``: the post; it reads no parameter (``state`` holds the coefficients).
        - ``site(x, y, state, then_pre=True)`` -> ``(x_next, layer_input, state of this site)``: the post that
          consumes ``state`` fused with this site's pre, one pass over the residual.
        """
        if y is None and state is None:
            if then_pre:
                raise ValueError("mhc.MHC: then_pre=True needs y and state (the post that comes before the pre)")
            return self._pre(x)
        if y is None or state is None:
            raise ValueError(f"mhc.MHC: y and state: give both (post) or neither (pre), got "
                             f"y={type(y).__name__}, state={type(state).__name__}")
        if then_pre:
            return self._post_pre(x, y, state)
        if type(x) not in _PLAIN_TENSOR_TYPES:
            _parameters_for_ops(self, x, ())  # a DTensor x raises there
        return _IMPLS[self.impl].mhc_post(x, y, state.h_post, state.comb)

    def pre(self, x: Tensor) -> Tuple[Tensor, MHCState]:
        """``x [..., n, C]`` -> ``(layer_input [..., C], state)``; same as ``site(x)``."""
        return self(x)

    def post(self, x: Tensor, y: Tensor, state: MHCState) -> Tensor:
        """``x_next[o] = h_post[o] * y + sum_i comb[i, o] * x[i]``; y is F's output ``[..., C]``; same as
        ``site(x, y, state)``."""
        return self(x, y, state)

    def post_pre(self, x: Tensor, y: Tensor, state: MHCState, next_site: "MHC") -> Tuple[Tensor, Tensor, MHCState]:
        """This site's post fused with ``next_site``'s pre (one pass over the residual):
        -> ``(x_next, layer_input of next_site, state of next_site)``. A call of ``next_site``, whose parameters
        it reads: ``next_site(x, y, state, then_pre=True)``."""
        return next_site(x, y, state, then_pre=True)

    def _pre(self, x: Tensor) -> Tuple[Tensor, MHCState]:
        fn, base, scale = self._parameters_for_ops(x)
        try:
            layer_input, h_pre, h_post, comb = _IMPLS[self.impl].mhc_pre(
                x, fn, base, scale, iters=self.iters, post_mult=self.post_mult, eps=self.eps, norm_eps=self.norm_eps,
                pre_eps=self.pre_eps)
        except ValueError:
            self._check_width(x)
            raise
        return layer_input, MHCState(h_pre, h_post, comb)

    def _post_pre(self, x: Tensor, y: Tensor, state: MHCState) -> Tuple[Tensor, Tensor, MHCState]:
        fn, base, scale = self._parameters_for_ops(x)
        try:
            x_next, layer_input, h_pre, h_post, comb = _IMPLS[self.impl].mhc_post_pre(
                x, y, state.h_post, state.comb, fn, base, scale, iters=self.iters, post_mult=self.post_mult,
                eps=self.eps, norm_eps=self.norm_eps, pre_eps=self.pre_eps)
        except ValueError:
            self._check_width(x)
            raise
        return x_next, layer_input, MHCState(h_pre, h_post, comb)

    def _check_width(self, x) -> None:
        """After the op refused the call: an x of another site's width is the error to name (the op, which does not
        know this site's n and C, would name the parameter that disagrees with x)."""
        if isinstance(x, Tensor) and x.dim() >= 2 and tuple(x.shape[-2:]) != (self.n, self.C):
            raise ValueError(f"mhc.MHC: x: expected [..., n, C] = [..., {self.n}, {self.C}] (this site's n and C), "
                             f"got shape {list(x.shape)}")

    def _parameters_for_ops(self, x: Tensor) -> Tuple[Optional[Tensor], Tensor, Optional[Tensor]]:
        p = self._parameters
        if len(p) == 3:  # all three there (a parametrization moves its tensor out of _parameters: read it below)
            return _parameters_for_ops(self, x, (p["fn"], p["base"], p["scale"]))
        return _parameters_for_ops(self, x, (self.fn, self.base, self.scale))

    def extra_repr(self) -> str:
        return (f"n={self.n}, C={self.C}, iters={self.iters}, post_mult={self.post_mult}, static={self.static}, "
                f"impl={self.impl!r}")


class MHCLayer(nn.Module):
    """The drop-in layer: one mHC site around ``sublayer`` (F), streams in, streams out.

    Input ``[B, n, C]`` or ``[B, S, n, C]``; returns the same shape:
    ``layer_input, state = pre(x); x_next = post(x, sublayer(layer_input), state)``.
    With ``sublayer=None``, F is an RMSNorm over C (as in mhc-mlx). Other keywords go to :class:`MHC`.
    """

    def __init__(self, n: int, C: int, sublayer: Optional[nn.Module] = None, **mhc_kwargs):
        super().__init__()
        self.n, self.C = n, C
        self.mhc = MHC(n, C, **mhc_kwargs)
        self.sublayer = sublayer if sublayer is not None else nn.RMSNorm(C, eps=self.mhc.norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("MHCLayer", "x", x)
        if x.dim() not in (3, 4) or tuple(x.shape[-2:]) != (self.n, self.C):
            raise ValueError(f"mhc.MHCLayer: x: expected shape [B, n, C] or [B, S, n, C] with n = {self.n}, "
                             f"C = {self.C}, got {list(x.shape)}")
        layer_input, state = self.mhc.pre(x)
        return self.mhc.post(x, self.sublayer(layer_input), state)


class StreamExpand(nn.Module):
    """``[..., C]`` -> ``[..., n, C]``: the embedding copied into every stream (its gradient is the sum)."""

    def __init__(self, n: int, *, impl: str = "fused"):
        super().__init__()
        self.n = int_arg("StreamExpand", "n", n, 1, 64)
        _impl(impl)
        self.impl = impl

    @property
    def _ops(self):
        return _IMPLS[self.impl]

    def forward(self, x: Tensor) -> Tensor:
        _parameters_for_ops(self, x, ())  # a DTensor x raises there
        return self._ops.expand_streams(x, self.n)

    def extra_repr(self) -> str:
        return f"n={self.n}"


class MHCHead(nn.Module):
    """Collapse ``[..., n, C]`` to ``[..., C]`` before the final norm and output projection.

    ``mode="learned"`` (DeepSeek-V4 style): ``w = sigmoid(mixes * scale + base) + eps``, ``out = sum_i w[i] x[i]``
    with ``fn [n, n*C]``, ``base [n]``, ``scale [1]`` initialised so ``w = 1/n`` up to ``alpha_init``
    perturbations (``fn ~ N(0, 1/(n*C))``, ``base = logit(1/n)``, ``scale = alpha_init``); ``mode="mean"``: plain mean
    over streams, no parameters.
    """

    def __init__(self, n: int, C: int, mode: str = "learned", *, eps: float = 1e-6, alpha_init: float = 0.01,
                 impl: str = "fused"):
        super().__init__()
        if mode not in ("learned", "mean"):
            raise ValueError(f"mhc.MHCHead: mode: expected 'learned' or 'mean', got {mode!r}")
        n, C = _width_args("MHCHead", n, C)
        self.n, self.C, self.mode, self.eps, self.alpha_init = n, C, mode, eps, alpha_init
        _impl(impl)
        self.impl = impl
        if mode == "learned":
            self.fn = nn.Parameter(torch.empty(n, n * C))
            self.base = nn.Parameter(torch.empty(n))
            self.scale = nn.Parameter(torch.empty(1))
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.mode == "learned":
            nn.init.normal_(self.fn, std=1.0 / math.sqrt(self.n * self.C))
            self.base.fill_(_pre_base(self.n))
            self.scale.fill_(self.alpha_init)

    @property
    def _ops(self):
        return _IMPLS[self.impl]

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("MHCHead", "x", x)
        if x.dim() < 2 or tuple(x.shape[-2:]) != (self.n, self.C):
            raise ValueError(f"mhc.MHCHead: x: expected streams [..., n, C] with n = {self.n}, C = {self.C}, "
                             f"got {list(x.shape)}")
        if self.mode == "mean":
            return x.mean(dim=-2)
        return self._ops.mhc_head(x, *_parameters_for_ops(self, x, (self.fn, self.base, self.scale)), eps=self.eps)

    def extra_repr(self) -> str:
        return f"n={self.n}, C={self.C}, mode={self.mode!r}"
