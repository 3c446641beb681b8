"""Wrap existing modules in mHC sites: :class:`MHCRewire` (one module) and :class:`AutoPatcher` (a whole model).

Seed 004 (mhc-mlx) calls these the "universal wrapper" and the "easy button". The math is SPEC section 1.

Two ways of feeding a wrapped module F (``[..., dims] -> [..., dims]``):

- streams in, streams out (``x [..., n, dims]``): ``layer_input, state = pre(x)``; ``x_next = post(x, F(layer_input))``.
  This is the real n-stream residual; chain such wrappers between :class:`mhc.StreamExpand` and
  :class:`mhc.MHCHead`.
- plain in, plain out (``x [..., dims]``): ``x`` is copied into ``n`` streams, the site runs, and the streams are
  averaged. This is what :class:`AutoPatcher` does inside a model that knows nothing about streams. It ADDS a
  residual path around F: at initialisation the output is ``x + F(x)`` (to about 1%), not ``F(x)``.
  Because the ``n`` streams enter identical and leave averaged, the site reduces exactly to a gated residual:
  ``out = mean(h_post) * F(sum(h_pre) * x) + (sum(comb) / n) * x`` (``sum(comb) = n`` up to Sinkhorn's eps).
  The streams never carry different information between wrapped modules, so plain mode gives the gating, not the
  multi-stream residual; :func:`mhc.hf.convert_decoder` carries real streams through a decoder.

Zero-cost folding (:meth:`MHCRewire.fold`): for a static site (coefficients from ``base`` alone) in plain mode
around a float ``nn.Linear(W, b)``, the formula above is affine in ``x`` with constant coefficients, so the whole
site is one ``nn.Linear``: ``W' = mean(h_post) * sum(h_pre) * W + (sum(comb) / n) * I``, ``b' = mean(h_post) * b``.
It costs exactly what the original layer costs and is exact up to float rounding. Nothing else folds exactly:

- a dynamic site's coefficients depend on each token (``fn`` and the RMS of ``x``), so no constant weight can
  hold them, at inference either;
- in stream mode ``layer_input = sum_i h_pre[i] x[i]`` mixes n different streams; putting ``h_pre`` into the weight
  needs a ``[dims, n*dims]`` weight (n times the FLOPs of the aggregation it replaces), and ``post`` likewise;
- a quantised weight would have to be re-quantised after scaling, which changes its values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Union

import torch
from torch import Tensor, nn

from .modules import MHC

__all__ = ["MHCRewire", "AutoPatcher", "PatchReport", "is_square_linear"]

_IO_MODES = ("auto", "streams", "plain")


def _quantized_linear_types() -> tuple:
    types = []
    try:
        from torch.ao.nn.quantized import Linear as StaticQuantLinear
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear
        types += [StaticQuantLinear, DynamicQuantLinear]
    except ImportError:  # a torch built without the ao quantised modules
        pass
    return tuple(types)


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
        io: ``"auto"`` (input whose last two dims are ``(n, dims)`` is streams, else plain), ``"streams"`` or
            ``"plain"``. ``"auto"`` cannot tell a plain ``[B, S, dims]`` input with ``S == n`` from streams;
            :class:`AutoPatcher` uses ``"plain"``.
        norm: optional module applied to ``layer_input`` before F (a pre-norm); default none.
        **mhc_kwargs: keywords of :class:`mhc.MHC` (``static``, ``iters``, ``alpha_init``, ``impl``, ...).

    The site is ``self.mhc``, created on F's device (float32 parameters); see the module docstring for plain
    mode, its initialisation and :meth:`fold`.
    """

    def __init__(self, module: nn.Module, dims: int, n: int = 4, *, io: str = "auto",
                 norm: Optional[nn.Module] = None, **mhc_kwargs):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"mhc.MHCRewire: module: expected an nn.Module, got {type(module).__name__}")
        if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
            raise ValueError(f"mhc.MHCRewire: dims: expected an int >= 1, got {dims!r}")
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"mhc.MHCRewire: n: expected an int in 1..64, got {n!r}")
        if io not in _IO_MODES:
            raise ValueError(f"mhc.MHCRewire: io: expected one of {_IO_MODES}, got {io!r}")
        features = _features(module)
        if features is not None and features != (dims, dims):
            raise ValueError(f"mhc.MHCRewire: module: expected a shape-preserving module of width dims = {dims}, "
                             f"got in_features = {features[0]}, out_features = {features[1]}")
        self.dims, self.n, self.io = dims, n, io
        self.module = module
        self.norm = norm
        self.mhc = MHC(n, dims, **mhc_kwargs)
        device = _module_device(module)
        if device is not None:  # the site lives with F (float32 parameters whatever F's dtype)
            self.mhc.to(device)

    def _is_streams(self, x: Tensor) -> bool:
        if self.io == "streams":
            return True
        if self.io == "plain":
            return False
        return x.dim() >= 2 and tuple(x.shape[-2:]) == (self.n, self.dims)

    def _apply_sublayer(self, layer_input: Tensor) -> Tensor:
        h = self.norm(layer_input) if self.norm is not None else layer_input
        return self.module(h)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"mhc.MHCRewire: x: expected a Tensor, got {type(x).__name__}")
        if self._is_streams(x):
            if x.dim() < 2 or tuple(x.shape[-2:]) != (self.n, self.dims):
                raise ValueError(f"mhc.MHCRewire: x: expected streams [..., n, dims] with n = {self.n}, "
                                 f"dims = {self.dims}, got {list(x.shape)}")
            layer_input, state = self.mhc.pre(x)
            return self.mhc.post(x, self._apply_sublayer(layer_input), state)
        if x.dim() < 1 or x.shape[-1] != self.dims:
            raise ValueError(f"mhc.MHCRewire: x: expected [..., dims] with dims = {self.dims}, got {list(x.shape)}")
        streams = self.mhc._ops.expand_streams(x, self.n)
        layer_input, state = self.mhc.pre(streams)
        x_next = self.mhc.post(streams, self._apply_sublayer(layer_input), state)
        return x_next.mean(dim=-2)

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

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """The whole site as one ``nn.Linear`` (exact up to rounding): only for a static site in plain mode around a
        float ``nn.Linear`` without a norm. Raises ``ValueError``/``TypeError`` saying why otherwise."""
        if type(self.module) is not nn.Linear:
            raise TypeError(f"mhc.MHCRewire.fold: module: only a float nn.Linear folds exactly, got "
                            f"{type(self.module).__name__}")
        if not self.module.weight.is_floating_point():
            raise TypeError(f"mhc.MHCRewire.fold: module: weight dtype {self.module.weight.dtype} is not floating")
        if not self.mhc.static:
            raise ValueError("mhc.MHCRewire.fold: the site is dynamic (static=False): its coefficients depend on "
                             "each token, so no constant weight holds them")
        if self.io == "streams":
            raise ValueError("mhc.MHCRewire.fold: io='streams': mixing n different streams needs an [dims, n*dims] "
                             "weight, which is not zero-cost; only plain mode folds")
        if self.norm is not None:
            raise ValueError("mhc.MHCRewire.fold: norm: a norm between the site and the Linear does not fold")
        stream_dtype = torch.float64 if self.module.weight.dtype == torch.float64 else torch.float32
        h_pre, h_post, comb = (t.double() for t in self.static_coefficients(stream_dtype))
        weight = self.module.weight.double()
        gain_y = h_post.mean()
        gain_x = comb.sum() / self.n
        folded_weight = gain_y * h_pre.sum() * weight + gain_x * torch.eye(self.dims, dtype=torch.float64,
                                                                          device=weight.device)
        has_bias = self.module.bias is not None
        folded = nn.Linear(self.dims, self.dims, bias=has_bias, device=weight.device, dtype=self.module.weight.dtype)
        folded.weight.copy_(folded_weight)
        if has_bias:
            folded.bias.copy_(gain_y * self.module.bias.double())
        return folded

    def extra_repr(self) -> str:
        return f"dims={self.dims}, n={self.n}, io={self.io!r}"


