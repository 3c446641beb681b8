"""Multi-history skip ops (docs/MATH.md section 2) as PyTorch ops backed by the C++/CUDA core.

Public functions (re-exported from :mod:`mhc.ops`):

- ``project_logits(logits, constraint="simplex", *, temperature=1.0, epsilon=0.1)`` projects the last dim
  of ``logits`` onto a manifold: ``"simplex"`` (sparsemax, exact zeros), ``"softmax"``, ``"identity"``
  (``(1 - epsilon) * softmax + epsilon`` on index 0, the newest state) or ``"doubly_stochastic"``
  (Sinkhorn over the last two dims, which must be square).
- ``history_mix(x, states, weights, *, gate=None)`` = ``x + gate * sum_k weights[k] * states[k]`` with
  ``states`` stacked ``[H, *x.shape]`` (or a list of H tensors). With 2-D weights ``[R, H]`` (matrix
  variant) the result is ``[R, *state shape]``: ``out[r] = x[r] + gate * sum_k weights[r, k] * states[k]``;
  ``x`` may then be None (zeros).
- ``history_skip(x, states, logits, *, constraint, temperature, epsilon, gate=None)`` -> ``(out, weights)``:
  projection and weighted sum fused in one pass (one CUDA kernel) for the vector constraints.

Each forward and backward is one op of torch's dispatcher (``torch.ops.mhc.project_logits``,
``history_mix``, ``history_skip`` and their ``*_backward``), defined and implemented in C++
(python/src/torch_ops.cpp: torch allocates the outputs there); this module registers their fake
implementations and autograd formulas (mhc._plumbing), so ``torch.compile(fullgraph=True)`` traces them.
No op reads a value back to the host: a state whose weight is exactly 0 is skipped by the kernel itself
(the one-hot case costs one residual add).

Dtype policy: ``x`` decides. Weights, logits and gate are cast to float32 (float64 for a float64 ``x``);
states keep their own dtype when it pairs with ``x``'s (same dtype, fp16/bf16 history under an fp32
``x``, fp32 history under an fp16/bf16 ``x``) and are cast to ``x``'s dtype otherwise. The casts are
differentiable. The backend follows :func:`mhc.ops.use_backend` (``"reference"`` = the fp64 C++ oracle).
"""

from __future__ import annotations

import collections.abc
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _C
from ._plumbing import (_PLAIN, Op, _intercepted, eager, eager_apply, in_functorch, kernel, once_differentiable,
                        refuse_forward_ad, register, register_vmap_by_element, transformable_function)
from ._plumbing import get_backend as _backend
from ._plumbing import needs_grad as _needs_grad
from ._plumbing import new as _new
from ._checks import STREAM_DTYPES, check_tensor, int_arg, real_arg, same_device

__all__ = [
    "CONSTRAINTS",
    "project_logits",
    "history_mix",
    "history_skip",
    "reference_project_logits",
    "reference_history_mix",
]

CONSTRAINTS = ("simplex", "softmax", "identity", "doubly_stochastic")
VECTOR_CONSTRAINTS = ("simplex", "softmax", "identity")

States = Union[Tensor, Sequence[Tensor]]


# ---- helpers --------------------------------------------------------------------------------------------


def coef_dtype(stream: torch.dtype) -> torch.dtype:
    """dtype of weights, logits and gate that goes with a stream dtype."""
    return torch.float64 if stream == torch.float64 else torch.float32


_PAIRS = {(torch.float32, torch.float16), (torch.float32, torch.bfloat16), (torch.float16, torch.float32),
          (torch.bfloat16, torch.float32)}


def _pairs(stream: torch.dtype, storage: torch.dtype) -> bool:
    return stream == storage or (stream, storage) in _PAIRS


def _mix_out_shape(states: Sequence[Tensor], weights: Tensor):
    shape = states[0].shape
    return (weights.shape[0], *shape) if weights.dim() == 2 else shape


