"""Activation recomputation for a chain of mHC sites (the mHC paper, section 4.3.2).

A chain of L sites runs ``x_0 -> pre -> F -> post -> x_1 -> ... -> x_L``. Without recomputation autograd keeps, for
every site, the residual ``x_l`` (``[..., n, C]``: n times a plain residual network's activation), the layer input
that F's first op saves (its norm) and F's output ``y`` (post's backward needs it). With recomputation the sites are
grouped in blocks of ``block_size`` (L_r) consecutive sites. Kept for the backward: the residual entering each block
and the layer input that crosses into it, every ``y``, F's own activations, the small per-token coefficients. The
mHC ops of a block (and F's pre-norm, when it runs through :meth:`SiteChain.run`, ``norms=``) are run again, from
those, the first time the backward needs one of their results; the rest of F is not run again. The recomputation
runs the same ops on the same inputs with the same backend, so every gradient is bit-identical to the run without.

Eager mode: autograd's saved-tensor hooks (while the chain is active, ``with chain:``) replace every saved tensor
that lives in a residual, layer input or norm output produced inside a block by a handle; unpacking a handle
replays the block once, and each recomputed tensor is freed when the last node that saved it has run.
Under ``torch.compile``: every op whose results stay inside its block runs in ``torch.utils.checkpoint``, so the
partitioner recomputes it in the backward graph; the ops that cross a block boundary are saved.

Default block size (the paper's): ``L_r* = round(sqrt(n L / (n + 2)))``, which minimises the kept residuals
``n C ceil(L / L_r)`` plus the block being recomputed, ``(n + 2) C L_r`` per token.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

from . import ops

__all__ = ["default_block_size", "SiteChain", "run_sites", "MHCStack"]


def default_block_size(n: int, num_sites: int) -> int:
    """The paper's L_r* = sqrt(n L / (n + 2)), rounded, within 1..L."""
    _check_count("default_block_size", "num_sites", num_sites)
    _check_count("default_block_size", "n", n)
    return max(1, min(num_sites, round(math.sqrt(n * num_sites / (n + 2)))))


def _check_count(where: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"mhc.recompute.{where}: {name}: expected an int >= 1, got {value!r}")


# ---- eager bookkeeping ---------------------------------------------------------------------------------------


class _Ref(NamedTuple):
    """An argument of a step that is (a view of) an output of an earlier step of the same block."""

    step: int
    index: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]
    offset: int


class _Entry(NamedTuple):
    block: "_Block"
    step: int
    index: int
    dtype: torch.dtype


class _Step:
    """One op of a block (a site method, or a function given to SiteChain.run), replayable: the function, its
    arguments (kept tensors or _Refs) and the backend and autocast state it ran with."""

    __slots__ = ("fn", "args", "versions", "backend", "autocast")

    def __init__(self, fn: Callable, args: list, device_type: str):
        self.fn, self.args = fn, args
        # Kept arguments (the block's input residual and state, every y) must not change before the replay.
        self.versions = [a._version if isinstance(a, Tensor) else None for a in args]
        self.backend = ops.get_backend()
        self.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

    def run(self, outputs: List[Tuple[Tensor, ...]]) -> Tuple[Tensor, ...]:
        args = []
        for a, version in zip(self.args, self.versions):
            if isinstance(a, _Ref):
                a = outputs[a.step][a.index].as_strided(a.size, a.stride, a.offset)
            elif isinstance(a, Tensor) and a._version != version:
                raise RuntimeError("mhc.recompute: a tensor the recomputation reads (a block's input residual or "
                                   "a sub-layer's output) was modified by an in-place operation after the forward")
            args.append(a)
        device_type, enabled, dtype = self.autocast
        with torch.no_grad(), ops.use_backend(self.backend), torch.autocast(device_type, dtype=dtype,
                                                                             enabled=enabled):
            return self.fn(*args)


