"""mHC modules under PyTorch's distributed engines: DDP, FSDP2, DTensor tensor and sequence parallelism.

- DDP: nothing to do; the sites' parameters are ordinary parameters (their gradients join DDP's buckets).
- FSDP2: ``fully_shard`` works on a site (every call of a site is a call of its module, so FSDP gathers its
  parameters), a block or the root. :func:`fully_shard_mhc` shards each mHC module as its own group so that a
  low-precision policy of the blocks does not reach the mHC parameters, which stay float32.
- Tensor + sequence parallelism: :class:`MHCSequenceParallel` is the ``ParallelStyle`` of the mHC modules in a
  ``parallelize_module`` plan. The streams ``[B, S, n, C]`` stay sharded along the tokens, every rank runs the
  ops on its own tokens, and the parameters are replicated: their gradients are summed over the mesh in the
  backward (each rank saw other tokens).

``docs/DISTRIBUTED.md`` says what is sharded, what is replicated and the communication mHC adds.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ParallelStyle

from .modules import MHC, MHCHead, MHCState, StreamExpand

__all__ = ["MHC_PARAMETER_POLICY", "MHCSequenceParallel", "fully_shard_mhc", "local_parameters"]

_MHC_MODULES = (MHC, MHCHead, StreamExpand)
_SHARDED_MODULES = (MHC, MHCHead)  # those with parameters
_PARAMETER_NAMES = ("fn", "base", "scale")  # of both, in the order the ops take them

# The FSDP2 policy of an mHC module's own group: float32 parameters and gradient reduction, and the streams left
# in their dtype (casting bf16 streams to float32 would change what the site computes).
MHC_PARAMETER_POLICY = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                            cast_forward_inputs=False)


def fully_shard_mhc(model: nn.Module, *, mp_policy: MixedPrecisionPolicy = MHC_PARAMETER_POLICY,
                    reshard_after_forward: bool = False, **fully_shard_kwargs) -> int:
    """``fully_shard`` every :class:`~mhc.MHC` and :class:`~mhc.MHCHead` of ``model`` as its own group. Call it
    before sharding the blocks and the root, so that their policies do not reach the mHC parameters.

    ``mp_policy``: float32 parameters and reduction by default. ``reshard_after_forward=False`` (FSDP2's default
    is True): a site is called several times per step (pre, post, post_pre), and FSDP2 gathers a resharded group
    at every call and again in the backward; kept, its parameters (small: ``(n*n+2n) * (n*C+1) + 3`` values) are
    gathered once per step. Other keywords (``mesh``, ...) go to ``fully_shard``. Returns the number of modules
    sharded."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"mhc.distributed.fully_shard_mhc: model: expected an nn.Module, got {type(model).__name__}")
    sites = [m for m in model.modules() if isinstance(m, _SHARDED_MODULES) and any(True for _ in m.parameters())]
    for site in sites:
        fully_shard(site, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward, **fully_shard_kwargs)
    return len(sites)


class _ReplicatedToLocal(torch.autograd.Function):
    """A replicated DTensor parameter -> its local copy. The backward sums the ranks' gradients (each computed
    from the rank's own tokens) into the replicated gradient: one all-reduce per parameter and step."""

    @staticmethod
    def forward(ctx, parameter: DTensor) -> Tensor:
        ctx.mesh, ctx.placements = parameter.device_mesh, parameter.placements
        local = parameter.to_local()
        return local.view_as(local)

    @staticmethod
    def backward(ctx, grad: Tensor) -> DTensor:
        partial = DTensor.from_local(grad, ctx.mesh, [Partial()] * ctx.mesh.ndim, run_check=False)
        return partial.redistribute(ctx.mesh, ctx.placements)