def _check_name(constraint: str, op: str = "project_logits") -> str:
    if not isinstance(constraint, str):
        raise TypeError(f"mhc.{op}: constraint: expected a string, one of {CONSTRAINTS}, got "
                        f"{type(constraint).__name__}")
    aliases = {"sparsemax": "simplex", "sinkhorn": "doubly_stochastic"}
    constraint = aliases.get(constraint, constraint)
    if constraint not in CONSTRAINTS:
        raise ValueError(f"mhc.{op}: constraint: expected one of {CONSTRAINTS}, got {constraint!r}")
    return constraint


# ---- argument checks of the public functions ------------------------------------------------------------


def _state_list(op: str, states, lead_name: Optional[str] = None, lead: Optional[Tensor] = None) -> List[Tensor]:
    """``states`` (stacked ``[H, *shape]`` or a sequence) as a list of 1..MAX_HISTORY floating tensors of one
    shape, on ``lead``'s device (``states[0]``'s when no lead is given). One pass: a small layer feels each us."""
    if isinstance(states, Tensor):
        check_tensor(op, "states", states)
        if states.dim() < 1:
            raise ValueError(f"mhc.{op}: states: expected a stacked tensor [H, *shape] or a list of tensors, got a "
                             "0-d tensor")
        states = list(states.unbind(0))
    elif type(states) in (list, tuple) or (isinstance(states, collections.abc.Sequence)
                                           and not isinstance(states, str)):
        states = list(states)
    else:
        raise TypeError(f"mhc.{op}: states: expected a stacked tensor [H, *shape] or a list of tensors, got "
                        f"{type(states).__name__}")
    if not states:
        raise ValueError(f"mhc.{op}: states: expected at least one state, got none")
    if len(states) > _C.MAX_HISTORY:
        raise ValueError(f"mhc.{op}: states: at most {_C.MAX_HISTORY} states, got {len(states)}")
    check_tensor(op, "states[0]", states[0])
    if lead is None:
        lead_name, lead = "states[0]", states[0]
    shape, device = states[0].shape, lead.device
    for k, s in enumerate(states):
        if not isinstance(s, Tensor) or s.dtype not in STREAM_DTYPES:
            check_tensor(op, f"states[{k}]", s)
        if s.shape != shape:
            raise ValueError(f"mhc.{op}: states[{k}]: expected shape {list(shape)} like states[0], got "
                             f"{list(s.shape)}")
        if s.device != device:
            same_device(op, lead_name, lead, **{f"states[{k}]": s})
    return states


def _gate_arg(op: str, gate) -> Optional[Tensor]:
    check_tensor(op, "gate", gate, optional=True)
    if gate is not None and gate.numel() != 1:
        raise ValueError(f"mhc.{op}: gate: expected one value (shape [] or [1]), got shape {list(gate.shape)}")
    return gate


def _logits_width(op: str, logits: Tensor, square: bool) -> int:
    """H of ``[..., H]`` logits (``[..., H, H]`` when ``square``), 1..MAX_HISTORY."""
    layout = "[..., H, H]" if square else "[..., H]"
    if logits.dim() < (2 if square else 1):
        raise ValueError(f"mhc.{op}: logits: expected {layout}, got shape {list(logits.shape)}")
    H = logits.shape[-1]
    if not 1 <= H <= _C.MAX_HISTORY:
        raise ValueError(f"mhc.{op}: logits: {layout} needs H in 1..{_C.MAX_HISTORY}, got shape "
                         f"{list(logits.shape)}")
    if square and logits.shape[-2] != H:
        raise ValueError(f"mhc.{op}: logits: doubly_stochastic needs square matrices {layout}, got shape "
                         f"{list(logits.shape)}")
    return H


# Rank limit of the core's tensor views. The mix kernels are elementwise over the state shape, so states of a
# higher rank go in flattened to one dim.
_MAX_RANK = 8


# ---- project_logits ------------------------------------------------------------------------------------


def _project_fake(logits, constraint, temperature, epsilon, sinkhorn_iters, sinkhorn_eps, backend):
    return _new(logits)


def _project_backward_fake(logits, weights, grad_weights, constraint, temperature, epsilon, sinkhorn_iters,
                           sinkhorn_eps, backend):
    return _new(logits)