class _Block:
    """The steps of one block and the handles autograd holds for its recomputable tensors."""

    __slots__ = ("steps", "handles", "__weakref__")

    def __init__(self):
        self.steps: Optional[List[_Step]] = []
        self.handles: "weakref.WeakSet[_Handle]" = weakref.WeakSet()

    def replay(self) -> None:
        if self.steps is None:
            raise RuntimeError("mhc.recompute: a block was asked for a tensor after its recomputation was released")
        outputs: List[Tuple[Tensor, ...]] = []
        for step in self.steps:
            outputs.append(tuple(_tensors(step.run(outputs))))
        for handle in list(self.handles):
            handle.value = outputs[handle.step][handle.index].as_strided(handle.size, handle.stride, handle.offset)
        self.steps = None  # each handle now holds its own tensor, freed with it


class _Handle:
    """What autograd saves while a chain is active: the tensor itself (``value``, with its version: autograd does not
    check the versions of what hooks packed, so this does), or, for a tensor its block recomputes, where the block's
    replay finds it (``value`` is None until the replay)."""

    __slots__ = ("block", "step", "index", "size", "stride", "offset", "value", "version", "__weakref__")

    def __init__(self, value: Tensor):
        self.value, self.version = value, value._version

    def point_at(self, entry: _Entry, t: Tensor) -> None:
        self.block, self.step, self.index = entry.block, entry.step, entry.index
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()
        self.value = self.version = None
        entry.block.handles.add(self)

    def get(self) -> Tensor:
        if self.version is None:
            if self.value is None:
                self.block.replay()
        elif self.value._version != self.version:
            raise RuntimeError("mhc.recompute: a tensor saved for the backward was modified by an in-place operation "
                               "after the forward (autograd raises the same without recomputation)")
        return self.value


def _unpack(handle: _Handle) -> Tensor:
    return handle.get()


def _storage_key(t: Tensor) -> Optional[StorageWeakRef]:
    # Keyed by the storage, so views (the ops' flattened [T, n, C] inputs, a sub-layer's reshapes) match too. A weak
    # reference keeps the storage's identity unique while the key exists, even after its memory is freed.
    try:
        return StorageWeakRef(t.untyped_storage())
    except (RuntimeError, NotImplementedError):  # tensors without a storage (wrapper subclasses) are kept
        return None


# ---- the chain -----------------------------------------------------------------------------------------------


