"""The path from a public op to the C++ core, shared by both op families (n-stream and multi-history).

Everything an op call needs besides its own arguments lives here once: the backend selection, the tests' poison
flag, the fake outputs' allocation, the registration of an op and the call of its C++ kernel.

Every op is defined and implemented in C++ (python/src/torch_ops.cpp: the schema, and kernels that allocate their
outputs with torch and run the core on torch's current stream). Python registers on it one fake implementation
and, for forwards, one autograd formula (``setup_context`` and ``backward``): :func:`register`. A call takes one of
two routes:

- plain eager calls (real tensors, no torch.compile / tracing / dispatch or function modes) go straight to the C++
  kernel (:func:`kernel`: a redispatch to the tensors' backend key), through an eager ``torch.autograd.Function``
  when a gradient is needed: this saves the dispatcher's autograd and Python layers, most of an eager call's host
  cost (docs/PERFORMANCE.md, host cost);
- everything else (torch.compile, fake and meta tensors, tensor subclasses such as DTensor, FlopCounterMode,
  export) dispatches ``torch.ops.mhc.<name>``; under a torch.func transform (grad, vjp, jacrev, vmap) through an
  autograd Function of the form torch.func accepts, built from the same formula (:func:`transformable_function`).
  Forward-mode AD is refused (:func:`refuse_forward_ad`), and a second backward through any route raises
  (:func:`once_differentiable`).

:class:`Op` puts the two together for ops whose arguments begin with their tensors (it builds the eager
``autograd.Function`` from the registered formula); ops that take a list of tensors (the history states) build
their own ``autograd.Function``, which sees each state as an input, from the same two helpers.
Both routes run the same kernels and the same autograd formulas, so their results are identical.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor, nn

from . import _C

# ---- backend selection (one setting for both families) --------------------------------------------------

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


# ---- outputs ----------------------------------------------------------------------------------------------

# Tests turn this on (set_poison_outputs): every output is NaN-filled before the op runs, so elements an op fails
# to write show. The C++ kernels allocate the real outputs and follow the same switch; new() serves the fakes.
poison_outputs = False


def set_poison_outputs(on: bool) -> None:
    global poison_outputs
    poison_outputs = bool(on)
    _C.set_poison_outputs(poison_outputs)


def new(like: Tensor, shape=None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An output buffer on like's device (with like's shape and dtype unless given)."""
    if poison_outputs:
        return torch.full(like.shape if shape is None else shape, float("nan"), dtype=dtype or like.dtype,
                          device=like.device)
    if shape is None:
        if dtype is None and like.is_contiguous():
            return torch.empty_like(like)  # keyword arguments cost almost a microsecond more
        return torch.empty_like(like, dtype=dtype, memory_format=torch.contiguous_format)
    return like.new_empty(shape, dtype=dtype)  # a third cheaper than torch.empty(..., device=like.device)


# ---- the two routes -----------------------------------------------------------------------------------------

_PLAIN = (Tensor, nn.Parameter)


def eager(*tensors: Optional[Tensor]) -> bool:
    """True for a plain eager call: real CPU/CUDA tensors, nothing tracing or intercepting the dispatcher."""
    for t in tensors:  # the per-tensor test first: it is what fails under torch.compile's fake tensors
        if t is not None and (type(t) not in _PLAIN or t.is_meta):
            return False
    return not _intercepted()


def _intercepted() -> bool:
    """Something traces or intercepts the dispatcher: torch.compile, a function or dispatch mode, functorch, jit; or
    a forward-mode AD level is open (the dispatcher route then refuses dual inputs: :func:`refuse_forward_ad`)."""
    return (_is_compiling() or _torch_function_mode() or _dispatch_modes() or _functorch_active() or _jit_tracing()
            or _forward_ad._current_level >= 0)


def in_functorch() -> bool:
    """A torch.func transform is active (and torch.compile, which handles those transforms itself, is not)."""
    return _functorch_active() and not _is_compiling()


def refuse_forward_ad(op: str, tensors) -> None:
    """Raises for an input that carries a forward-mode tangent (torch.autograd.forward_ad, torch.func.jvp): the ops
    have no forward derivative, and a custom op would silently give its outputs none (a zero jvp). Only called
    while a dual level is open, so its per-tensor test costs nothing otherwise."""
    if _forward_ad._current_level < 0:
        return
    for t in tensors:
        for u in (t if isinstance(t, (list, tuple)) else (t,)):
            if isinstance(u, Tensor) and _forward_ad.unpack_dual(u).tangent is not None:
                raise RuntimeError(f"mhc.{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not "
                                   "supported: the op has no forward derivative; use reverse mode "
                                   "(torch.autograd.grad, torch.func.vjp)")