@dataclass
class PatchReport:
    """What :meth:`AutoPatcher.patch` did: the qualified names of the wrapped layers, their widths and types,
    and the number of parameters the sites added."""

    patched: List[str] = field(default_factory=list)
    widths: List[int] = field(default_factory=list)
    layer_types: List[str] = field(default_factory=list)
    added_parameters: int = 0

    def __len__(self) -> int:
        return len(self.patched)

    def __str__(self) -> str:
        lines = [f"mhc.AutoPatcher: {len(self.patched)} layer(s) wrapped, {self.added_parameters} parameters added"]
        lines += [f"  {name}: {kind}({width} -> {width})"
                  for name, width, kind in zip(self.patched, self.widths, self.layer_types)]
        return "\n".join(lines)


Selector = Union[None, str, Callable[[str, nn.Module], bool]]


class AutoPatcher:
    """Finds the shape-preserving Linear layers of a model (see :func:`is_square_linear`) and wraps each in an
    :class:`MHCRewire` in plain mode, in place. ``unpatch`` puts the original layers back; ``fold`` turns the
    static sites around float ``nn.Linear`` layers into single ``nn.Linear`` layers (deployment)."""

    @staticmethod
    def patch(model: nn.Module, n_streams: int = 4, *, select: Selector = None, **mhc_kwargs) -> PatchReport:
        """Wrap every matching layer of ``model`` in place and return a :class:`PatchReport`.

        Args:
            model: any ``nn.Module``.
            n_streams: streams per site (1..64).
            select: ``None`` (every shape-preserving Linear), a regular expression searched in the qualified name,
                or ``callable(name, module) -> bool``, applied on top of the shape test.
            **mhc_kwargs: keywords of :class:`MHCRewire` / :class:`mhc.MHC` (``static``, ``alpha_init``, ...).

        Each wrapped layer gains a residual path (output ``x + F(x)`` at initialisation): the patched model is a
        different model, meant to be trained or fine-tuned.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"mhc.AutoPatcher.patch: model: expected an nn.Module, got {type(model).__name__}")
        if isinstance(n_streams, bool) or not isinstance(n_streams, int) or not 1 <= n_streams <= 64:
            raise ValueError(f"mhc.AutoPatcher.patch: n_streams: expected an int in 1..64, got {n_streams!r}")
        if "io" in mhc_kwargs:
            raise ValueError("mhc.AutoPatcher.patch: io: the patcher always uses plain mode")
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

        targets = []
        for name, module in model.named_modules():
            if not name or isinstance(module, MHCRewire) or _inside_rewire(model, name):
                continue
            if is_square_linear(module) and wanted(name, module):
                targets.append((name, module))
        report = PatchReport()
        for name, module in targets:
            width = module.in_features
            wrapper = MHCRewire(module, width, n_streams, io="plain", **mhc_kwargs)
            _set_submodule(model, name, wrapper)
            report.patched.append(name)
            report.widths.append(width)
            report.layer_types.append(type(module).__name__)
            report.added_parameters += sum(p.numel() for p in wrapper.mhc.parameters())
        return report

    @staticmethod
    def unpatch(model: nn.Module) -> List[str]:
        """Replace every :class:`MHCRewire` in ``model`` by the module it wraps; returns their names."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"mhc.AutoPatcher.unpatch: model: expected an nn.Module, got {type(model).__name__}")
        names = [name for name, module in model.named_modules() if isinstance(module, MHCRewire) and name]
        names = [name for name in names if not _inside_rewire(model, name)]
        for name in names:
            _set_submodule(model, name, model.get_submodule(name).module)
        return names


    @staticmethod
    def fold(model: nn.Module) -> List[str]:
        """Replace every :class:`MHCRewire` of ``model`` that folds exactly (a static site in plain mode around a
        float ``nn.Linear``, no norm; see :meth:`MHCRewire.fold`) by its folded ``nn.Linear``, for deployment.
        Returns the names replaced; the others stay as they are."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"mhc.AutoPatcher.fold: model: expected an nn.Module, got {type(model).__name__}")
        names = [name for name, module in model.named_modules() if name and isinstance(module, MHCRewire)
                 and _foldable(module) and not _inside_rewire(model, name)]
        for name in names:
            _set_submodule(model, name, model.get_submodule(name).fold())
        return names


def _foldable(rewire: MHCRewire) -> bool:
    return (type(rewire.module) is nn.Linear and rewire.module.weight.is_floating_point() and rewire.mhc.static
            and rewire.io != "streams" and rewire.norm is None)


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
