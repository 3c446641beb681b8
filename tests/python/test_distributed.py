"""mHC under DDP, FSDP2 (per site, per block, root; bf16 policy) and tensor + sequence parallelism, with activation
checkpointing and torch.compile: examples/train_distributed.py's model trained by two gloo processes
(distributed_worker.py, all scenarios in one launch) against one process, and resumed from distributed checkpoints."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mhc
from conftest import _run_slow

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
sys.path.insert(0, str(WORKER.parent))
import distributed_worker as worker  # noqa: E402  (its scenario table)

LAUNCH_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory, pytestconfig):
    out = tmp_path_factory.mktemp("distributed")
    package_root = str(Path(mhc.__file__).resolve().parents[1])  # the worker imports this same mhc
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="",  # CPU ranks on gloo on every machine (a one-GPU machine has no rank 1 GPU)
               PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, str(WORKER), str(out)] + (["--slow"] if _run_slow(pytestconfig) else [])
    procs = [subprocess.Popen(command, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outputs = [p.communicate()[0] for p in procs]
    for r in range(2):  # a failing rank saved its traceback (the other one then times out in a collective)
        saved = out / f"rank{r}.pt"
        if saved.is_file() and "failure" in (found := torch.load(saved, weights_only=False)):
            pytest.fail(found["failure"])
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{outputs[r][-4000:]}"
    return torch.load(out / "rank0.pt", weights_only=False)


def _assert_grads_close(got: dict, want: dict, rtol: float, where: str):
    assert got.keys() == want.keys(), where
    for name, w in want.items():
        # Relative to the tensor's scale, with a floor: many gradients are tiny sums of O(0.1) terms that cancel
        # (head.scale's is ~1e-5), and sharded matmuls sum them in another order, so their error is ~eps * 0.1,
        # not eps * |gradient| (with torch 2.11.0+cu130's CPU kernels, head.scale under tp differs by 1.04e-8).
        s = max(1e-2, w.abs().max().item())
        torch.testing.assert_close(got[name] / s, w / s, rtol=rtol, atol=rtol,
                                   msg=lambda m, name=name: f"{where}: {name}: {m}")


COMPARED = [name for name, (mode, extra) in worker.SCENARIOS.items()
            if mode != "none" and not ({"dtype", "optimizer"} & extra.keys())]
COMPARED += [pytest.param(name, marks=pytest.mark.slow) for name in worker.SLOW_SCENARIOS]


def _reference(scenario: str) -> str:
    _, extra = {**worker.SCENARIOS, **worker.SLOW_SCENARIOS}[scenario]
    return "reference_one_block" if extra.get("depth") == 1 else "reference"


@pytest.mark.parametrize("scenario", COMPARED)
def test_same_losses_and_gradients_as_one_process(results, scenario):
    got, want = results[scenario], results[_reference(scenario)]
    torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-5, atol=0)
    for step, (g, w) in enumerate(zip(got["grads"], want["grads"])):
        _assert_grads_close(g, w, 1e-5, f"{scenario}, step {step + 1}")
    _assert_grads_close(got["params"], want["params"], 1e-5, f"{scenario}, parameters after {worker.STEPS} steps")


def test_fsdp_bfloat16_policy_keeps_mhc_parameters_float32(results):
    got, want = results["fsdp_bfloat16"], results["reference"]
    assert got["dtypes"] == {"mhc": ["torch.float32"], "linear": ["torch.bfloat16"]}  # the rest computes in bf16
    torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-2, atol=0)


@pytest.mark.parametrize("mode", worker.RESUMED)
def test_resume_continues_bit_identically(results, mode):
    resumed, straight = results[mode + "_resumed"], results[mode]
    assert torch.equal(resumed["losses"], straight["losses"][worker.SAVED_AT:])
    for name, p in straight["params"].items():
        assert torch.equal(resumed["params"][name], p), name


@pytest.mark.parametrize("scenario", worker.CROSS)
def test_resume_in_another_mode(results, scenario):
    """A checkpoint of one mode (here FSDP's shards or TP's) loads into another: DCP reshards it."""
    mode, source = worker.CROSS[scenario]
    got, want = results[scenario], results[source]
    torch.testing.assert_close(got["losses"], want["losses"][worker.SAVED_AT:], rtol=1e-5, atol=0)
    _assert_grads_close(got["params"], want["params"], 1e-5, scenario)


@pytest.mark.parametrize("case, error, match", [
    ("dtensor_streams", "RuntimeError", r"mhc.MHC: x: a DTensor \(placements \(Shard\(dim=1\),\).*MHCSequenceParallel"),
    ("sharded_parameter", "RuntimeError", r"mhc.MHC: fn: a sharded DTensor \(placements \(Shard\(dim=0\),\)"),
    ("style_on_linear", "TypeError", "MHCSequenceParallel: module: expected an mhc.MHC, .* got Linear"),
    ("style_on_2d_mesh", "ValueError", r"MHCSequenceParallel: device_mesh: expected the 1-D .* \(1, 2\)"),
])
def test_layouts_that_cannot_work_raise_clearly(results, case, error, match):
    message = results["errors"][case]
    assert message.startswith(error + ": "), message
    assert re.search(match, message), message


def test_distributed_mode_without_process_group_says_how_to_launch():
    model = worker.example.MHCTransformer(worker.example.TrainConfig(**worker.TINY), 16)
    cfg = worker.example.TrainConfig(distributed="ddp", **worker.TINY)
    with pytest.raises(RuntimeError, match="needs a process group .* torchrun --nproc_per_node"):
        worker.example.parallelize(model, cfg, torch.device("cpu"))