# The raw functions of eager(): each call through its public wrapper costs a few tenths of a microsecond more.
_is_compiling = torch.compiler.is_compiling
_torch_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_jit_tracing = torch._C._is_tracing
_functorch_level = torch._C._functorch.maybe_current_level  # not None inside a torch.func transform, backward too


def needs_grad(tensors) -> bool:
    """True when autograd is on and one of the tensors (None entries skipped) requires grad."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def eager_apply(function: type) -> Callable:
    """``function.apply`` without its Python wrapper, for plain eager calls only (:func:`eager` true, so no functorch
    transform is active): there the wrapper only re-packs the arguments (``unwrap_dead_wrappers``) before this
    same C entry point, 3 us a call."""
    raw = torch._C._FunctionBase.__dict__.get("apply")
    return raw.__get__(None, function) if raw is not None else function.apply


def transformable_function(name: str, forward: Callable, setup_context: Callable, backward: Callable) -> type:
    """An autograd Function for calls under torch.func transforms (grad, vjp, jacrev, vmap of them): ``forward``
    dispatches the op through every key (so vmap reaches its batching), ``setup_context`` and ``backward`` are the
    op's registered formula. torch.func needs this form of Function, and refuses the one
    ``torch.library.register_autograd`` builds (torch 2.11); vmap of it runs the op per batch element."""
    return type(f"{name}_transformable", (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(once_differentiable(backward)),
    })


def register_vmap_by_element(op) -> None:
    """vmap of ``op`` (a ``torch.ops.mhc`` overload) as one call per batch element, the results stacked: for the ops
    that take a list of tensors, for which torch has no fallback ("Batching rule not implemented"). A list argument's
    in_dims is a list with one entry per tensor."""

    def select(arg, dim, i):
        if isinstance(arg, (list, tuple)):
            dims = dim if isinstance(dim, (list, tuple)) else [dim] * len(arg)
            return [select(a, d, i) for a, d in zip(arg, dims)]
        return arg if dim is None or arg is None else arg.select(dim, i)

    def stack(results):
        first = results[0]
        if isinstance(first, (list, tuple)):
            parts = [stack([r[k] for r in results]) for k in range(len(first))]
            return type(first)(p[0] for p in parts), type(first)(p[1] for p in parts)
        return torch.stack(results), 0

    def rule(info, in_dims, *args):
        return stack([op(*select(args, list(in_dims), i)) for i in range(info.batch_size)])

    torch.library.register_vmap(op)(rule)


def _eager_function(name: str, kernel: Callable, setup_context: Callable, backward: Callable):
    """A torch.autograd.Function running the kernel with the op's autograd formula.

    forward takes ctx itself (the separate setup_context style binds the arguments with inspect on every call)."""

    def forward(ctx, *args):
        output = kernel(*args)
        setup_context(ctx, args, output)
        return output

    return type(f"{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(once_differentiable(backward)),
    })


# The backend keys an eager call redispatches to: past autograd and every other key, straight to the kernel.
_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_CUDA_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def register(name: str, fake: Callable, *, setup_context: Optional[Callable] = None,
             backward: Optional[Callable] = None):
    """Registers the fake implementation and (forwards) the autograd formula on the C++-defined op mhc::<name>;
    returns the op, ``torch.ops.mhc.<name>.default`` (its call dispatches through everything)."""
    qualname = f"mhc::{name}"
    torch.library.register_fake(qualname)(fake)
    if backward is not None:  # once differentiable: a second backward through it raises instead of giving zeros
        torch.library.register_autograd(qualname, once_differentiable(backward), setup_context=setup_context)
    return getattr(torch.ops.mhc, name).default


def _requiring_grad(t: Tensor) -> Tensor:
    t.requires_grad = True  # the attribute, as torch's decorator sets it: torch.func refuses requires_grad_()
    return t


def once_differentiable(backward: Callable) -> Callable:
    """torch.autograd.function.once_differentiable for every backward of this package: under create_graph=True each
    gradient is tied to a node that raises when differentiated again, where it would otherwise carry no graph (a zero
    second derivative, silently). Unlike torch's, it ties them whatever the incoming gradients: with a loss linear in
    the op's output those carry no graph, yet the gradient still depends on the op's inputs. It also takes results
    that hold lists of tensors (the history ops' gradients of their states)."""

    def wrapper(ctx, *grads):
        with torch.no_grad():
            result = backward(ctx, *grads)
        if not torch.is_grad_enabled():  # create_graph=False: nothing will differentiate the gradients
            return result
        if _functorch_level() is not None and not any(isinstance(g, Tensor) and g.requires_grad for g in grads):
            return result  # inside a torch.func transform (vmap refuses the tie): as torch's decorator decides
        flat, spec = torch.utils._pytree.tree_flatten(result)
        where = [i for i, t in enumerate(flat) if isinstance(t, Tensor)]
        if where:
            refuse = torch._C._functions.DelayedError(
                b"trying to differentiate twice a function that was marked with @once_differentiable", len(where))
            tied = refuse(*[_requiring_grad(flat[i].detach()) for i in where])
            for i, t in zip(where, tied if isinstance(tied, tuple) else (tied,)):
                flat[i] = t
        return torch.utils._pytree.tree_unflatten(flat, spec)

    return wrapper


def kernel(op) -> Callable:
    """The C++ kernel of ``op`` without autograd (plain eager calls only): ``kernel(on, *args)`` runs the kernel of
    tensor ``on``'s device with the op's positional arguments."""
    redispatch = op._handle.redispatch_boxed

    def call(on: Tensor, *args):
        return redispatch(_CUDA_KEYS if on.is_cuda else _CPU_KEYS, *args)

    return call


class Op:
    """One op whose arguments begin with its tensors: its C++ kernels (registered with torch's dispatcher by the
    extension, python/src/torch_ops.cpp, which also defines the schema) and, registered here, its fake
    implementation and autograd formula.

    ``fake(*args)`` gives the outputs' metadata; ``setup_context(ctx, inputs, output)`` and
    ``backward(ctx, *grads)`` are the autograd formula (forwards only). Call the Op with the op's positional
    arguments.
    """

    def __init__(self, name: str, fake: Callable, *, setup_context: Optional[Callable] = None,
                 backward: Optional[Callable] = None):
        self.name = name
        self.dispatch = register(name, fake, setup_context=setup_context, backward=backward)
        self.tensor_args, self._device_arg = _tensor_args(self.dispatch)
        self._kernel = kernel(self.dispatch)
        self.function = self._apply = self.transformable = None
        if backward is not None:
            self.function = _eager_function(name, self.kernel, setup_context, backward)
            self._apply = eager_apply(self.function)
            self.transformable = transformable_function(name, self.dispatch, setup_context, backward)

    def kernel(self, *args):
        """The C++ kernel of the tensors' device, without autograd (a plain eager call only)."""
        return self._kernel(args[self._device_arg], *args)

    def all_outputs(self, *args):
        """Every output, without autograd (for autograd Functions built around the op)."""
        return self.kernel(*args) if eager(*args[:self.tensor_args]) else self.dispatch(*args)

    def _dispatched(self, args):
        refuse_forward_ad(self.name, args[:self.tensor_args])
        if self.transformable is not None and in_functorch():
            return self.transformable.apply(*args)
        return self.dispatch(*args)

    def __call__(self, *args):
        # eager() and needs_grad() in one pass over the tensors: a small op's call is mostly this.
        grad = False
        for t in args[:self.tensor_args]:
            if t is not None:
                if type(t) not in _PLAIN or t.is_meta:
                    return self._dispatched(args)
                grad = grad or t.requires_grad
        if _intercepted():
            return self._dispatched(args)
        if grad and self.function is not None and torch.is_grad_enabled():
            return self._apply(*args)
        return self._kernel(args[self._device_arg], *args)


def _tensor_args(op) -> Tuple[int, int]:
    """(how many of the op's arguments are tensors, the index of the first that is never None). The tensors come
    first in every schema (Tensor or Tensor?), so a call finds them by slicing its arguments, and the required one
    names the device."""
    types = [str(a.type) for a in op._schema.arguments]
    kinds = [t in ("Tensor", "Optional[Tensor]") for t in types]
    count = kinds.index(False) if False in kinds else len(kinds)
    if count == 0 or any(kinds[count:]) or "Tensor" not in types[:count]:
        raise TypeError(f"mhc._plumbing.Op: {op}: its arguments must begin with the tensors, one of them required")
    return count, types.index("Tensor")
