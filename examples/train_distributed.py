"""Train a small mHC transformer on one process or several: DDP, FSDP2, or tensor + sequence parallel.

    python examples/train_distributed.py --steps 20                                   # one process
    torchrun --nproc_per_node=2 examples/train_distributed.py --distributed ddp --steps 20
    torchrun --nproc_per_node=2 examples/train_distributed.py --distributed fsdp --checkpoint-dir ckpt --save-every 10
    torchrun --nproc_per_node=2 examples/train_distributed.py --distributed fsdp --checkpoint-dir ckpt --resume

CPU processes talk through gloo, GPU processes through NCCL, one GPU per process (``LOCAL_RANK``). Every mode
trains the same model on the same global batches, so the losses agree with the one-process run to float32
rounding. Checkpoints are ``torch.distributed.checkpoint`` folders ``DIR/step_K``. docs/DISTRIBUTED.md explains
the modes and what each one shards.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.utils.checkpoint import checkpoint

import mhc
from mhc.demo.corpus import Corpus, load_corpus

MODES = ("none", "ddp", "fsdp", "tp")


@dataclass
class TrainConfig:
    distributed: str = "none"  # one of MODES
    steps: int = 20
    batch_size: int = 8  # sequences per step, over all ranks
    seq_len: int = 64
    width: int = 64
    depth: int = 2  # blocks, each an attention and an MLP site
    heads: int = 4
    n_streams: int = 4
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9), which does not turn rounding noise into whole steps
    lr: float = 3e-3
    warmup_steps: int = 5
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"  # "bfloat16": FSDP2's mixed-precision policy under fsdp, autocast otherwise
    activation_checkpointing: bool = False
    compile: Optional[str] = None  # a torch.compile backend for each block ("inductor", "aot_eager")
    checkpoint_dir: Optional[str] = None
    save_every: int = 0  # steps between checkpoints (0: only at the end, if checkpoint_dir is given)
    resume: bool = False  # continue from the latest checkpoint in checkpoint_dir
    log_every: int = 1


# ---- the model ------------------------------------------------------------------------------------------------
# Separate q, k, v projections (not one fused qkv) so that a column-wise split gives each rank whole heads.


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.head_dim = width // heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(width, width, bias=False) for _ in range(4))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, S, _ = h.shape  # global sizes: under tensor parallelism h is a replicated DTensor
        q, k, v = (w(h).view(B, S, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # this rank's heads
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc, self.proj = nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(h)))


class Block(nn.Module):
    """Attention and MLP, each wrapped by an mHC site; streams ``[B, S, n, C]`` in and out."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        n, C = cfg.n_streams, cfg.width
        self.attn_site, self.attn_norm, self.attn = mhc.MHC(n, C), nn.RMSNorm(C), Attention(C, cfg.heads)
        self.mlp_site, self.mlp_norm, self.mlp = mhc.MHC(n, C), nn.RMSNorm(C), MLP(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer_input, state = self.attn_site.pre(x)
        y = self.attn(self.attn_norm(layer_input))
        x, layer_input, state = self.attn_site.post_pre(x, y, state, self.mlp_site)
        y = self.mlp(self.mlp_norm(layer_input))
        return self.mlp_site.post(x, y, state)


class MHCTransformer(nn.Module):
    """Token embedding -> n streams -> blocks -> learned head -> logits. No position embedding: the causal
    attention tells positions apart, and nothing then depends on which tokens a rank holds."""

    def __init__(self, cfg: TrainConfig, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.width)
        self.expand = mhc.StreamExpand(cfg.n_streams)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head = mhc.MHCHead(cfg.n_streams, cfg.width)
        self.out_norm = nn.RMSNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, vocab_size, bias=False)
        self.activation_checkpointing = cfg.activation_checkpointing

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.expand(self.embed(tokens))
        for block in self.blocks:
            # Recomputes the block (its mHC ops included) in the backward instead of keeping its activations.
            x = checkpoint(block, x, use_reentrant=False) if self.activation_checkpointing else block(x)
        return self.lm_head(self.out_norm(self.head(x)))


# ---- parallelism --------------------------------------------------------------------------------------------------


def launch_problem(cfg: TrainConfig, world: int) -> Optional[str]:
    """Why cfg.distributed cannot run on `world` processes, or None."""
    if cfg.distributed != "none" and world < 2:
        return (f"--distributed {cfg.distributed}: needs a process group of 2 or more ranks: launch with torchrun "
                f"--nproc_per_node=N (got WORLD_SIZE={world})")
    return None