_project_backward_op = Op("project_logits_backward", _project_backward_fake)


def _project_setup_context(ctx, inputs, output):
    logits, *hyper = inputs
    ctx.save_for_backward(logits, output)
    ctx.hyper = hyper  # constraint, temperature, epsilon, sinkhorn_iters, sinkhorn_eps, backend


def _project_backward(ctx, grad_weights):
    logits, weights = ctx.saved_tensors
    grad_logits = _project_backward_op(logits, weights, grad_weights.contiguous(), *ctx.hyper)
    return (grad_logits,) + (None,) * len(ctx.hyper)


# logits [..., H] (doubly_stochastic: [..., H, H]) -> weights on the manifold.
_project_op = Op("project_logits", _project_fake, setup_context=_project_setup_context, backward=_project_backward)


def project_logits(logits: Tensor, constraint: str = "simplex", *, temperature: float = 1.0, epsilon: float = 0.1,
                   sinkhorn_iters: int = 20, sinkhorn_eps: float = 1e-6) -> Tensor:
    """Project ``logits`` over the last dim onto the ``constraint``'s manifold (see the module doc).

    ``temperature`` divides the logits first. ``epsilon`` is the weight the ``identity`` constraint keeps
    on index 0 (the newest state). ``doubly_stochastic`` runs the Sinkhorn of docs/MATH.md section 1.1 on ``[..., H, H]``.
    Half-precision logits are computed in float32 (the result has the logits' dtype).
    """
    op = "project_logits"
    check_tensor(op, "logits", logits)
    constraint = _check_name(constraint)
    hyper = (real_arg(op, "temperature", temperature, positive=True), _epsilon_arg(op, epsilon),
             int_arg(op, "sinkhorn_iters", sinkhorn_iters, 1), real_arg(op, "sinkhorn_eps", sinkhorn_eps, low=0.0))
    square = constraint == "doubly_stochastic"
    H = _logits_width(op, logits, square)
    if logits.numel() == 0:  # no rows: nothing for a kernel to do
        return reference_project_logits(logits, constraint, temperature=hyper[0], epsilon=hyper[1],
                                        sinkhorn_iters=hyper[2], sinkhorn_eps=hyper[3])
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    flatten = logits.dim() > _MAX_RANK
    if flatten:  # the kernels take rows of H (or H x H)
        work = work.reshape((-1, H, H) if square else (-1, H))
    weights = _project_op(work.contiguous(), constraint, *hyper, _backend())
    return (weights.view(logits.shape) if flatten else weights).to(logits.dtype)


def _epsilon_arg(op: str, epsilon) -> float:
    epsilon = real_arg(op, "epsilon", epsilon, low=0.0)
    if epsilon > 1.0:
        raise ValueError(f"mhc.{op}: epsilon: expected a value in [0, 1], got {epsilon}")
    return epsilon


# ---- history_mix ---------------------------------------------------------------------------------------


def _mix_fake(x, states, weights, gate, backend):
    return _new(states[0], _mix_out_shape(states, weights), x.dtype if x is not None else states[0].dtype)


def _mix_backward_fake(grad_out, states, weights, gate, need_states, backend):
    return (_new(weights), _new(weights, (1,) if gate is not None else (0,)),
            [_new(s) for s in states] if need_states else [])


def _mix_per_state_backward_fake(grad_out, states, weights, gate, need_states, backend):
    grad_weights, grad_gate, _ = _mix_backward_fake(grad_out, states, weights, gate, False, backend)
    return grad_weights, grad_gate, _per_state_grad_fakes(states, need_states)


def _per_state_grad_fakes(states, need_states) -> List[Optional[Tensor]]:
    """grad_states of the *_per_state_backward ops: the marked states' gradients, None for the others; none when
    none is marked."""
    if not any(need_states):
        return []
    return [_new(s) if need else None for s, need in zip(states, need_states)]


# -> (grad_weights, grad_gate ([1], or [0] without gate), grad_states (empty unless need_states)).
_mix_backward_op = register("history_mix_backward", _mix_backward_fake)
# The eager backward's: need_states has one flag per state, so detached states' gradients are not computed.
_mix_per_state_backward_kernel = kernel(register("history_mix_per_state_backward", _mix_per_state_backward_fake))


