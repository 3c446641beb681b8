"""Multi-history skip connections (docs/MATH.md section 2): modules.

A network block F gets, instead of the residual ``x + F(x)``, a learned mix of the last H states:

    x_{l+1} = F(x_l) + gate * sum_k alpha_k h_k,      h_0 = x_l (newest), h_1 = x_{l-1}, ...

with ``alpha = project(logits)`` kept on a manifold (see :mod:`mhc.history_ops`). Pieces:

- :class:`HistoryBuffer`: the last H states, newest first, in a storage dtype (fp32/fp16/bf16). Without
  autograd (inference) it is a pre-allocated ring buffer ``[H, *shape]`` reused across calls; with
  autograd it holds references to the states (autograd keeps them alive for the backward anyway, so a
  ring that overwrote them would corrupt the gradients).
- :class:`MHCSkip`: the vector skip (one logit per state, fused projection + weighted sum).
- :class:`MatrixMHCSkip`: the matrix variant: a doubly stochastic ``[H, H]`` matrix remixes the whole
  history each block (mass-preserving, like the n-stream H_res), and row 0 feeds the skip.
- :class:`WeightedSum`: a frozen skip (constant weights, no projection) for deployment.
- :class:`MHCSequential`: runs blocks with a shared history; ``clear_history()`` frees the buffers.
- :class:`MHCConv2d`, :class:`MHCBasicBlock`, :class:`MHCBottleneck`: conv blocks with their own skip.
- :func:`inject_mhc`: turn the shape-preserving ``nn.Sequential`` stacks of a model into :class:`MHCSequential`.
- :class:`MHCSkipConfig` with :data:`PRESETS`, and :func:`history_memory_bytes` (B x C x S x H x bytes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._checks import check_tensor, int_arg, real_arg, same_device
from .history_ops import (
    CONSTRAINTS,
    VECTOR_CONSTRAINTS,
    history_mix,
    history_skip,
    project_logits,
    reference_history_mix,
    reference_project_logits,
)

__all__ = [
    "PRESETS",
    "MHCSkipConfig",
    "HistoryBuffer",
    "MHCSkip",
    "MatrixMHCSkip",
    "WeightedSum",
    "MHCSequential",
    "MHCBlock",
    "MHCConv2d",
    "MHCBasicBlock",
    "MHCBottleneck",
    "inject_mhc",
    "clear_history",
    "HistoryMixin",
    "freeze_mhc",
    "history_memory_bytes",
]

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _storage_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"history_dtype: expected float32, float16 or bfloat16, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise TypeError(f"history_dtype: expected one of {sorted(_DTYPES)} or a torch dtype, got {dtype!r}")
    return _DTYPES[dtype]


def _special_mode() -> bool:
    """True while tracing for torch.compile, torch.jit or ONNX export, or under a torch.func transform (vmap's
    batched states cannot be copied into a ring): history must stay functional."""
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return (compiling or torch.jit.is_tracing() or torch.jit.is_scripting() or _exporting()
            or torch._C._are_functorch_transforms_active())


_ONNX_FLAGS: list = []  # the two flags torch.onnx.is_in_onnx_export reads, found once (or [None]: use it)


def _exporting() -> bool:
    """torch.onnx.is_in_onnx_export() without its two imports per call (2.3 us of a 30 us layer)."""
    if torch.compiler.is_compiling():  # dynamo folds the public function; the internal flags would break the graph
        return torch.onnx.is_in_onnx_export()
    if not _ONNX_FLAGS:
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
            _ONNX_FLAGS.extend((_flags, GLOBALS))
            _ONNX_FLAGS[1].in_onnx_export, _ONNX_FLAGS[0]._is_onnx_exporting  # both attributes exist
        except (ImportError, AttributeError):
            _ONNX_FLAGS[:] = [None]
    if _ONNX_FLAGS[0] is None:
        return torch.onnx.is_in_onnx_export()
    return bool(_ONNX_FLAGS[1].in_onnx_export or _ONNX_FLAGS[0]._is_onnx_exporting)


# ---- memory formula ----------------------------------------------------------------------------------


def history_memory_bytes(batch: int, channels: int, spatial: int, max_history: int,
                         dtype: Union[torch.dtype, str, int] = torch.float32) -> int:
    """Bytes of a history of H states of shape [B, C, S...]: ``B x C x S x H x bytes`` (docs/MATH.md section 2).

    ``spatial`` is the product of the spatial dims (H*W for images, the sequence length for [B, S, C]).
    ``dtype`` is a torch dtype, a name ("fp16", "bf16", "fp32") or a byte count.
    """
    if isinstance(dtype, int):
        nbytes = dtype
    else:
        dt = _storage_dtype(dtype)
        nbytes = torch.empty((), dtype=dt).element_size()
    for name, v in (("batch", batch), ("channels", channels), ("spatial", spatial), ("max_history", max_history)):
        if v < 0:
            raise ValueError(f"history_memory_bytes: {name}: expected >= 0, got {v}")
    return int(batch) * int(channels) * int(spatial) * int(max_history) * int(nbytes)


# ---- configuration -----------------------------------------------------------------------------------


@dataclasses.dataclass
class MHCSkipConfig:
    """Hyper-parameters of a multi-history skip; :data:`PRESETS` holds named ones.

    - ``max_history`` H: states mixed (the newest is the block's own input).
    - ``constraint``: ``simplex`` (sparsemax: sparse, one-hot is a plain residual), ``softmax``,
      ``identity`` (softmax that always keeps ``epsilon`` on the newest state), or ``doubly_stochastic``
      (matrix variant only).
    - ``temperature``: logits are divided by it (lower = sharper).
    - ``detach_history``: older states (all but the newest) are constants for autograd: their blocks get
      no gradient through the skip, while the alphas still learn and the residual path stays.
    - ``use_gating``: a learned scalar gate (initialised ``gate_init``) scales the mixed history.
    - ``history_dtype``: storage dtype of the history (None = the states' own dtype).
    - ``init_newest``: initial logit of the newest state (others 0). 0.5 starts sparsemax at a dense
      mix favouring the newest state; >= 1 starts it one-hot (a plain ResNet, whose logits then get no
      gradient until something else moves them).
    """

    max_history: int = 4
    constraint: str = "simplex"
    temperature: float = 1.0
    epsilon: float = 0.1
    detach_history: bool = False
    use_gating: bool = False
    gate_init: float = 1.0
    history_dtype: Optional[Union[torch.dtype, str]] = None
    init_newest: float = 0.5
    sinkhorn_iters: int = 20

    def __post_init__(self):
        int_arg("MHCSkipConfig", "max_history", self.max_history, 1, 64)
        if self.constraint not in CONSTRAINTS:
            raise ValueError(f"constraint: expected one of {CONSTRAINTS}, got {self.constraint!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon: expected a value in [0, 1], got {self.epsilon}")
        int_arg("MHCSkipConfig", "sinkhorn_iters", self.sinkhorn_iters, 1)
        real_arg("MHCSkipConfig", "gate_init", self.gate_init)
        real_arg("MHCSkipConfig", "init_newest", self.init_newest)
        _storage_dtype(self.history_dtype)

    @classmethod
    def preset(cls, name: str, **overrides) -> "MHCSkipConfig":
        """A named preset (see :data:`PRESETS`), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"MHCSkipConfig.preset: name: expected one of {sorted(PRESETS)}, got {name!r}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def skip_kwargs(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: Dict[str, MHCSkipConfig] = {
    # Four states, sparsemax: learns sparse mixes; a one-hot layer runs at plain-residual cost.
    "default": MHCSkipConfig(),
    # Never drops the newest state: at least epsilon of it, whatever the logits (stable deep training).
    "stable": MHCSkipConfig(constraint="identity", epsilon=0.5),
    # Eight states, dense softmax mixing: the DenseNet-like end of the range at O(D x H) memory.
    "dense": MHCSkipConfig(max_history=8, constraint="softmax"),
    # Inference / long histories: bf16 storage, older states detached.
    "memory_saver": MHCSkipConfig(detach_history=True, history_dtype=torch.bfloat16),
    # > 100 layers: identity-preserving, detached older states, bf16 storage.
    "deep": MHCSkipConfig(constraint="identity", epsilon=0.5, detach_history=True, history_dtype=torch.bfloat16),
    # Matrix variant: the history is remixed by a doubly stochastic matrix every block.
    "matrix": MHCSkipConfig(constraint="doubly_stochastic"),
}


# ---- history buffer ----------------------------------------------------------------------------------


class HistoryBuffer:
    """The last ``max_history`` states, newest first, stored in ``dtype`` (None = as pushed).

    Without autograd (``torch.no_grad()`` / ``inference_mode``, eager) states are copied into a ring
    buffer ``[H, *shape]`` allocated once and reused by later calls while the shape, dtype and device
    stay the same. With autograd, under torch.compile, or during ONNX export, the buffer holds the
    pushed tensors themselves (cast to ``dtype``): autograd saves them for the backward, so they must
    not be overwritten.
    """

    def __init__(self, max_history: int, dtype: Optional[Union[torch.dtype, str]] = None):
        self.max_history = int_arg("HistoryBuffer", "max_history", max_history, 1, 64)
        self.dtype = _storage_dtype(dtype)
        self._ring: Optional[Tensor] = None
        self._slots: List[Tensor] = []  # the ring's H slot views, made once (indexing the ring costs ~2 us a view)
        self._head = 0  # ring slot of the newest state
        self._count = 0
        self._states: List[Tensor] = []  # reference mode, newest first
        self._ring_mode = False
        self.peak_nbytes = 0
        self.last_shape: Tuple[int, ...] = ()  # shape of the states of the latest push (kept by clear())
        self.last_dtype: Optional[torch.dtype] = None

    # -- state --
    def __len__(self) -> int:
        return self._count

    def clear(self) -> None:
        """Forget the states; keep the ring's memory for the next call."""
        self._count = 0
        self._head = 0
        self._states = []

    def release(self) -> None:
        """Forget the states and free the ring buffer."""
        self.clear()
        self._ring = None
        self._slots = []
        self.peak_nbytes = 0

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of the pre-allocated ring (0 when none)."""
        return 0 if self._ring is None else self._ring.numel() * self._ring.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes the states currently held occupy (the whole ring in ring mode)."""
        if self._ring_mode:
            return self.allocated_nbytes
        states = self._states
        return states[0].numel() * sum(s.element_size() for s in states) if states else 0  # one shape


    # -- push / read --
    def push(self, x: Tensor) -> None:
        """Make ``x`` the newest state (the oldest drops out once H are held)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"HistoryBuffer.push: x: expected a torch.Tensor, got {type(x).__name__}")
        dtype = self.dtype or x.dtype
        special = _special_mode()
        ring = not torch.is_grad_enabled() and not special
        if self._count and ring != self._ring_mode:
            raise RuntimeError("HistoryBuffer.push: autograd was switched on or off in the middle of a sequence; "
                               "call clear() first")
        if self._count and self.shape != x.shape:
            raise ValueError(f"HistoryBuffer.push: x: expected shape {tuple(self.shape)} like the held states, got "
                             f"{tuple(x.shape)}")
        self._ring_mode = ring
        if ring:
            # A ring made under inference_mode is an inference tensor, which only inference mode may write.
            if (self._ring is None or self._ring.shape[1:] != x.shape or self._ring.dtype != dtype
                    or self._ring.device != x.device
                    or (self._ring.is_inference() and not torch.is_inference_mode_enabled())):
                self._ring = torch.empty((self.max_history, *x.shape), dtype=dtype, device=x.device)
                self._slots = list(self._ring.unbind(0))
                self._count = 0
            self._head = (self._head - 1) % self.max_history
            self._slots[self._head].copy_(x)
            self._count = min(self._count + 1, self.max_history)
        else:
            self._states = ([x if x.dtype == dtype else x.to(dtype)] + self._states)[: self.max_history]
            self._count = len(self._states)
        if not special:  # bookkeeping for the audit; nothing to trace
            self.peak_nbytes = max(self.peak_nbytes, self.nbytes)
            self.last_shape, self.last_dtype = tuple(x.shape), dtype

    def replace(self, states: Sequence[Tensor]) -> None:
        """Replace the held states (newest first) by ``states`` (the matrix skip's remix)."""
        if len(states) > self.max_history:
            raise ValueError(f"HistoryBuffer.replace: states: at most {self.max_history}, got {len(states)}")
        if self._ring_mode:
            for a, s in enumerate(states):
                self._slots[(self._head + a) % self.max_history].copy_(s)
            self._count = len(states)
        else:
            dtype = self.dtype
            self._states = [s if dtype is None else s.to(dtype) for s in states]
            self._count = len(self._states)

    def states(self) -> List[Tensor]:
        """The held states, newest first (views of the ring in ring mode)."""
        if self._ring_mode:
            slots, head, h = self._slots, self._head, self.max_history
            return [slots[(head + a) % h] for a in range(self._count)]
        return list(self._states)

    @property
    def shape(self) -> Tuple[int, ...]:
        if self._count == 0:
            return ()
        return tuple(self._ring.shape[1:]) if self._ring_mode else tuple(self._states[0].shape)

    def __repr__(self) -> str:
        mode = "ring" if self._ring_mode else "references"
        return (f"HistoryBuffer(max_history={self.max_history}, dtype={self.dtype}, held={self._count}, mode={mode}, "
                f"nbytes={self.nbytes})")


History = Union[HistoryBuffer, Tensor, Sequence[Tensor]]


def _states_of(history: Optional[History], x: Tensor) -> List[Tensor]:
    if history is None:
        raise ValueError("history: expected a HistoryBuffer, a stacked tensor [n, *x.shape] or a list of states "
                         "(newest first; the newest is the block's input), got None")
    if isinstance(history, HistoryBuffer):
        return history.states()
    if isinstance(history, Tensor) and history.dim() >= 1:
        return list(history.unbind(0))
    if isinstance(history, (list, tuple)):
        return list(history)
    raise TypeError(f"history: expected a HistoryBuffer, a stacked tensor [n, *x.shape] or a list of states, got "
                    f"{type(history).__name__}" + (" of 0 dims" if isinstance(history, Tensor) else ""))


def _nonempty(states: List[Tensor], owner: str) -> List[Tensor]:
    if not states:
        raise ValueError(f"{owner}: history: expected at least one state (the block's input), got none")
    return states


def _like_states(x: Tensor, states: List[Tensor], owner: str) -> List[Tensor]:
    # The matrix skip adds a mix of the states to x itself (not through a kernel that would check it).
    if torch.jit.is_tracing():  # shapes are traced values there; the eager call checked them
        return states
    if tuple(x.shape) != tuple(states[0].shape):
        raise ValueError(f"{owner}: x: expected shape {list(states[0].shape)} like the history's states, got "
                         f"{list(x.shape)}")
    same_device(owner, "x", x, **{"states[0]": states[0]})
    return states


def _detach_older(states: List[Tensor]) -> List[Tensor]:
    # The newest state is the block's own input: keeping it differentiable keeps the residual path.
    return states[:1] + [s.detach() for s in states[1:]]


# ---- skips -------------------------------------------------------------------------------------------


class MHCSkip(nn.Module):
    """Vector multi-history skip: ``out = x + gate * sum_k alpha_k h_k``, ``alpha = project(logits[:n])``.

    ``forward(x, history)``: ``x`` is the block's output F(x_l); ``history`` a :class:`HistoryBuffer`,
    a stacked tensor ``[n, *x.shape]`` or a list of n tensors, newest first (n <= max_history states
    available; only the first n logits are used, so early blocks of a sequence mix fewer states).
    Projection and weighted sum run as one fused op; a state whose weight is exactly 0 is not read.
    """

    def __init__(self, max_history: int = 4, constraint: str = "simplex", temperature: float = 1.0,
                 epsilon: float = 0.1, detach_history: bool = False, use_gating: bool = False, gate_init: float = 1.0,
                 history_dtype=None, init_newest: float = 0.5, sinkhorn_iters: int = 20,
                 config: Optional[MHCSkipConfig] = None):
        super().__init__()
        if config is None:
            config = MHCSkipConfig(max_history, constraint, temperature, epsilon, detach_history, use_gating,
                                   gate_init, history_dtype, init_newest, sinkhorn_iters)
        if config.constraint not in VECTOR_CONSTRAINTS:
            raise ValueError(f"MHCSkip: constraint: expected one of {VECTOR_CONSTRAINTS} "
                             f"(doubly_stochastic is MatrixMHCSkip's), got {config.constraint!r}")
        self.config = config
        self.max_history = config.max_history
        self.constraint = config.constraint
        self.temperature = float(config.temperature)
        self.epsilon = float(config.epsilon)
        self.detach_history = bool(config.detach_history)
        init = torch.zeros(config.max_history)
        init[0] = config.init_newest
        self.logits = nn.Parameter(init)
        # Registered even when None, so forward reads both from _parameters.
        self.register_parameter("gate", nn.Parameter(torch.full((1,), float(config.gate_init)))
                                if config.use_gating else None)

    @classmethod
    def from_config(cls, config: MHCSkipConfig) -> "MHCSkip":
        return cls(config=config)

    def extra_repr(self) -> str:
        return (f"max_history={self.max_history}, constraint={self.constraint}, temperature={self.temperature}, "
                f"epsilon={self.epsilon}, detach_history={self.detach_history}, gated={self.gate is not None}")

    def weights(self, available: Optional[int] = None) -> Tensor:
        """The projected alphas over the first ``available`` states (default all H)."""
        n = self.max_history if available is None else available
        return project_logits(self.logits[:n], self.constraint, temperature=self.temperature, epsilon=self.epsilon)

    def forward(self, x: Tensor, history: History) -> Tensor:
        states = _nonempty(_states_of(history, x)[: self.max_history], "MHCSkip")
        if self.detach_history:
            states = _detach_older(states)
        # The parameters from _parameters: attribute access through nn.Module.__getattr__ costs about 1 us each. A
        # parametrized one (weight_norm, register_parametrization, pruning) has left _parameters for a property.
        params = self._parameters
        logits = params["logits"] if "logits" in params else self.logits
        gate = params["gate"] if "gate" in params else getattr(self, "gate", None)
        if len(states) != self.max_history:  # all H states (every block after the first H - 1): the parameter
            logits = logits[: len(states)]   # itself, without a slice op and its autograd node
        if _exporting():  # standard ONNX ops: sort-based sparsemax, softmax, Mul/Add
            w = reference_project_logits(logits, self.constraint, temperature=self.temperature, epsilon=self.epsilon)
            return _unrolled_mix(x, states, w, gate)
        out, _ = history_skip(x, states, logits, constraint=self.constraint, temperature=self.temperature,
                              epsilon=self.epsilon, gate=gate)
        return out

    @torch.no_grad()
    def freeze(self) -> "WeightedSum":
        """A :class:`WeightedSum` with this skip's current weights (and gate) as constants."""
        table = torch.zeros(self.max_history, self.max_history)
        for n in range(1, self.max_history + 1):
            w = reference_project_logits(self.logits[:n].detach().double(), self.constraint,
                                         temperature=self.temperature, epsilon=self.epsilon)
            if self.gate is not None:
                w = w * self.gate.detach().double()
            table[n - 1, :n] = w.float()
        return WeightedSum(table.to(self.logits.device))


def _unrolled_mix(x: Tensor, states: Sequence[Tensor], w: Tensor, gate: Optional[Tensor]) -> Tensor:
    # x + gate * sum_k w_k h_k as separate Mul/Add nodes (what ONNX export records).
    mixed = None
    for k, h in enumerate(states):
        term = w[k].to(x.dtype) * h.to(x.dtype)
        mixed = term if mixed is None else mixed + term
    if gate is not None:
        mixed = gate.to(x.dtype) * mixed
    return x + mixed


class WeightedSum(nn.Module):
    """A frozen skip: ``x + sum_k w_k h_k`` with constant weights (no projection, no parameters).

    ``table``: either ``[H]``, the weights of exactly H states (forward then requires H states), or
    ``[H, H]`` whose row ``n - 1`` (first n entries) holds the weights used when n states are available,
    as :meth:`MHCSkip.freeze` builds it; like :class:`MHCSkip`, it then mixes the newest H states of a
    longer history. Zero weights cost nothing (the kernel skips those states; ONNX export leaves them out
    of the graph). The weights must be finite.
    """

    def __init__(self, table: Tensor):
        super().__init__()
        if not isinstance(table, Tensor) or not table.is_floating_point():
            raise TypeError(f"WeightedSum: table: expected a floating-point tensor, got "
                            f"{table.dtype if isinstance(table, Tensor) else type(table).__name__}")
        H = table.shape[0] if table.dim() >= 1 else 0
        if table.dim() not in (1, 2) or not 1 <= H <= 64 or (table.dim() == 2 and table.shape[1] != H):
            raise ValueError(f"WeightedSum: table: expected weights [H] or a table [H, H] with H in 1..64, got shape "
                             f"{list(table.shape)}")
        if not bool(torch.isfinite(table).all()):
            raise ValueError("WeightedSum: table: expected finite weights, got NaN or infinite values")
        self.exact = table.dim() == 1  # weights of exactly H states
        if self.exact:
            full = torch.zeros(H, H, dtype=table.dtype, device=table.device)
            full[H - 1] = table
            table = full
        self.register_buffer("table", table.float())
        self.max_history = H
        self._refresh_nonzero()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh_nonzero())

    def _refresh_nonzero(self) -> None:
        # Host-side list of the non-zero terms per number of states, read once here (not while tracing).
        self._nonzero = [[k for k in range(n) if float(self.table[n - 1, k]) != 0.0]
                         for n in range(1, self.max_history + 1)]

    def extra_repr(self) -> str:
        return f"max_history={self.max_history}, exact={self.exact}"

    def forward(self, x: Tensor, history: History) -> Tensor:
        states = _states_of(history, x)
        if self.exact and len(states) != self.max_history:
            raise ValueError(f"WeightedSum: history: the weights are for exactly {self.max_history} states, got "
                             f"{len(states)}")
        states = _nonempty(states, "WeightedSum")[: self.max_history]
        w = self.table[len(states) - 1, : len(states)]
        if _exporting():
            # Weights are constants: keep only the non-zero terms in the exported graph.
            keep = self._nonzero[len(states) - 1]
            return _unrolled_mix(x, [states[k] for k in keep], w[keep], None) if keep else x
        return history_mix(x, states, w)


class MatrixMHCSkip(nn.Module):
    """Matrix multi-history skip: a doubly stochastic ``M = Sinkhorn(logits[:n, :n] / T)`` remixes the
    n held states, ``mixed = M @ h`` (rows and columns of M sum to 1, so the history's total is kept),
    the skip adds row 0: ``out = x + gate * mixed_0``, and the buffer's states become ``mixed`` (the
    caller then pushes ``out`` as the newest). Given a plain list or tensor, the history is left alone.
    Logits start at ``init_diagonal`` on the diagonal (near the identity: a plain residual).
    """

    def __init__(self, max_history: int = 4, constraint: str = "doubly_stochastic", temperature: float = 1.0,
                 sinkhorn_iters: int = 20, detach_history: bool = False, use_gating: bool = False,
                 gate_init: float = 1.0, init_diagonal: float = 4.0, config: Optional[MHCSkipConfig] = None):
        super().__init__()
        if config is not None:
            max_history, constraint, temperature = config.max_history, config.constraint, config.temperature
            sinkhorn_iters, detach_history = config.sinkhorn_iters, config.detach_history
            use_gating, gate_init = config.use_gating, config.gate_init
        if constraint != "doubly_stochastic" and constraint not in VECTOR_CONSTRAINTS:
            raise ValueError(f"MatrixMHCSkip: constraint: expected one of {CONSTRAINTS}, got {constraint!r}")
        self.max_history = int_arg("MatrixMHCSkip", "max_history", max_history, 1, 64)
        self.constraint = constraint  # vector constraints project each row
        self.temperature = real_arg("MatrixMHCSkip", "temperature", temperature, positive=True)
        self.sinkhorn_iters = int_arg("MatrixMHCSkip", "sinkhorn_iters", sinkhorn_iters, 1)
        self.detach_history = bool(detach_history)
        self.logits = nn.Parameter(torch.eye(self.max_history) * float(init_diagonal))
        self.gate = nn.Parameter(torch.full((1,), float(gate_init))) if use_gating else None

    def extra_repr(self) -> str:
        return (f"max_history={self.max_history}, constraint={self.constraint}, temperature={self.temperature}, "
                f"sinkhorn_iters={self.sinkhorn_iters}, detach_history={self.detach_history}")

    def matrix(self, available: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The doubly stochastic matrix over the first ``available`` states, projected in ``dtype`` (default: the
        logits' float32)."""
        n = self.max_history if available is None else available
        logits = self.logits if n == self.max_history else self.logits[:n, :n]  # all H: no slice ops, no nodes
        logits = logits if dtype is None else logits.to(dtype)
        fn = reference_project_logits if _exporting() else project_logits
        return fn(logits, self.constraint, temperature=self.temperature, sinkhorn_iters=self.sinkhorn_iters)

    def forward(self, x: Tensor, history: History) -> Tensor:
        check_tensor("MatrixMHCSkip", "x", x)
        states = _like_states(x, _nonempty(_states_of(history, x)[: self.max_history], "MatrixMHCSkip"),
                             "MatrixMHCSkip")
        if self.detach_history:
            states = _detach_older(states)
        m = self.matrix(len(states), torch.float64 if x.dtype == torch.float64 else torch.float32)
        return _matrix_skip(x, history, states, m, self.gate)

    @torch.no_grad()
    def freeze(self) -> "_FrozenMatrix":
        return _FrozenMatrix(self)


def _matrix_skip(x: Tensor, history: History, states: List[Tensor], m: Tensor, gate: Optional[Tensor]) -> Tensor:
    """The matrix skip with mixing matrix ``m``: ``x + gate * (m @ states)[0]``; a HistoryBuffer gets the mixed
    states as its new history."""
    if _exporting():
        mixed = reference_history_mix(None, torch.stack([s.to(x.dtype) for s in states]), m)
    else:
        mixed = history_mix(None, states, m)
    head = mixed[0].to(x.dtype)
    out = x + (head if gate is None else gate.to(x.dtype) * head)
    if isinstance(history, HistoryBuffer):
        history.replace(list(mixed.unbind(0)))
    return out


class _FrozenMatrix(nn.Module):
    """MatrixMHCSkip with constant matrices (one per number of available states)."""

    def __init__(self, skip: MatrixMHCSkip):
        super().__init__()
        H = skip.max_history
        table = torch.zeros(H, H, H)
        for n in range(1, H + 1):
            table[n - 1, :n, :n] = reference_project_logits(
                skip.logits[:n, :n].detach().double(), skip.constraint, temperature=skip.temperature,
                sinkhorn_iters=skip.sinkhorn_iters).float()
        self.register_buffer("table", table.to(skip.logits.device))
        self.register_buffer("gate", None if skip.gate is None else skip.gate.detach().clone())
        self.max_history = H

    def forward(self, x: Tensor, history: History) -> Tensor:
        check_tensor("MatrixMHCSkip", "x", x)
        states = _like_states(x, _nonempty(_states_of(history, x)[: self.max_history], "MatrixMHCSkip"),
                             "MatrixMHCSkip")
        n = len(states)
        return _matrix_skip(x, history, states, self.table[n - 1, :n, :n], self.gate)


_SKIP_TYPES = (MHCSkip, MatrixMHCSkip, WeightedSum, _FrozenMatrix)


def _make_skip(config: MHCSkipConfig) -> nn.Module:
    if config.constraint == "doubly_stochastic":
        return MatrixMHCSkip(config=config)
    return MHCSkip(config=config)


# ---- blocks ------------------------------------------------------------------------------------------


class MHCBlock(nn.Module):
    """A block with its own skip: ``activation(transform(x) + skip(history))``.

    Subclasses define ``transform``. ``forward(x, history=None)``: history newest first, its newest
    state being ``x`` (None = just ``x``: a residual block).
    """

    skip: nn.Module
    activation: nn.Module

    def transform(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor, history: Optional[History] = None) -> Tensor:
        return self.activation(self.skip(self.transform(x), [x] if history is None else history))


def _skip_from(config: Optional[MHCSkipConfig], kwargs: dict) -> nn.Module:
    if config is None:
        config = MHCSkipConfig(**kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    return _make_skip(config)


class MHCConv2d(MHCBlock):
    """``conv(x)`` (shape-preserving: same channels, 'same' padding) plus a multi-history skip."""

    def __init__(self, channels: int, kernel_size: int = 3, *, bias: bool = True, activation: Optional[nn.Module] = None,
                 config: Optional[MHCSkipConfig] = None, **skip_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.skip = _skip_from(config, skip_kwargs)
        self.activation = activation if activation is not None else nn.Identity()

    def transform(self, x: Tensor) -> Tensor:
        return self.conv(x)


class MHCBasicBlock(MHCBlock):
    """ResNet basic block (conv3x3-BN-ReLU-conv3x3-BN) whose identity shortcut is a multi-history skip;
    ReLU after the sum, as in ResNet."""

    def __init__(self, channels: int, *, config: Optional[MHCSkipConfig] = None, **skip_kwargs):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.skip = _skip_from(config, skip_kwargs)
        self.activation = nn.ReLU()

    def transform(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class MHCBottleneck(MHCBlock):
    """ResNet bottleneck (1x1 reduce, 3x3, 1x1 expand, BN after each) with a multi-history skip."""

    def __init__(self, channels: int, bottleneck_channels: Optional[int] = None, *,
                 config: Optional[MHCSkipConfig] = None, **skip_kwargs):
        super().__init__()
        mid = bottleneck_channels or max(1, channels // 4)
        self.conv1 = nn.Conv2d(channels, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.skip = _skip_from(config, skip_kwargs)
        self.activation = nn.ReLU()

    def transform(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.bn3(self.conv3(y))


# ---- sequential ------------------------------------------------------------------------------------------


class MHCSequential(nn.Module):
    """Runs ``modules`` in order with a shared history: block l computes ``skip_l(F_l(x_l), history)``
    (or, for an :class:`MHCBlock`, ``block(x_l, history)``) and its output is pushed as the newest state.

    The history buffer is created once and reused by every forward (inference: a pre-allocated ring of
    H slots in ``history_dtype``); each forward starts from the input alone. ``clear_history()`` frees it
    (before export, or to give the memory back). ``allow_shape_change=True`` lets a block change the
    shape (a downsampling stage): its output gets no skip and the history restarts from it.
    """

    def __init__(self, *modules: Union[nn.Module, Iterable[nn.Module]], max_history: Optional[int] = None,
                 config: Optional[MHCSkipConfig] = None, allow_shape_change: bool = False, **skip_kwargs):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], Iterable) and not isinstance(modules[0], nn.Module):
            modules = tuple(modules[0])
        if not modules:
            raise ValueError("MHCSequential: modules: expected at least one module")
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"MHCSequential: modules[{i}]: expected an nn.Module, got {type(m).__name__}")
        if max_history is not None:  # given beside a config, it overrides the config's like any skip keyword
            skip_kwargs["max_history"] = max_history
        config = MHCSkipConfig(**skip_kwargs) if config is None else dataclasses.replace(config, **skip_kwargs)
        self.config = config
        self.allow_shape_change = allow_shape_change
        self.blocks = nn.ModuleList(modules)
        # A skip for every block that does not bring its own (MHCBlock); Identity placeholders keep indices.
        self.skips = nn.ModuleList(nn.Identity() if isinstance(m, MHCBlock) else _make_skip(config) for m in modules)
        # The buffer holds as many states as the most any skip mixes.
        self.max_history = max(m.skip.max_history if isinstance(m, MHCBlock) else config.max_history
                               for m in modules)
        self._history = HistoryBuffer(self.max_history, config.history_dtype)
        # The buffers no call is using. A call takes one (list.pop is atomic), or makes its own while other threads
        # hold them all, and gives it back: concurrent calls never share a buffer.
        self._idle = [self._history]

    @property
    def history(self) -> HistoryBuffer:
        """The buffer of the latest call."""
        return self._history

    def clear_history(self) -> None:
        """Drop the held states and free the pre-allocated history buffers."""
        for buffer in {id(b): b for b in [self._history, *self._idle]}.values():
            buffer.release()
        self._idle[:] = [self._history]

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if "_idle" not in self.__dict__:  # a module pickled before the buffers were pooled
            self._idle = [self._history]

    def history_nbytes(self) -> int:
        """Peak bytes the history held during the last forward (measured)."""
        return self._history.peak_nbytes

    def predicted_history_nbytes(self, state_shape: Sequence[int], dtype: Optional[torch.dtype] = None) -> int:
        """The formula B x C x S x H x bytes for states of ``state_shape`` ([B, C, ...] or [B, S, C])."""
        dtype = self.config.history_dtype or dtype or torch.float32
        B, C = state_shape[0], state_shape[1]
        spatial = math.prod(state_shape[2:]) if len(state_shape) > 2 else 1
        return history_memory_bytes(B, C, spatial, self.max_history, dtype)

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("MHCSequential", "x", x)  # the history mixes x: a floating tensor
        if _special_mode():  # functional: a fresh local buffer
            return self._run(x, HistoryBuffer(self.max_history, self.config.history_dtype))
        idle = self._idle
        try:
            history = idle.pop()
        except IndexError:  # other threads are running this module: a buffer of this call's own
            history = HistoryBuffer(self.max_history, self.config.history_dtype)
        try:
            return self._run(x, history)
        finally:
            self._history = history
            idle.append(history)

    def _run(self, x: Tensor, history: HistoryBuffer) -> Tensor:
        history.clear()
        history.peak_nbytes = 0
        history.push(x)
        for i, (block, skip) in enumerate(zip(self.blocks, self.skips)):
            if isinstance(block, MHCBlock):
                out = block(x, history)
            else:
                y = block(x)
                if y.shape != x.shape:
                    if not self.allow_shape_change:
                        raise ValueError(f"MHCSequential: block {i} ({type(block).__name__}) changed the shape from "
                                         f"{tuple(x.shape)} to {tuple(y.shape)}: the history states must share one "
                                         "shape (use one MHCSequential per stage, or allow_shape_change=True)")
                    history.clear()
                    out = y
                else:
                    out = skip(y, history)
            history.push(out)
            x = out
        if not history._ring_mode:
            history.clear()  # drop the references: autograd keeps what the backward needs, nothing more
        return x

    @torch.no_grad()
    def freeze(self) -> "MHCSequential":
        """Replace every skip (its own and its blocks') by a constant :class:`WeightedSum`, in place."""
        freeze_mhc(self)
        return self


def freeze_mhc(model: nn.Module) -> nn.Module:
    """Replace every :class:`MHCSkip` / :class:`MatrixMHCSkip` in ``model`` by its frozen form, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, (MHCSkip, MatrixMHCSkip)):
            setattr(model, name, child.freeze())
        else:
            freeze_mhc(child)
    return model


def clear_history(model: nn.Module) -> None:
    """Drop the states and free the buffer of every :class:`MHCSequential` inside ``model`` (``model`` too), and of
    every :class:`HistoryBuffer` held as an attribute of one of its modules."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"mhc.clear_history: model: expected an nn.Module, got {type(model).__name__}")
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, HistoryBuffer):
                value.release()


class HistoryMixin:
    """Gives a model class ``clear_history()`` (see :func:`clear_history`): ``class Net(mhc.HistoryMixin,
    nn.Module)``. Before ONNX export, or to give the history memory back: ``model.clear_history()``."""

    def clear_history(self) -> None:
        """Drop the held states and free the history buffers of every multi-history module inside."""
        clear_history(self)


# ---- injection ---------------------------------------------------------------------------------------


def inject_mhc(model: nn.Module, example_input: Union[Tensor, Tuple], *, min_blocks: int = 2,
               predicate: Optional[Callable[[str, nn.Sequential], bool]] = None,
               config: Optional[MHCSkipConfig] = None, **skip_kwargs) -> List[str]:
    """Replace, in place, each ``nn.Sequential`` of ``model`` whose (>= ``min_blocks``) children all keep
    their input's shape by an :class:`MHCSequential` over the same children (their weights kept).

    Shapes are found by running ``example_input`` through ``model`` once (no grad). Children are used
    as the transformations F; a child that is already a residual block keeps its own shortcut and gains
    the history on top. ``predicate(name, seq)`` can veto containers. Returns the replaced names.
    """
    shapes: Dict[int, List[Tuple[torch.Size, torch.Size]]] = {}
    handles = []
    sequentials = {name: m for name, m in model.named_modules() if isinstance(m, nn.Sequential)}
    for name, seq in sequentials.items():
        for child in seq:
            def hook(mod, args, out, key=id(child)):
                if args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
                    shapes.setdefault(key, []).append((args[0].shape, out.shape))
            handles.append(child.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    replaced: List[str] = []
    for name, seq in sequentials.items():
        if not name or len(seq) < min_blocks:
            continue
        if any(name.startswith(done + ".") for done in replaced):  # inside a container already replaced
            continue
        if predicate is not None and not predicate(name, seq):
            continue
        seen = [shapes.get(id(child)) for child in seq]
        if not all(seen) or not all(i == o for s in seen for i, o in s):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, MHCSequential(*list(seq), config=config, **skip_kwargs))
        replaced.append(name)
    return replaced