class SiteChain:
    """Runs the mHC ops of one forward pass through a chain of ``num_sites`` sites with recomputation.

    Call the sites through the chain, in order, and run every sub-layer inside ``with chain:``::

        chain = SiteChain(len(sites))                 # one per forward pass
        with chain:
            layer_input, state = chain.pre(sites[0], x)
            for l, F in enumerate(sublayers):
                y = F(chain.run(norms[l], layer_input))   # or F(layer_input): F's norm output then is kept
                if l + 1 < len(sites):
                    x, layer_input, state = chain.post_pre(sites[l], x, y, state, sites[l + 1])
                else:
                    x = chain.post(sites[l], x, y, state)

    ``chain.post`` followed by ``chain.pre`` may replace ``chain.post_pre``. A chain may be entered and left several
    times (for a model whose loop calls one layer at a time, each layer enters it while it runs). ``block_size``
    defaults to :func:`default_block_size` of the first site's ``n``; ``start`` is the index of the first site this
    chain object runs (under ``torch.compile`` a chain split over several calls is one chain object per call).
    Sites are :class:`mhc.MHC` or any object with the same ``pre`` / ``post`` (and optionally ``post_pre``) methods.
    Without gradients (``torch.no_grad``, inference) the chain calls the sites directly.
    """

    def __init__(self, num_sites: int, *, block_size: Optional[int] = None, start: int = 0):
        _check_count("SiteChain", "num_sites", num_sites)
        if block_size is not None:
            _check_count("SiteChain", "block_size", block_size)
            if block_size > num_sites:
                raise ValueError(f"mhc.recompute.SiteChain: block_size: expected at most num_sites = {num_sites}, "
                                 f"got {block_size}")
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < num_sites:
            raise ValueError(f"mhc.recompute.SiteChain: start: expected an int in 0..{num_sites - 1}, got {start!r}")
        self.num_sites, self.block_size = num_sites, block_size
        self.next_site = start  # the site whose post comes next
        self._registry: dict = {}  # storage key -> _Entry, for outputs consumed inside their own block
        self._blocks: dict = {}  # block index -> _Block (dropped with the chain; handles keep theirs)
        self._hooks = None
        self._depth = 0
        self._pending: Optional[List[_Handle]] = None  # what the op running now saved, resolved once it returns

    # -- context: saved-tensor hooks while a site or a sub-layer of the chain runs (eager) --

    def __enter__(self) -> "SiteChain":
        if self._depth == 0 and not torch.compiler.is_compiling() and torch.is_grad_enabled():
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            self._hooks.__enter__()
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0 and self._hooks is not None:
            hooks, self._hooks = self._hooks, None
            hooks.__exit__(*exc)

    def _pack(self, t: Tensor) -> _Handle:
        handle = _Handle(t)
        entry = self._entry(t)
        if entry is not None:
            handle.point_at(entry, t)
        elif self._pending is not None:  # saved while an mHC op runs: maybe one of its own outputs (post_pre's x_next)
            self._pending.append(handle)
        return handle

    def _entry(self, t: Tensor) -> Optional[_Entry]:
        key = _storage_key(t)
        entry = self._registry.get(key) if key is not None else None
        if entry is None or entry.dtype != t.dtype or entry.block.steps is None:
            return None
        return entry

    # -- the sites --

    def pre(self, site, x: Tensor):
        """``site.pre(x)``; its results are recomputed with the block of ``site``."""
        self._resolve_block_size(site)
        return self._run(_pre_step(site), [x], internal=True, block=self._block_of(self.next_site))

    def post(self, site, x: Tensor, y: Tensor, state) -> Tensor:
        """``site.post(x, y, state)``, this site's last use: the chain moves on to the next site."""
        self._resolve_block_size(site)
        internal = self.next_site + 1 < self.num_sites and self._same_block(self.next_site)
        return self._run(_post_step(site, type(state)), [x, self._cast_like(y, x), *state], internal=internal,
                         block=self._advance())

    def post_pre(self, site, x: Tensor, y: Tensor, state, next_site):
        """``site.post_pre(x, y, state, next_site)`` (post, then pre of ``next_site``, fused where the site can):
        ``(x_next, layer_input, state of next_site)``; the chain moves on to ``next_site``."""
        self._resolve_block_size(site)
        if self.next_site + 1 >= self.num_sites:
            raise RuntimeError(f"mhc.recompute.SiteChain: post_pre at site {self.next_site}: the chain has "
                               f"{self.num_sites} sites, so this is the last one (use post)")
        internal = self._same_block(self.next_site)
        return self._run(_post_pre_step(site, next_site, type(state)), [x, self._cast_like(y, x), *state],
                         internal=internal, block=self._advance())

    def run(self, fn: Callable, *tensors: Tensor):
        """``fn(*tensors)`` as part of the current site's block: its outputs are recomputed in the backward instead
        of kept. For a sub-layer's cheap first step, its pre-norm: the sub-layer's first matmul would keep the
        norm's output. ``fn`` must be deterministic and compute the same values with and without autograd (norms
        and pointwise activations do)."""
        if self.block_size is None:
            raise RuntimeError("mhc.recompute.SiteChain: run: call pre (the chain's first site) first")
        return self._run(fn, list(tensors), internal=True, block=self._block_of(self.next_site))

    # -- internals --

    def _resolve_block_size(self, site) -> None:
        if self.block_size is None:
            self.block_size = default_block_size(int(site.n), self.num_sites)

    def _block_of(self, site_index: int) -> int:
        return site_index // self.block_size

    def _same_block(self, site_index: int) -> bool:
        return self._block_of(site_index) == self._block_of(site_index + 1)

    def _advance(self) -> int:
        if self.next_site >= self.num_sites:
            raise RuntimeError(f"mhc.recompute.SiteChain: more sites than num_sites = {self.num_sites} "
                               "(a chain serves one forward pass)")
        block = self._block_of(self.next_site)
        self.next_site += 1
        return block

    @staticmethod
    def _cast_like(y: Tensor, x: Tensor) -> Tensor:
        # The post ops cast y to x's dtype and save the cast copy; casting here makes the saved y the one the
        # replay keeps, instead of keeping both (a bf16 y under autocast with an fp32 residual).
        return y.to(x.dtype) if y.dtype != x.dtype else y

    def _run(self, fn: Callable, args: list, *, internal: bool, block: int):
        if not torch.is_grad_enabled():
            return fn(*args)
        if torch.compiler.is_compiling():
            # The partitioner recomputes what runs in a checkpoint from the region's saved inputs.
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False) if internal else fn(*args)
        if self._depth == 0:
            raise RuntimeError("mhc.recompute.SiteChain: the sites and sub-layers of a chain must run inside "
                               "`with chain:` (its saved-tensor hooks)")
        self._pending = []
        try:
            result = fn(*args)
            pending = self._pending
        finally:
            self._pending = None
        record = self._blocks.setdefault(block, _Block())
        record.steps.append(_Step(fn, [self._ref(a, record) for a in args], args[0].device.type))
        if internal:
            step_index = len(record.steps) - 1
            for index, out in enumerate(_tensors(result)):
                key = _storage_key(out)
                if key is not None:
                    self._registry[key] = _Entry(record, step_index, index, out.dtype)
            for handle in pending:
                entry = self._entry(handle.value)
                if entry is not None:
                    handle.point_at(entry, handle.value)
        return result

    def _ref(self, a, block: _Block):
        entry = self._entry(a) if isinstance(a, Tensor) else None
        if entry is None or entry.block is not block:
            return a  # kept: the block's input, a y, a tensor from another block
        return _Ref(entry.step, entry.index, tuple(a.size()), tuple(a.stride()), a.storage_offset())