def _mix_setup_context(ctx, inputs, output):
    x, states, weights, gate, backend = inputs
    ctx.num_states = len(states)
    ctx.has_x, ctx.has_gate = x is not None, gate is not None
    ctx.save_for_backward(weights, gate, *states)
    ctx.backend = backend


def _mix_backward(ctx, grad_out):
    weights, gate, *states = ctx.saved_tensors
    need_x, need_states, need_weights, need_gate = ctx.needs_input_grad[:4]
    grad_out = grad_out.contiguous()
    grad_weights = grad_gate = grad_states = None
    if need_states or need_weights or need_gate:
        grad_weights, grad_gate, grad_states = _mix_backward_op(grad_out, states, weights, gate, bool(need_states),
                                                                ctx.backend)
        grad_states = list(grad_states) if need_states else None
        grad_gate = grad_gate if ctx.has_gate else None
    return grad_out if (ctx.has_x and need_x) else None, grad_states, grad_weights, grad_gate, None


# out = x + gate * sum_k weights[..., k] * states[k].
_mix_op = register("history_mix", _mix_fake, setup_context=_mix_setup_context, backward=_mix_backward)
_mix_kernel = kernel(_mix_op)


class _MixFunction(torch.autograd.Function):
    """Eager path of mhc::history_mix: the C++ kernels, with the states last, unpacked, so autograd sees each."""

    @staticmethod
    def forward(ctx, x, weights, gate, backend, *states):
        out = _mix_kernel(states[0], x, list(states), weights, gate, backend)
        ctx.has_x, ctx.has_gate, ctx.backend = x is not None, gate is not None, backend
        ctx.save_for_backward(weights, gate, *states)
        return out

    @staticmethod
    @once_differentiable  # no double backward: refused, not wrong
    def backward(ctx, grad_out):
        weights, gate, *states = ctx.saved_tensors
        need_x, need_weights, need_gate = ctx.needs_input_grad[:3]
        need_each = list(ctx.needs_input_grad[4:])  # detached states: no gradient computed or written
        grad_out = grad_out.contiguous()
        grad_weights = grad_gate = None
        grad_states = [None] * len(states)
        if any(need_each) or need_weights or need_gate:
            grad_weights, grad_gate, computed = _mix_per_state_backward_kernel(grad_out, grad_out, states, weights,
                                                                               gate, need_each, ctx.backend)
            grad_gate = grad_gate if ctx.has_gate else None
            if computed:
                grad_states = computed
        return (grad_out if (ctx.has_x and need_x) else None, grad_weights, grad_gate, None, *grad_states)


_mix_apply = eager_apply(_MixFunction)


def _mix_transformable_setup_context(ctx, inputs, output):
    x, weights, gate, backend, *states = inputs
    _mix_setup_context(ctx, (x, states, weights, gate, backend), output)


def _transformable_backward(ctx, grad_out, states, backward_op, has_x: bool = True):
    """The backward of a transformable history Function, whose inputs are (x, coefficients, gate, the non-tensor
    arguments, *states): ``backward_op(grad_out, need_states)`` -> (grad of the coefficients, grad_gate, grad_states)."""
    need = ctx.needs_input_grad
    need_states = any(need[4:])
    grad_coef = grad_gate = None
    grad_states = [None] * len(states)
    if need_states or need[1] or need[2]:
        grad_coef, grad_gate, computed = backward_op(grad_out.contiguous(), need_states)
        grad_gate = grad_gate if ctx.has_gate else None
        if need_states:
            grad_states = list(computed)
    return (grad_out if (has_x and need[0]) else None, grad_coef, grad_gate, None, *grad_states)


def _mix_transformable_backward(ctx, grad_out):
    weights, gate, *states = ctx.saved_tensors
    return _transformable_backward(
        ctx, grad_out, states, lambda g, need: _mix_backward_op(g, states, weights, gate, need, ctx.backend), ctx.has_x)