def local_parameters(module: nn.Module, x: Tensor, params: Tuple[Optional[Tensor], ...]
                     ) -> Tuple[Optional[Tensor], ...]:
    """What the mHC ops take when ``x`` or a parameter of ``module`` is a DTensor (called by the modules).

    Replicated DTensor parameters give their local copies, whose gradients are summed over the mesh. A DTensor
    ``x`` or a sharded parameter cannot work (the ops take whole parameters and the local tokens): the error
    says what to do instead."""
    owner = f"mhc.{type(module).__name__}"
    if isinstance(x, DTensor):
        raise RuntimeError(
            f"{owner}: x: a DTensor ({_layout(x)}); the mHC ops run on the local tokens of each rank: parallelize "
            f"the module with mhc.distributed.MHCSequenceParallel, which passes them its local shard, or pass "
            f"x.to_local()")
    out = []
    for name, p in zip(_PARAMETER_NAMES, params):
        if isinstance(p, DTensor):
            if not all(isinstance(placement, Replicate) for placement in p.placements):
                raise RuntimeError(
                    f"{owner}: {name}: a sharded DTensor ({_layout(p)}); a site needs all of its parameters on "
                    f"every rank: replicate them (mhc.distributed.MHCSequenceParallel), or let FSDP2 gather them "
                    f"around each call (fully_shard on the site or on a module that holds it, and call the site "
                    f"as a module: site(x), site.pre / post / post_pre)")
            p = _ReplicatedToLocal.apply(p)
        out.append(p)
    return tuple(out)


def _layout(t: DTensor) -> str:
    return f"placements {tuple(t.placements)} on a mesh of shape {tuple(t.device_mesh.shape)}"


class MHCSequenceParallel(ParallelStyle):
    """``ParallelStyle`` of :class:`~mhc.MHC`, :class:`~mhc.MHCHead` and :class:`~mhc.StreamExpand` in a
    tensor-parallel plan with sequence parallelism (``parallelize_module(model, tp_mesh, plan)``).

    - Parameters: replicated DTensors on the (1-D) mesh; their gradients are summed over it in the backward.
    - Inputs: the streams and every tensor of an :class:`~mhc.MHCState`, as DTensors sharded along
      ``sequence_dim`` (others are redistributed to that) or as local tensors taken to be such shards, e.g. the
      output of ``RowwiseParallel(output_layouts=Shard(1))``. The ops run on the local tokens: no communication.
    - Outputs: DTensors sharded along ``sequence_dim`` with their global shape (``use_local_output=False``) or
      the local shards. The sequence length must be a multiple of the mesh size.
    """

    def __init__(self, *, sequence_dim: int = 1, use_local_output: bool = False):
        super().__init__()
        self.sequence_dim = sequence_dim
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, _MHC_MODULES):
            raise TypeError(f"mhc.distributed.MHCSequenceParallel: module: expected an mhc.MHC, mhc.MHCHead or "
                            f"mhc.StreamExpand, got {type(module).__name__} (use torch's SequenceParallel, "
                            f"ColwiseParallel, ... for other modules)")
        if device_mesh.ndim != 1:
            raise ValueError(f"mhc.distributed.MHCSequenceParallel: device_mesh: expected the 1-D tensor-parallel "
                             f"mesh, got a mesh of shape {tuple(device_mesh.shape)} (pass mesh['tp'])")
        return distribute_module(module, device_mesh, input_fn=self._local_inputs, output_fn=self._sharded_outputs)

    def _local_inputs(self, module: nn.Module, inputs: tuple, device_mesh: DeviceMesh) -> tuple:
        sharding = (Shard(self.sequence_dim),)

        def local(t: Any) -> Any:
            if isinstance(t, DTensor):
                if tuple(t.placements) != sharding:
                    t = t.redistribute(device_mesh, sharding)
                return t.to_local()
            return t

        return tuple(_map_tensors(local, t) for t in inputs)

    def _sharded_outputs(self, module: nn.Module, outputs: Any, device_mesh: DeviceMesh) -> Any:
        if self.use_local_output:
            return outputs
        sharding = (Shard(self.sequence_dim),)
        return _map_tensors(lambda t: DTensor.from_local(t, device_mesh, sharding, run_check=False), outputs)

    def __repr__(self) -> str:
        return f"MHCSequenceParallel(sequence_dim={self.sequence_dim}, use_local_output={self.use_local_output})"


def _map_tensors(fn, obj: Any) -> Any:
    """fn applied to a tensor, or to each tensor of an MHCState or a tuple (the inputs and outputs of mHC modules)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, MHCState):
        return MHCState(*(fn(t) for t in obj))
    if isinstance(obj, tuple):
        return tuple(_map_tensors(fn, o) for o in obj)
    return obj