def _tensors(result) -> List[Tensor]:
    """The tensors of a site method's result, in order (a tensor, or nested tuples such as (x, (h_pre, ...)))."""
    if isinstance(result, Tensor):
        return [result]
    return [t for part in result for t in _tensors(part)]


# Step functions take flat tensors (what checkpoint and the replay pass) and return what the site method returns.


def _pre_step(site):
    def pre(x):
        return site.pre(x)

    return pre


def _post_step(site, state_type):
    def post(x, y, *state):
        return site.post(x, y, state_type(*state))

    return post


def _post_pre_step(site, next_site, state_type):
    def post_pre(x, y, *state):
        if hasattr(site, "post_pre"):
            return site.post_pre(x, y, state_type(*state), next_site)
        x_next = site.post(x, y, state_type(*state))
        return (x_next, *next_site.pre(x_next))

    return post_pre


# ---- whole chains --------------------------------------------------------------------------------------------


def run_sites(x: Tensor, sites: Sequence, sublayers: Sequence[Callable[[Tensor], Tensor]], *,
              norms: Optional[Sequence[Callable[[Tensor], Tensor]]] = None, recompute: bool = False,
              block_size: Optional[int] = None, states: Optional[list] = None) -> Tensor:
    """The residual after a chain of sites: ``layer_input, state = sites[0].pre(x)``, then for every site
    ``y = sublayers[l](norms[l](layer_input))`` (no norm when ``norms`` is None) and ``post_pre`` into the next site
    (``post`` after the last).

    ``recompute``: recompute the mHC intermediates in the backward (:class:`SiteChain`), in blocks of ``block_size``
    sites (default :func:`default_block_size`); the norms' outputs are recomputed too (:meth:`SiteChain.run`).
    ``states``: a list that receives each site's state (``MHCState``), in site order.
    """
    sites, sublayers = list(sites), list(sublayers)
    if not sites:
        raise ValueError("mhc.recompute.run_sites: sites: expected at least one site")
    if len(sublayers) != len(sites):
        raise ValueError(f"mhc.recompute.run_sites: sublayers: expected one per site ({len(sites)}), "
                         f"got {len(sublayers)}")
    norms = list(norms) if norms is not None else None
    if norms is not None and len(norms) != len(sites):
        raise ValueError(f"mhc.recompute.run_sites: norms: expected one per site ({len(sites)}), got {len(norms)}")
    chain = SiteChain(len(sites), block_size=block_size) if recompute else None
    with chain if chain is not None else contextlib.nullcontext():
        layer_input, state = chain.pre(sites[0], x) if chain is not None else sites[0].pre(x)
        last = len(sites) - 1
        for index, (site, sublayer) in enumerate(zip(sites, sublayers)):
            if states is not None:
                states.append(state)
            if norms is not None:
                layer_input = chain.run(norms[index], layer_input) if chain is not None else norms[index](layer_input)
            y = sublayer(layer_input)
            if index == last:
                x = chain.post(site, x, y, state) if chain is not None else site.post(x, y, state)
            elif chain is not None:
                x, layer_input, state = chain.post_pre(site, x, y, state, sites[index + 1])
            elif hasattr(site, "post_pre"):
                x, layer_input, state = site.post_pre(x, y, state, sites[index + 1])
            else:
                x = site.post(x, y, state)
                layer_input, state = sites[index + 1].pre(x)
    return x