# Under torch.func transforms: the op dispatched with the states unpacked, so the transforms see each.
_MixTransformable = transformable_function(
    "history_mix", lambda x, weights, gate, backend, *states: _mix_op(x, list(states), weights, gate, backend),
    _mix_transformable_setup_context, _mix_transformable_backward)


def _as_list(states: States) -> List[Tensor]:
    if isinstance(states, Tensor):
        if states.dim() < 1:
            raise ValueError("mhc.history_mix: states: expected a stacked tensor [H, *shape] or a list of tensors")
        return list(states.unbind(0))
    return list(states)


def _prepare_states(states: List[Tensor], stream: torch.dtype, flatten: bool) -> List[Tensor]:
    """Checked states in a storage dtype the kernels pair with ``stream``, contiguous (flat when ``flatten``)."""
    storage = states[0].dtype
    if any(s.dtype != storage for s in states) or not _pairs(stream, storage):
        states = [s.to(stream) for s in states]
    states = [s.contiguous() for s in states]
    return [s.reshape(-1) for s in states] if flatten else states


def history_mix(x: Optional[Tensor], states: States, weights: Tensor, *, gate: Optional[Tensor] = None) -> Tensor:
    """``x + gate * sum_k weights[k] * states[k]`` (see the module doc for the matrix form and dtypes).

    ``states``: stacked ``[H, *shape]`` or a sequence of H tensors of ``shape``, newest first. A state whose
    weight is exactly 0 is not read.
    """
    op = "history_mix"
    check_tensor(op, "x", x, optional=True)
    states = _state_list(op, states, "x", x)
    check_tensor(op, "weights", weights)
    gate = _gate_arg(op, gate)
    lead_name, lead = ("x", x) if x is not None else ("states[0]", states[0])
    same_device(op, lead_name, lead, weights=weights, gate=gate)
    H, shape = len(states), tuple(states[0].shape)
    if weights.dim() == 1 and tuple(weights.shape) == (H,):
        out_shape = shape
    elif weights.dim() == 2 and weights.shape[1] == H and 1 <= weights.shape[0] <= _C.MAX_HISTORY:
        out_shape = (weights.shape[0], *shape)
    else:
        raise ValueError(f"mhc.{op}: weights: expected [H] or [R, H] with H = {H} states and R in "
                         f"1..{_C.MAX_HISTORY}, got shape {list(weights.shape)}")
    if x is not None and tuple(x.shape) != out_shape:
        raise ValueError(f"mhc.{op}: x: expected shape {list(out_shape)} "
                         f"({'[R, *state shape]' if len(out_shape) > len(shape) else 'the states shape'}), "
                         f"got {list(x.shape)}")
    if states[0].numel() == 0:  # empty states: nothing for a kernel to do
        return reference_history_mix(x, states, weights, gate=gate)
    stream = lead.dtype
    coef = coef_dtype(stream)
    flatten = len(out_shape) > _MAX_RANK
    states = _prepare_states(states, stream, flatten)
    x = None if x is None else x.contiguous()
    if flatten and x is not None:
        x = x.reshape((out_shape[0], -1) if len(out_shape) > len(shape) else (-1,))
    if weights.dtype != coef or not weights.is_contiguous():  # a no-op .to() still costs a microsecond
        weights = weights.to(coef).contiguous()
    gate = None if gate is None else gate.to(coef).reshape(1).contiguous()
    if eager(x, weights, gate, *states):
        if _needs_grad((x, weights, gate, *states)):
            out = _mix_apply(x, weights, gate, _backend(), *states)
        else:  # nothing to differentiate: the kernel alone (an autograd.Function costs several us)
            out = _mix_kernel(states[0], x, states, weights, gate, _backend())
    else:
        refuse_forward_ad(op, (x, states, weights, gate))
        if in_functorch():
            out = _MixTransformable.apply(x, weights, gate, _backend(), *states)
        else:
            out = _mix_op(x, states, weights, gate, _backend())
    return out.view(out_shape) if flatten else out


# ---- history_skip (fused) ------------------------------------------------------------------------------


