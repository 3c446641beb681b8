"""One rank of test_distributed.py: trains examples/train_distributed.py's model in every mode and writes what it
saw (losses, gradients, final parameters, resumed runs, error messages) to OUT/rank0.pt (a failing rank writes its
traceback to OUT/rank<r>.pt). ``distributed_worker.py OUT [--slow]``: --slow adds SLOW_SCENARIOS.

Run by the test as two processes with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (gloo); rank 0 also
trains the one-process reference (its collectives are none, so rank 1 just waits for the next scenario)."""

from __future__ import annotations

import datetime
import importlib.util
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import mhc

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_distributed.py"
spec = importlib.util.spec_from_file_location("train_distributed", EXAMPLE)
example = sys.modules["train_distributed"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)

STEPS, SAVED_AT = 4, 2  # every scenario: 4 steps, a checkpoint after step 2
# SGD for the comparisons: Adam's first steps turn gradients at rounding level (a few here, by the symmetry of the
# initial streams) into whole steps, so runs that differ by rounding part after one step.
TINY = dict(steps=STEPS, batch_size=4, seq_len=16, width=32, depth=2, heads=4, n_streams=4, warmup_steps=2,
            optimizer="sgd")

# name: (mode, extra config). The compiled scenarios use aot_eager (inductor's C++ build takes minutes on 2 cores)
# and one block: a second block would compile again (its input comes out of the first block's graph).
COMPILED = dict(depth=1, activation_checkpointing=True, compile="aot_eager")
SCENARIOS = {
    "reference": ("none", {}),
    "reference_one_block": ("none", dict(depth=1)),
    "ddp": ("ddp", {}),
    "ddp_checkpointed": ("ddp", dict(activation_checkpointing=True)),
    "fsdp": ("fsdp", {}),
    "fsdp_checkpointed_compiled": ("fsdp", COMPILED),
    "fsdp_bfloat16": ("fsdp", dict(dtype="bfloat16")),
    "fsdp_adamw": ("fsdp", dict(optimizer="adamw")),  # resumed: Adam's sharded state through the checkpoint
    "tp": ("tp", {}),
}
SLOW_SCENARIOS = {"tp_checkpointed_compiled": ("tp", COMPILED)}  # 20 s on a busy 2-core machine: with --slow only
RESUMED = ("ddp", "fsdp", "fsdp_adamw", "tp")  # resumed from their own checkpoint: must continue bit-identically
CROSS = {"tp_from_fsdp": ("tp", "fsdp")}  # resumed from another mode's checkpoint (resharded)


def full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def unwrapped(model):
    return getattr(model, "module", model)  # DDP wraps; FSDP2 and tensor parallelism keep the module


def parameter_dtypes(model):
    """Forward pre-hooks that record the dtypes of the parameters the mHC modules and the linear layers compute with
    (FSDP2 swaps the gathered parameters in before the hooks run: it registered its hook first)."""
    seen = {"mhc": set(), "linear": set()}

    def recorder(kind):
        return lambda module, args: seen[kind].update(p.dtype for p in module.parameters())

    for module in unwrapped(model).modules():
        if isinstance(module, (mhc.MHC, mhc.MHCHead, torch.nn.Linear)):
            module.register_forward_pre_hook(recorder("linear" if isinstance(module, torch.nn.Linear) else "mhc"))
    return seen


def run(cfg, corpus, device, first_step=0, resume_from=None, checkpoint_dir=None):
    vocab = example.padded_vocab_size(corpus)
    model, optimizer = example.build(cfg, vocab, device)
    dtypes = parameter_dtypes(model)
    if resume_from is not None:
        assert example.load(model, optimizer, resume_from) == first_step
    losses, grads = [], []
    for step in range(first_step, cfg.steps):
        losses.append(example.forward_backward(model, *example.batch(corpus, cfg, step, device), cfg, device))
        grads.append({name: full(p.grad) for name, p in unwrapped(model).named_parameters()})
        example.optimizer_step(model, optimizer, step, cfg)
        if checkpoint_dir is not None and step + 1 == SAVED_AT:
            example.save(model, optimizer, SAVED_AT, checkpoint_dir)
    params = {name: full(p) for name, p in unwrapped(model).named_parameters()}
    return dict(losses=torch.stack(losses), grads=grads, params=params,
                dtypes={k: sorted(str(d) for d in v) for k, v in dtypes.items()})


def errors(device):
    """Messages of the layouts the mHC modules cannot take."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    from mhc.distributed import MHCSequenceParallel

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    found = {}

    def catch(name, fn):
        try:
            fn()
            found[name] = "no error"
        except Exception as e:  # the test checks type and message
            found[name] = f"{type(e).__name__}: {e}"

    site = mhc.MHC(2, 8)
    x = torch.randn(2, 4, 2, 8)
    catch("dtensor_streams", lambda: site(DTensor.from_local(x, mesh, [Shard(1)])))
    sharded = mhc.MHC(2, 8)
    sharded.fn = torch.nn.Parameter(distribute_tensor(sharded.fn.detach(), mesh, [Shard(0)]))
    catch("sharded_parameter", lambda: sharded(x))
    catch("style_on_linear", lambda: parallelize_module(torch.nn.Linear(8, 8), mesh, MHCSequenceParallel()))
    mesh_2d = init_device_mesh(device.type, (1, dist.get_world_size()))
    catch("style_on_2d_mesh", lambda: parallelize_module(mhc.MHC(2, 8), mesh_2d, MHCSequenceParallel()))
    return found


def main(out: Path, slow: bool) -> None:
    torch.set_num_threads(1)
    # A rank that fails makes the other one wait in a collective: let that wait end well before the test's limit.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    device = example.setup()
    rank = dist.get_rank()
    corpus = example.load_corpus()
    results = {}
    try:
        for name, (mode, extra) in {**SCENARIOS, **(SLOW_SCENARIOS if slow else {})}.items():
            if mode == "none" and rank != 0:
                continue
            cfg = example.TrainConfig(distributed=mode, **{**TINY, **extra})
            # (saving is collective: the reference, on rank 0 alone, saves nothing)
            start = time.perf_counter()
            results[name] = run(cfg, corpus, device, checkpoint_dir=out / f"checkpoint_{name}" if mode != "none"
                                else None)
            print(f"rank {rank}: {name} took {time.perf_counter() - start:.1f} s", flush=True)
        for name in RESUMED:
            mode, extra = SCENARIOS[name]
            cfg = example.TrainConfig(distributed=mode, **{**TINY, **extra})
            results[name + "_resumed"] = run(cfg, corpus, device, SAVED_AT,
                                             out / f"checkpoint_{name}" / f"step_{SAVED_AT}")
        for name, (mode, source) in CROSS.items():
            cfg = example.TrainConfig(distributed=mode, **TINY)
            results[name] = run(cfg, corpus, device, SAVED_AT, out / f"checkpoint_{source}" / f"step_{SAVED_AT}")
        results["errors"] = errors(device)
    except Exception:
        results["failure"] = f"rank {rank}: {traceback.format_exc()}"
    if rank == 0 or "failure" in results:
        torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--slow" in sys.argv[2:])