def parallelize(model: MHCTransformer, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """Applies cfg.distributed to model (tensor parallelism, then compile, then the data-parallel wrapper)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    problem = launch_problem(cfg, world)
    if problem:
        raise RuntimeError(problem)
    if cfg.distributed == "tp":
        _tensor_parallel(model, world, device)
    if cfg.compile:
        for block in model.blocks:
            # Under FSDP2 the sites' hooks sit inside the block, and dynamo cannot trace them: graph breaks there.
            block.compile(backend=cfg.compile, fullgraph=cfg.distributed != "fsdp")
    if cfg.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.distributed == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from mhc.distributed import fully_shard_mhc

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if cfg.dtype == "bfloat16" else MixedPrecisionPolicy()
        fully_shard_mhc(model)  # each site its own group: float32 whatever the blocks use
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


def _tensor_parallel(model: MHCTransformer, world: int, device: torch.device) -> None:
    """Megatron-style tensor parallelism with sequence parallelism over all ranks: the streams and everything
    between the parallel regions are sharded along the tokens (dim 1), the attention heads and the MLP's hidden
    units across ranks; the mHC parameters are replicated."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    from mhc.distributed import MHCSequenceParallel

    mesh = init_device_mesh(device.type, (world,))
    gather_tokens = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    plan = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "expand": MHCSequenceParallel(),
        "head": MHCSequenceParallel(),
        "out_norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    block_plan = {
        "attn_site": MHCSequenceParallel(), "mlp_site": MHCSequenceParallel(),
        "attn_norm": SequenceParallel(), "mlp_norm": SequenceParallel(),
        "attn": gather_tokens, "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(),
        "attn.wv": ColwiseParallel(), "attn.wo": RowwiseParallel(output_layouts=Shard(1)),
        "mlp": gather_tokens, "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(output_layouts=Shard(1)),
    }
    for k in range(len(model.blocks)):
        plan.update({f"blocks.{k}.{name}": style for name, style in block_plan.items()})
    parallelize_module(model, mesh, plan)
    # torch's SequenceParallel leaves the norms' weight gradients Partial (a sum over the ranks still to be done,
    # redone by every optimizer op that reads them, and refused by the checkpoint): sum them once in the backward,
    # as MHCSequenceParallel does for the mHC parameters.
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            parameter.register_hook(lambda grad: grad.redistribute(placements=[Replicate()]))