def _skip_fake(x, states, logits, gate, constraint, temperature, epsilon, backend):
    return _new(x), _new(logits)


def _skip_backward_fake(grad_out, states, logits, weights, gate, need_states, constraint, temperature, epsilon,
                        backend):
    return (_new(logits), _new(logits, (1,) if gate is not None else (0,)),
            [_new(s) for s in states] if need_states else [])


def _skip_per_state_backward_fake(grad_out, states, logits, weights, gate, need_states, constraint, temperature,
                                  epsilon, backend):
    grad_logits, grad_gate, _ = _skip_backward_fake(grad_out, states, logits, weights, gate, False, constraint,
                                                    temperature, epsilon, backend)
    return grad_logits, grad_gate, _per_state_grad_fakes(states, need_states)


# -> (grad_logits, grad_gate ([1], or [0] without gate), grad_states (empty unless need_states)).
_skip_backward_op = register("history_skip_backward", _skip_backward_fake)
# The eager backward's: need_states has one flag per state, so detached states' gradients are not computed.
_skip_per_state_backward_kernel = kernel(register("history_skip_per_state_backward", _skip_per_state_backward_fake))


def _skip_setup_context(ctx, inputs, output):
    x, states, logits, gate, *hyper = inputs
    ctx.has_gate = gate is not None
    ctx.save_for_backward(logits, output[1], gate, *states)
    ctx.hyper = hyper  # constraint, temperature, epsilon, backend
    ctx.mark_non_differentiable(output[1])


def _skip_backward(ctx, grad_out, _grad_weights):
    logits, weights, gate, *states = ctx.saved_tensors
    need_x, need_states, need_logits, need_gate = ctx.needs_input_grad[:4]
    grad_out = grad_out.contiguous()
    grad_logits = grad_gate = grad_states = None
    if need_states or need_logits or need_gate:
        grad_logits, grad_gate, grad_states = _skip_backward_op(grad_out, states, logits, weights, gate,
                                                                bool(need_states), *ctx.hyper)
        grad_states = list(grad_states) if need_states else None
        grad_gate = grad_gate if ctx.has_gate else None
    return (grad_out if need_x else None, grad_states, grad_logits, grad_gate) + (None,) * len(ctx.hyper)


# -> (out = x + gate * sum_k project(logits)[k] * states[k], weights = project(logits)).
_skip_op = register("history_skip", _skip_fake, setup_context=_skip_setup_context, backward=_skip_backward)
for _op in (_mix_op, _mix_backward_op, _skip_op, _skip_backward_op):  # they take the states as a list
    register_vmap_by_element(_op)
_skip_kernel = kernel(_skip_op)


class _SkipFunction(torch.autograd.Function):
    """Eager path of mhc::history_skip: the C++ kernels, with the states last, unpacked, so autograd sees each."""

    # hyper = (constraint, temperature, epsilon, backend), one argument: each argument of apply costs host time.
    @staticmethod
    def forward(ctx, x, logits, gate, hyper, *states):
        out, weights = _skip_kernel(x, x, list(states), logits, gate, *hyper)
        ctx.has_gate = gate is not None
        ctx.hyper = hyper
        ctx.save_for_backward(logits, weights, gate, *states)
        ctx.mark_non_differentiable(weights)
        return out, weights

    @staticmethod
    @once_differentiable  # no double backward: refused, not wrong
    def backward(ctx, grad_out, _grad_weights):
        logits, weights, gate, *states = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_each = list(need[4:])  # detached states: no gradient computed or written
        grad_logits = grad_gate = None
        grad_states = [None] * len(states)
        if need[1] or need[2] or True in need_each:
            grad_out = grad_out.contiguous()
            grad_logits, grad_gate, computed = _skip_per_state_backward_kernel(grad_out, grad_out, states, logits,
                                                                               weights, gate, need_each, *ctx.hyper)
            grad_gate = grad_gate if ctx.has_gate else None
            if computed:
                grad_states = computed
        return (grad_out if need[0] else None, grad_logits, grad_gate, None, *grad_states)


_skip_apply = eager_apply(_SkipFunction)


