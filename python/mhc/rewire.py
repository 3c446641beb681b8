"""Wrap existing modules in mHC sites: :class:`MHCRewire` (one module) and :class:`AutoPatcher` (a whole model).

The mhc-mlx project calls these the "universal wrapper" and the "easy button". The math is docs/MATH.md section 1.

Two ways of feeding a wrapped module F (``[..., dims] -> [..., dims]``), fixed by ``io`` at construction (never
guessed from the input's shape: a plain ``[B, S, dims]`` input with ``S == n`` looks like streams):

- ``io="plain"`` (default), plain in, plain out (``x [..., dims]``): ``x`` is copied into ``n`` streams, the site
  runs, and the streams are averaged. Because they enter identical and leave averaged, the site reduces exactly to
  ``out = mean(h_post) * F(sum(h_pre) * x) + (sum(comb) / n) * x`` (``sum(comb) = n`` up to Sinkhorn's eps): with
  ``residual=True`` (default) it ADDS a residual path around F (``x + F(x)`` at initialisation, to about 1%);
  with ``residual=False`` the last term is left out and the site only gates F (``F(x)`` at initialisation), which
  is what :class:`AutoPatcher` uses so that a patched model starts as the function it was. The streams never carry
  different information between wrapped modules, so plain mode gives the gating, not the multi-stream residual;
  :func:`mhc.hf.convert_decoder` carries real streams through a decoder.
- ``io="streams"``, streams in, streams out (``x [..., n, dims]``): ``layer_input, state = pre(x)``;
  ``x_next = post(x, F(layer_input))``. This is the real n-stream residual; chain such wrappers between
  :class:`mhc.StreamExpand` and :class:`mhc.MHCHead`.

Zero-cost folding (:meth:`MHCRewire.fold`): for a static site (coefficients from ``base`` alone) in plain mode
around a float ``nn.Linear(W, b)``, the formula above is affine in ``x`` with constant coefficients, so the whole
site is one ``nn.Linear``: ``W' = mean(h_post) * sum(h_pre) * W + (sum(comb) / n) * I`` (no ``I`` term without the
residual), ``b' = mean(h_post) * b``.
It costs exactly what the original layer costs and is exact up to float rounding. Nothing else folds exactly:

- a dynamic site's coefficients depend on each token (``fn`` and the RMS of ``x``), so no constant weight can
  hold them, at inference either;
- in stream mode ``layer_input = sum_i h_pre[i] x[i]`` mixes n different streams; putting ``h_pre`` into the weight
  needs a ``[dims, n*dims]`` weight (n times the FLOPs of the aggregation it replaces), and ``post`` likewise;
- a quantised weight would have to be re-quantised after scaling, which changes its values.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Union

import torch
from torch import Tensor, nn

from ._checks import real_arg
from .modules import MHC

__all__ = ["MHCRewire", "AutoPatcher", "PatchReport", "is_square_linear"]

_IO_MODES = ("plain", "streams")


def _quantized_linear_types() -> tuple:
    types = []
    try:
        from torch.ao.nn.quantized import Linear as StaticQuantLinear
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear
        types += [StaticQuantLinear, DynamicQuantLinear]
    except ImportError:  # a torch built without the ao quantised modules
        pass
    return tuple(types)


def _qualified_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _features(module: nn.Module):
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_f, int) and isinstance(out_f, int):
        return in_f, out_f
    return None


def is_square_linear(module: nn.Module) -> bool:
    """True for a shape-preserving linear layer: ``nn.Linear`` (and subclasses), torch.ao's quantised Linear
    (static or dynamic), or any module whose class name ends in ``Linear`` with integer ``in_features ==
    out_features`` (weight-only quantised linears of other libraries follow that convention)."""
    if isinstance(module, MHCRewire):
        return False
    features = _features(module)
    if features is None or features[0] != features[1]:
        return False
    return isinstance(module, (nn.Linear,) + _quantized_linear_types()) or type(module).__name__.endswith("Linear")


class MHCRewire(nn.Module):
    """One mHC site around an existing shape-preserving module ``F: [..., dims] -> [..., dims]``.

    Args:
        module: F (an ``nn.Linear``, a quantised Linear, an MLP, ...). Kept as ``self.module``.
        dims: F's width (the stream width C).
        n: number of streams (1..64).
        io: ``"plain"`` (default: ``x [..., dims]`` in and out, whatever its shape) or ``"streams"``
            (``x [..., n, dims]`` in and out). Fixed at construction: a plain ``[B, S, dims]`` input with
            ``S == n`` has the shape of streams, so the shape alone cannot decide.
        residual: plain mode only. True (default): the output is the mean of the site's streams, ``F``'s branch
            plus the site's own residual path (``x + F(x)`` at initialisation). False: the site only gates F's
            input and output, ``out = mean(h_post) * F(sum(h_pre) * x)`` (``F(x)`` at initialisation), which is
            what :class:`AutoPatcher` uses so that a patched model starts as the function it was.
        norm: optional module applied to ``layer_input`` before F (a pre-norm); default none.
        **mhc_kwargs: keywords of :class:`mhc.MHC` (``static``, ``iters``, ``alpha_init``, ``impl``, ...).

    The site is ``self.mhc``, created on F's device (float32 parameters); see the module docstring for plain
    mode, its initialisation and :meth:`fold`.
    """

    def __init__(self, module: nn.Module, dims: int, n: int = 4, *, io: str = "plain", residual: bool = True,
                 norm: Optional[nn.Module] = None, **mhc_kwargs):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"mhc.MHCRewire: module: expected an nn.Module, got {type(module).__name__}")
        if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
            raise ValueError(f"mhc.MHCRewire: dims: expected an int >= 1, got {dims!r}")
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"mhc.MHCRewire: n: expected an int in 1..64, got {n!r}")
        if io == "auto":
            raise ValueError("mhc.MHCRewire: io: 'auto' is gone (it read a plain [B, S, dims] input with S == n as "
                             "streams); pass io='plain' (the default) or io='streams'")
        if io not in _IO_MODES:
            raise ValueError(f"mhc.MHCRewire: io: expected one of {_IO_MODES}, got {io!r}")
        if not isinstance(residual, bool):
            raise TypeError(f"mhc.MHCRewire: residual: expected a bool, got {type(residual).__name__}")
        if io == "streams" and not residual:
            raise ValueError("mhc.MHCRewire: residual: False applies to plain mode only (streams always keep the "
                             "residual)")
        features = _features(module)
        if features is not None and features != (dims, dims):
            raise ValueError(f"mhc.MHCRewire: module: expected a shape-preserving module of width dims = {dims}, "
                             f"got in_features = {features[0]}, out_features = {features[1]}")
        self.dims, self.n, self.io, self.residual = dims, n, io, residual
        self.module = module
        self.norm = norm
        self.mhc = MHC(n, dims, **mhc_kwargs)
        device = _module_device(module)
        if device is not None:  # the site lives with F (float32 parameters whatever F's dtype)
            self.mhc.to(device)

    def _apply_sublayer(self, layer_input: Tensor) -> Tensor:
        h = self.norm(layer_input) if self.norm is not None else layer_input
        return self.module(h)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"mhc.MHCRewire: x: expected a Tensor, got {type(x).__name__}")
        if self.io == "streams":
            if x.dim() < 2 or tuple(x.shape[-2:]) != (self.n, self.dims):
                raise ValueError(f"mhc.MHCRewire: x: expected streams [..., n, dims] with n = {self.n}, "
                                 f"dims = {self.dims}, got {list(x.shape)}")
            layer_input, state = self.mhc.pre(x)
            return self.mhc.post(x, self._apply_sublayer(layer_input), state)
        if x.dim() < 1 or x.shape[-1] != self.dims:
            raise ValueError(f"mhc.MHCRewire: x: expected [..., dims] with dims = {self.dims}, got {list(x.shape)}")
        streams = self.mhc._ops.expand_streams(x, self.n)
        layer_input, state = self.mhc.pre(streams)
        y = self._apply_sublayer(layer_input)
        if not self.residual:  # the streams' mean minus the residual path: mean(h_post) * F(layer_input)
            return state.h_post.mean(dim=-1, keepdim=True).to(y.dtype) * y
        return self.mhc.post(streams, y, state).mean(dim=-2)

    @torch.no_grad()
    def static_coefficients(self, dtype: torch.dtype = torch.float32):
        """``(h_pre [n], h_post [n], comb [n, n])`` of a static site: they do not depend on the input. ``dtype``:
        the stream dtype they are for (float64 streams use float64 coefficients, every other dtype float32)."""
        if not self.mhc.static:
            raise ValueError("mhc.MHCRewire.static_coefficients: the site is dynamic (static=False): its "
                             "coefficients depend on each token")
        probe = torch.ones(1, self.n, self.dims, device=self.mhc.base.device, dtype=dtype)  # any input: no fn
        _, h_pre, h_post, comb = self.mhc._ops.mhc_pre(probe, None, self.mhc.base, None, **self.mhc._hyper())
        return h_pre[0], h_post[0], comb[0]

    def fold_refusal(self) -> Optional[Exception]:
        """None when :meth:`fold` works, else the error it raises (saying why the site does not fold)."""
        module = self.module
        if isinstance(module, _quantized_linear_types()):
            return TypeError(f"mhc.MHCRewire.fold: module: {_qualified_name(module)} is quantised: scaling its weight "
                             "would need re-quantising, which changes its values; only a float nn.Linear folds")
        if type(module) is not nn.Linear:
            return TypeError(f"mhc.MHCRewire.fold: module: only a float nn.Linear folds exactly, got "
                             f"{_qualified_name(module)}")
        if not module.weight.is_floating_point():
            return TypeError(f"mhc.MHCRewire.fold: module: weight dtype {module.weight.dtype} is not floating")
        if not self.mhc.static:
            return ValueError("mhc.MHCRewire.fold: the site is dynamic (static=False): its coefficients depend on "
                              "each token (through fn and the RMS of x), so no constant weight holds them; only a "
                              "site built with static=True folds")
        if self.io == "streams":
            return ValueError("mhc.MHCRewire.fold: io='streams': mixing n different streams needs an [dims, n*dims] "
                              "weight, which is not zero-cost; only plain mode folds")
        if self.norm is not None:
            return ValueError("mhc.MHCRewire.fold: norm: a norm between the site and the Linear does not fold")
        return None

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """The whole site as one ``nn.Linear`` (exact up to rounding): only for a static site in plain mode around a
        float ``nn.Linear`` without a norm. Raises ``ValueError``/``TypeError`` saying why otherwise."""
        refusal = self.fold_refusal()
        if refusal is not None:
            raise refusal
        stream_dtype = torch.float64 if self.module.weight.dtype == torch.float64 else torch.float32
        h_pre, h_post, comb = (t.double() for t in self.static_coefficients(stream_dtype))
        weight = self.module.weight.double()
        gain_y = h_post.mean()
        folded_weight = gain_y * h_pre.sum() * weight
        if self.residual:
            folded_weight += comb.sum() / self.n * torch.eye(self.dims, dtype=torch.float64, device=weight.device)
        has_bias = self.module.bias is not None
        folded = nn.Linear(self.dims, self.dims, bias=has_bias, device=weight.device, dtype=self.module.weight.dtype)
        folded.weight.copy_(folded_weight)
        if has_bias:
            folded.bias.copy_(gain_y * self.module.bias.double())
        return folded

    def extra_repr(self) -> str:
        return f"dims={self.dims}, n={self.n}, io={self.io!r}, residual={self.residual}"


@dataclass
class PatchReport:
    """What :meth:`AutoPatcher.patch` did: the qualified names of the wrapped layers, their widths and types,
    the number of parameters the sites added and the size of the model before (its parameters and buffers,
    torch.ao's packed quantised weights counted by their shape)."""

    patched: List[str] = field(default_factory=list)
    widths: List[int] = field(default_factory=list)
    layer_types: List[str] = field(default_factory=list)
    added_parameters: int = 0
    model_parameters: int = 0

    def __len__(self) -> int:
        return len(self.patched)

    @property
    def added_fraction(self) -> float:
        """``added_parameters / model_parameters`` (inf for an empty model)."""
        return self.added_parameters / self.model_parameters if self.model_parameters else math.inf

    def __str__(self) -> str:
        lines = [f"mhc.AutoPatcher: {len(self.patched)} layer(s) wrapped, {self.added_parameters:,} parameters added "
                 f"({self.added_fraction:.2%} of the model's {self.model_parameters:,})"]
        lines += [f"  {name}: {kind}({width} -> {width})"
                  for name, width, kind in zip(self.patched, self.widths, self.layer_types)]
        return "\n".join(lines)


Selector = Union[None, str, Callable[[str, nn.Module], bool]]


class AutoPatcher:
    """Finds the shape-preserving Linear layers of a model (see :func:`is_square_linear`) and wraps each in an
    :class:`MHCRewire` in plain mode, in place. ``unpatch`` puts the original layers back; ``fold`` turns the
    static sites around float ``nn.Linear`` layers into single ``nn.Linear`` layers (deployment)."""

    @staticmethod
    def patch(model: nn.Module, n_streams: int = 4, *, select: Selector = None, residual: bool = False,
              max_added_fraction: Optional[float] = 0.1, **mhc_kwargs) -> PatchReport:
        """Wrap every matching layer of ``model`` in place and return a :class:`PatchReport`.

        Args:
            model: any ``nn.Module``.
            n_streams: streams per site (1..64).
            select: ``None`` (every shape-preserving Linear), a regular expression searched in the qualified name,
                or ``callable(name, module) -> bool``, applied on top of the shape test.
            residual: False (default): each site gates its layer, ``F(x)`` at initialisation, so the patched model
                starts as the function it was. True: each layer also gains the site's residual path
                (``x + F(x)`` at initialisation: a different model). See :class:`MHCRewire`.
            max_added_fraction: refuse (``ValueError``, nothing patched) when the sites would add more parameters
                than this fraction of the model's; None: no limit. A dynamic site of width C has
                ``(n*n + 2n) * (n*C + 1) + 3`` parameters, a static one ``n*n + 2n``.
            **mhc_kwargs: keywords of :class:`mhc.MHC` (``static``, ``alpha_init``, ...); ``alpha_init`` defaults to
                0 here: the per-token part starts switched off and grows with training.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"mhc.AutoPatcher.patch: model: expected an nn.Module, got {type(model).__name__}")
        if isinstance(n_streams, bool) or not isinstance(n_streams, int) or not 1 <= n_streams <= 64:
            raise ValueError(f"mhc.AutoPatcher.patch: n_streams: expected an int in 1..64, got {n_streams!r}")
        if "io" in mhc_kwargs:
            raise ValueError("mhc.AutoPatcher.patch: io: the patcher always uses plain mode")
        if max_added_fraction is not None:
            max_added_fraction = real_arg("AutoPatcher.patch", "max_added_fraction", max_added_fraction, low=0.0)
        mhc_kwargs.setdefault("alpha_init", 0.0)
        if select is None:
            wanted = lambda name, module: True
        elif isinstance(select, str):
            try:
                pattern = re.compile(select)
            except re.error as error:
                raise ValueError(f"mhc.AutoPatcher.patch: select: not a regular expression ({error}): {select!r}")
            wanted = lambda name, module: pattern.search(name) is not None
        elif callable(select):
            wanted = select
        else:
            raise TypeError(f"mhc.AutoPatcher.patch: select: expected None, a regex string or a callable, got "
                            f"{type(select).__name__}")

        targets = []  # every position of a layer used at several (one wrapper for all of them: the layer stays shared)
        for name, module in model.named_modules(remove_duplicate=False):
            if not name or isinstance(module, MHCRewire) or _inside_rewire(model, name):
                continue
            if is_square_linear(module) and wanted(name, module):
                targets.append((name, module))
        report = PatchReport(model_parameters=_model_size(model))
        static = bool(mhc_kwargs.get("static", False))
        layers = {id(module): module for _, module in targets}
        added = sum(_site_parameters(n_streams, module.in_features, static) for module in layers.values())
        if max_added_fraction is not None and added > max_added_fraction * report.model_parameters:
            raise ValueError(
                f"mhc.AutoPatcher.patch: max_added_fraction: {len(layers)} site(s) with n_streams = {n_streams} would "
                f"add {added:,} parameters to a model of {report.model_parameters:,} (more than "
                f"{max_added_fraction:g} of it); use fewer streams, select fewer layers, static=True, or pass a "
                f"larger max_added_fraction (None: no limit)")
        wrappers = {}
        for name, module in targets:
            width = module.in_features
            wrapper = wrappers.get(id(module))
            if wrapper is None:
                wrapper = wrappers[id(module)] = MHCRewire(module, width, n_streams, io="plain", residual=residual,
                                                           **mhc_kwargs)
                report.added_parameters += sum(p.numel() for p in wrapper.mhc.parameters())
            _set_submodule(model, name, wrapper)
            report.patched.append(name)
            report.widths.append(width)
            report.layer_types.append(type(module).__name__)
        return report

    @staticmethod
    def unpatch(model: nn.Module) -> List[str]:
        """Replace every :class:`MHCRewire` in ``model`` by the module it wraps; returns their names."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"mhc.AutoPatcher.unpatch: model: expected an nn.Module, got {type(model).__name__}")
        names = [name for name, module in model.named_modules(remove_duplicate=False)
                 if isinstance(module, MHCRewire) and name]
        names = [name for name in names if not _inside_rewire(model, name)]
        for name in names:
            _set_submodule(model, name, model.get_submodule(name).module)
        return names


    @staticmethod
    def fold(model: nn.Module) -> List[str]:
        """Replace every :class:`MHCRewire` of ``model`` that folds exactly (a static site in plain mode around a
        float ``nn.Linear``, no norm; see :meth:`MHCRewire.fold`) by its folded ``nn.Linear``, for deployment.
        Returns the names replaced. The others stay as they are, and a ``UserWarning`` names each with the reason
        (a dynamic site, the default, never folds)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"mhc.AutoPatcher.fold: model: expected an nn.Module, got {type(model).__name__}")
        sites = [(name, module) for name, module in model.named_modules(remove_duplicate=False)
                 if name and isinstance(module, MHCRewire) and not _inside_rewire(model, name)]
        folded, kept, layers = [], [], {}  # layers: a site used at several positions folds once, stays shared
        for name, site in sites:
            refusal = site.fold_refusal()
            if refusal is None:
                if id(site) not in layers:
                    layers[id(site)] = site.fold()
                _set_submodule(model, name, layers[id(site)])
                folded.append(name)
            else:
                kept.append(f"{name} ({str(refusal).removeprefix('mhc.MHCRewire.fold: ')})")
        if kept:
            warnings.warn(f"mhc.AutoPatcher.fold: {len(kept)} site(s) left unfolded: " + "; ".join(kept), stacklevel=2)
        return folded


def _site_parameters(n: int, C: int, static: bool) -> int:
    """Parameters of an :class:`mhc.MHC` site (fn, base, scale)."""
    m = n * n + 2 * n
    return m if static else m * n * C + m + 3


def _model_size(model: nn.Module) -> int:
    own = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    packed = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, _quantized_linear_types()))
    return own + packed


def _inside_rewire(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), MHCRewire) for i in range(1, len(parts)))


def _module_device(module: nn.Module):
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return None  # e.g. torch.ao's dynamic quantised Linear keeps its weight in a packed param (CPU)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