def check_config(cfg: TrainConfig, world: int, vocab_size: int) -> None:
    if cfg.distributed not in MODES:
        raise ValueError(f"--distributed: expected one of {MODES}, got {cfg.distributed!r}")
    if cfg.optimizer not in ("adamw", "sgd"):
        raise ValueError(f"--optimizer: expected adamw or sgd, got {cfg.optimizer!r}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype: expected float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.width % cfg.heads:
        raise ValueError(f"--heads: {cfg.heads} does not divide --width {cfg.width}")
    if cfg.resume and not cfg.checkpoint_dir:
        raise ValueError("--resume: needs --checkpoint-dir")
    if cfg.distributed in ("ddp", "fsdp") and cfg.batch_size % world:
        raise ValueError(f"--batch-size: {cfg.batch_size} sequences do not split over {world} ranks")
    if cfg.distributed == "tp":
        for name, size in (("--heads", cfg.heads), ("--seq-len", cfg.seq_len), ("the vocabulary", vocab_size)):
            if size % world:
                raise ValueError(f"tensor parallelism over {world} ranks: {name} ({size}) must be a multiple of "
                                 f"{world}")


# ---- training -------------------------------------------------------------------------------------------------


def setup() -> torch.device:
    """Joins torchrun's process group when launched by it (NCCL on GPUs, gloo on CPU); the device of this rank."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda and local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"train_distributed: LOCAL_RANK {local_rank} has no GPU: this node has "
                           f"{torch.cuda.device_count()}; start at most that many processes per node "
                           f"(torchrun --nproc-per-node), or run on the CPU with CUDA_VISIBLE_DEVICES=''")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device


def padded_vocab_size(corpus: Corpus) -> int:
    return math.ceil(corpus.vocab_size / 8) * 8  # a multiple of 8: tensor parallelism splits it evenly


def build(cfg: TrainConfig, vocab_size: int, device: torch.device):
    """The model (same initial weights in every mode and on every rank), parallelized, and its optimizer."""
    torch.manual_seed(cfg.seed)
    model = parallelize(MHCTransformer(cfg, vocab_size).to(device), cfg, device)
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    return model, optimizer


def batch(corpus: Corpus, cfg: TrainConfig, step: int, device: torch.device):
    """This rank's part of the global batch of ``step``: a pure function of (seed, step), so a resumed run sees
    the same data. DDP and FSDP split the sequences over the ranks; tensor parallelism gives every rank all of
    them (it splits the tokens inside the model)."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    tokens, targets = corpus.batch("train", cfg.batch_size, cfg.seq_len, generator)
    if cfg.distributed in ("ddp", "fsdp"):
        rank, world = dist.get_rank(), dist.get_world_size()
        rows = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
        tokens, targets = tokens[rows], targets[rows]
    return tokens.to(device), targets.to(device)


def forward_backward(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig,
                     device: torch.device) -> torch.Tensor:
    """Loss of this rank's batch, backward included; returns the global loss (mean over all sequences)."""
    autocast = cfg.dtype == "bfloat16" and cfg.distributed != "fsdp"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(tokens)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    loss = loss.detach()
    if cfg.distributed in ("ddp", "fsdp"):
        dist.all_reduce(loss)  # a sum: gloo has no average
        loss /= dist.get_world_size()
    return loss


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def save(model: nn.Module, optimizer: torch.optim.Optimizer, steps_done: int, checkpoint_dir: str) -> Path:
    """A distributed checkpoint of the model, the optimizer and the step: each rank writes its shards."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    path = Path(checkpoint_dir) / f"step_{steps_done}"
    dcp.save({"model": model_state, "optimizer": optimizer_state, "steps_done": torch.tensor(steps_done)},
             checkpoint_id=path)
    return path


def latest_checkpoint(checkpoint_dir: str) -> Optional[Path]:
    found = [(int(m.group(1)), p) for p in Path(checkpoint_dir).glob("step_*")
             if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / ".metadata").is_file()]
    return max(found)[1] if found else None


def load(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> int:
    """Loads a checkpoint written by :func:`save` (by any mode and number of ranks); returns the steps done."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "steps_done": torch.tensor(0)}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return int(state["steps_done"])


def train(cfg: TrainConfig, log=print) -> list[float]:
    """Runs the configured training; returns the loss of every step it ran."""
    device = setup()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    corpus = load_corpus()
    vocab_size = padded_vocab_size(corpus)
    check_config(cfg, world, vocab_size)
    model, optimizer = build(cfg, vocab_size, device)
    if rank == 0:
        log(f"mode {cfg.distributed}, {world} rank(s) on {device.type}"
            f"{' (' + dist.get_backend() + ')' if dist.is_initialized() else ''}, "
            f"{sum(p.numel() for p in model.parameters() if p.requires_grad)} parameters, "
            f"global batch {cfg.batch_size} x {cfg.seq_len}, dtype {cfg.dtype}")
    start_step = 0
    if cfg.resume:
        path = latest_checkpoint(cfg.checkpoint_dir)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint step_K in {cfg.checkpoint_dir}")
        start_step = load(model, optimizer, path)
        if rank == 0:
            log(f"resumed from {path} after step {start_step}")
    losses = []
    begin = time.perf_counter()
    for step in range(start_step, cfg.steps):
        loss = forward_backward(model, *batch(corpus, cfg, step, device), cfg, device)
        optimizer_step(model, optimizer, step, cfg)
        losses.append(loss.item())
        if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            log(f"step {step + 1:4d}  loss {losses[-1]:.6f}")
        if cfg.checkpoint_dir and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps):
            path = save(model, optimizer, step + 1, cfg.checkpoint_dir)
            if rank == 0:
                log(f"saved {path}")
    if rank == 0:
        log(f"{len(losses)} steps in {time.perf_counter() - begin:.1f} s")
    return losses


def parse_args(argv=None) -> TrainConfig:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--distributed", choices=MODES, default=defaults.distributed,
                   help="none (one process), ddp, fsdp (FSDP2 per site, per block and root) or tp (tensor + "
                        "sequence parallel over all ranks)")
    for name in ("steps", "batch_size", "seq_len", "width", "depth", "heads", "n_streams", "warmup_steps", "seed",
                 "save_every", "log_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "grad_clip"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default=defaults.optimizer,
                   help="adamw, or sgd with momentum 0.9 (comparing runs: Adam's first steps turn gradients at "
                        "rounding level into whole steps)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=defaults.dtype,
                   help="bfloat16: FSDP2 mixed precision under fsdp (mHC parameters stay float32), autocast otherwise")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward")
    p.add_argument("--compile", metavar="BACKEND", help="torch.compile each block with this backend (inductor, "
                                                        "aot_eager)")
    p.add_argument("--checkpoint-dir", help="folder of the distributed checkpoints step_K")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> None:
    cfg = parse_args(argv)
    problem = launch_problem(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if problem:  # the launcher's mistake: a message, not a traceback
        sys.exit(f"train_distributed.py: error: {problem}")
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