def _skip_transformable_setup_context(ctx, inputs, output):
    x, logits, gate, hyper, *states = inputs
    _skip_setup_context(ctx, (x, states, logits, gate, *hyper), output)


def _skip_transformable_backward(ctx, grad_out, _grad_weights):
    logits, weights, gate, *states = ctx.saved_tensors
    return _transformable_backward(
        ctx, grad_out, states, lambda g, need: _skip_backward_op(g, states, logits, weights, gate, need, *ctx.hyper))


_SkipTransformable = transformable_function(
    "history_skip", lambda x, logits, gate, hyper, *states: _skip_op(x, list(states), logits, gate, *hyper),
    _skip_transformable_setup_context, _skip_transformable_backward)


def _skip_common_case(x, states, logits, constraint, temperature, epsilon, gate) -> Optional[Tuple[Tensor, Tensor]]:
    """history_skip's result for the call a model makes every block, or None for any other call (which then takes
    the checks that name a bad argument). The common case: a plain eager call without gate, a list of 1..H
    contiguous states of x's dtype, shape and device, logits [H] in the coefficient dtype, a vector constraint
    and float hyper-parameters in range. In one pass, since a small layer's call is mostly its host cost."""
    if (type(x) not in _PLAIN or gate is not None or type(states) is not list or type(logits) not in _PLAIN
            or constraint not in VECTOR_CONSTRAINTS or type(temperature) is not float or type(epsilon) is not float
            or not (0.0 < temperature < math.inf and 0.0 <= epsilon <= 1.0)):
        return None
    dtype, shape, device = x.dtype, x.shape, x.device
    H = len(states)
    if (dtype not in STREAM_DTYPES or coef_dtype(dtype) is not logits.dtype or logits.shape != (H,) or not 1 <= H <= _C.MAX_HISTORY
            or logits.device != device or x.is_meta or not x.is_contiguous() or not logits.is_contiguous()
            or x.dim() > _MAX_RANK or x.numel() == 0):
        return None
    grad = x.requires_grad or logits.requires_grad
    for s in states:
        if (type(s) not in _PLAIN or s.dtype != dtype or s.shape != shape or s.device != device
                or not s.is_contiguous()):
            return None
        grad = grad or s.requires_grad
    if _intercepted():
        return None
    hyper = (constraint, temperature, epsilon, _backend())
    if grad and torch.is_grad_enabled():
        return _skip_apply(x, logits, None, hyper, *states)
    return _skip_kernel(x, x, states, logits, None, *hyper)