class MHCStack(nn.Module):
    """A chain of (site, sub-layer) pairs: ``forward(x)`` is :func:`run_sites` over them.

    Args:
        sites: the :class:`mhc.MHC` sites, one per sub-layer (kept in ``self.sites``).
        sublayers: modules mapping a layer input ``[..., C]`` (normalised by ``norms`` when given) to ``y [..., C]``.
        norms: optional pre-norms, one per sub-layer (``self.norms``): with recomputation their outputs are
            recomputed too instead of kept.
        recompute: recompute the mHC intermediates in the backward, keeping the first residual of each block.
        block_size: sites per block (default: the paper's L_r*, :func:`default_block_size`).
    """

    def __init__(self, sites: Iterable[nn.Module], sublayers: Iterable[nn.Module], *,
                 norms: Optional[Iterable[nn.Module]] = None, recompute: bool = False,
                 block_size: Optional[int] = None):
        super().__init__()
        self.sites = nn.ModuleList(sites)
        self.sublayers = nn.ModuleList(sublayers)
        self.norms = nn.ModuleList(norms) if norms is not None else None
        if len(self.sites) == 0 or len(self.sublayers) != len(self.sites):
            raise ValueError(f"mhc.MHCStack: expected as many sub-layers as sites (at least one), got "
                             f"{len(self.sites)} sites and {len(self.sublayers)} sub-layers")
        if self.norms is not None and len(self.norms) != len(self.sites):
            raise ValueError(f"mhc.MHCStack: norms: expected one per site ({len(self.sites)}), got {len(self.norms)}")
        if block_size is not None:
            _check_count("MHCStack", "block_size", block_size)
            if block_size > len(self.sites):
                raise ValueError(f"mhc.MHCStack: block_size: expected at most the number of sites "
                                 f"({len(self.sites)}), got {block_size}")
        self.recompute, self.block_size = recompute, block_size

    def forward(self, x: Tensor, states: Optional[list] = None) -> Tensor:
        return run_sites(x, self.sites, self.sublayers, norms=self.norms, recompute=self.recompute,
                         block_size=self.block_size, states=states)

    def extra_repr(self) -> str:
        return f"sites={len(self.sites)}, recompute={self.recompute}, block_size={self.block_size}"