def history_skip(x: Tensor, states: States, logits: Tensor, *, constraint: str = "simplex", temperature: float = 1.0,
                 epsilon: float = 0.1, gate: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Fused ``project_logits`` + ``history_mix`` for a vector constraint: returns ``(out, weights)``.

    ``logits`` is ``[H]``, one per state (newest first). The weights are returned for inspection; they
    are not differentiable (differentiate ``out``, which depends on ``logits``).
    """
    fast = _skip_common_case(x, states, logits, constraint, temperature, epsilon, gate)
    if fast is not None:
        return fast
    op = "history_skip"
    check_tensor(op, "x", x)
    states = _state_list(op, states, "x", x)
    check_tensor(op, "logits", logits)
    gate = _gate_arg(op, gate)
    constraint = _check_name(constraint, op)
    if constraint not in VECTOR_CONSTRAINTS:
        raise ValueError("mhc.history_skip: constraint: doubly_stochastic needs the matrix form "
                         "(project_logits on [H, H] logits, then history_mix with 2-D weights)")
    temperature, epsilon = real_arg(op, "temperature", temperature, positive=True), _epsilon_arg(op, epsilon)
    same_device(op, "x", x, logits=logits, gate=gate)
    H = len(states)
    if tuple(x.shape) != tuple(states[0].shape):
        raise ValueError(f"mhc.{op}: x: expected shape {list(states[0].shape)} like the states, got {list(x.shape)}")
    if tuple(logits.shape) != (H,):
        raise ValueError(f"mhc.{op}: logits: expected shape [H] = [{H}] (one per state), got {list(logits.shape)}")
    coef = coef_dtype(x.dtype)
    if logits.dtype != coef or not logits.is_contiguous():  # a no-op .to() still costs a microsecond
        logits = logits.to(coef).contiguous()
    if x.numel() == 0:  # empty states: nothing for a kernel to do
        weights = project_logits(logits, constraint, temperature=temperature, epsilon=epsilon)
        return reference_history_mix(x, states, weights, gate=gate), weights.detach()
    flatten = x.dim() > _MAX_RANK
    states = _prepare_states(states, x.dtype, flatten)
    x_in = x.contiguous().reshape(-1) if flatten else x.contiguous()
    gate = None if gate is None else gate.to(coef).reshape(1).contiguous()
    hyper = (constraint, temperature, epsilon, _backend())
    if eager(x_in, logits, gate, *states):
        if _needs_grad((x_in, logits, gate, *states)):
            out, weights = _skip_apply(x_in, logits, gate, hyper, *states)
        else:  # nothing to differentiate: the kernel alone (an autograd.Function costs several us)
            out, weights = _skip_kernel(x_in, x_in, states, logits, gate, *hyper)
    else:
        refuse_forward_ad(op, (x_in, states, logits, gate))
        if in_functorch():
            out, weights = _SkipTransformable.apply(x_in, logits, gate, hyper, *states)
        else:
            out, weights = _skip_op(x_in, states, logits, gate, *hyper)
    return (out.view(x.shape) if flatten else out), weights


# ---- plain-PyTorch references (tests, ONNX export) -----------------------------------------------------


def _sparsemax(u: Tensor) -> Tensor:
    sorted_u, _ = torch.sort(u, dim=-1, descending=True)
    cumsum = sorted_u.cumsum(-1)
    k = torch.arange(1, u.shape[-1] + 1, dtype=u.dtype, device=u.device)
    support = (1 + k * sorted_u > cumsum).to(u.dtype)
    count = support.sum(-1, keepdim=True)
    top_sum = (sorted_u * support).sum(-1, keepdim=True)
    tau = (top_sum - 1) / count
    return torch.clamp(u - tau, min=0)


def _sinkhorn(u: Tensor, iters: int, eps: float) -> Tensor:
    comb = torch.softmax(u, dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def reference_project_logits(logits: Tensor, constraint: str = "simplex", *, temperature: float = 1.0,
                             epsilon: float = 0.1, sinkhorn_iters: int = 20, sinkhorn_eps: float = 1e-6) -> Tensor:
    """``project_logits`` in plain PyTorch ops (differentiable by autograd, exportable to ONNX)."""
    constraint = _check_name(constraint)
    u = logits / temperature
    if constraint == "simplex":
        # support = {k : 1 + k u_(k) > sum_{j<=k} u_(j)} of the sorted logits; the support is a prefix.
        return _sparsemax(u)
    if constraint == "softmax":
        return torch.softmax(u, dim=-1)
    if constraint == "identity":
        newest = (torch.arange(u.shape[-1], device=u.device) == 0).to(u.dtype)
        return (1 - epsilon) * torch.softmax(u, dim=-1) + epsilon * newest
    return _sinkhorn(u, sinkhorn_iters, sinkhorn_eps)


def reference_history_mix(x: Optional[Tensor], states: States, weights: Tensor, *, gate: Optional[Tensor] = None
                          ) -> Tensor:
    """``history_mix`` in plain PyTorch ops, math in the stream dtype (fp64 inputs give an fp64 oracle)."""
    stacked = torch.stack(_as_list(states)) if not isinstance(states, Tensor) else states
    dtype = x.dtype if x is not None else stacked.dtype
    stacked = stacked.to(dtype)
    flat = stacked.reshape(stacked.shape[0], -1)
    w = weights.to(dtype)
    mixed = (w.reshape(-1, w.shape[-1]) @ flat).reshape(tuple(w.shape[:-1]) + tuple(stacked.shape[1:]))
    if gate is not None:
        mixed = gate.to(dtype).reshape(()) * mixed
    return mixed if x is None else x + mixed
