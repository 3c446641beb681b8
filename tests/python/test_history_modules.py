"""Multi-history skip modules: MHCSequential against a plain-PyTorch re-implementation (values and every
parameter's gradient, detach_history on and off, fp64), HistoryBuffer (ring in inference, references
under autograd, fp16/bf16 storage, the memory formula), freeze to WeightedSum, the matrix variant, conv
blocks, inject_mhc, presets, autocast, torch.compile."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from mhc import history_ops as hops
from mhc.history import (PRESETS, HistoryBuffer, MatrixMHCSkip, MHCBasicBlock, MHCBottleneck, MHCConv2d, MHCSequential,
                         MHCSkip, MHCSkipConfig, HistoryMixin, WeightedSum, clear_history, freeze_mhc,
                         history_memory_bytes, inject_mhc)

from conftest import requires_cuda


def _mlp_blocks(width, depth, dtype=torch.float32):
    torch.manual_seed(1)
    return [nn.Sequential(nn.Linear(width, width, dtype=dtype), nn.Tanh()) for _ in range(depth)]


def _randomise_skips(model, scale=1.0):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (MHCSkip, MatrixMHCSkip)):
                m.logits.copy_(torch.randn_like(m.logits) * scale)
                if m.gate is not None:
                    m.gate.fill_(0.8)


def reference_forward(model: MHCSequential, x):
    """MHCSequential's math with plain PyTorch ops only (autograd differentiates it)."""
    cfg = model.config
    storage = cfg.history_dtype
    history = [x if storage is None else x.to(storage)]
    for block, skip in zip(model.blocks, model.skips):
        y = block(x)
        states = history[: cfg.max_history]
        if cfg.detach_history:
            states = states[:1] + [s.detach() for s in states[1:]]
        n = len(states)
        if isinstance(skip, MatrixMHCSkip):
            m = hops.reference_project_logits(skip.logits[:n, :n], skip.constraint, temperature=skip.temperature,
                                              sinkhorn_iters=skip.sinkhorn_iters)
            mixed = hops.reference_history_mix(None, torch.stack([s.to(y.dtype) for s in states]), m)
            out = y + (mixed[0] if skip.gate is None else skip.gate * mixed[0])
            rest = [mixed[i] for i in range(n)]
            history = [out if storage is None else out.to(storage)] + rest[: cfg.max_history - 1]
        else:
            w = hops.reference_project_logits(skip.logits[:n], skip.constraint, temperature=skip.temperature,
                                              epsilon=skip.epsilon)
            out = hops.reference_history_mix(y, torch.stack([s.to(y.dtype) for s in states]), w, gate=skip.gate)
            history = ([out if storage is None else out.to(storage)] + history)[: cfg.max_history]
        x = out
    return x


@pytest.mark.parametrize("constraint", ["simplex", "softmax", "identity", "doubly_stochastic"])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_sequential_matches_plain_pytorch_fp64(constraint, detach, gated):
    width, depth = 6, 7
    model = MHCSequential(*_mlp_blocks(width, depth, torch.float64), max_history=4, constraint=constraint,
                          detach_history=detach, use_gating=gated, temperature=0.75, sinkhorn_iters=10).double()
    _randomise_skips(model)
    ref_model = copy.deepcopy(model)
    x = torch.randn(3, 5, width, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    out = model(x)
    ref = reference_forward(ref_model, xr)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-9)
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-9, msg=name)


def test_sequential_gradcheck_fp64():
    model = MHCSequential(*_mlp_blocks(3, 4, torch.float64), max_history=3, constraint="softmax").double()
    _randomise_skips(model)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,))


def test_detach_history_alphas_still_learn_and_older_states_get_no_gradient():
    torch.manual_seed(0)
    model = MHCSequential(*_mlp_blocks(8, 6), max_history=4, constraint="softmax", detach_history=True)
    before = [s.logits.detach().clone() for s in model.skips]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(16, 8), torch.randn(16, 8)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()
    moved = [not torch.equal(b, s.logits.detach()) for b, s in zip(before, model.skips)]
    assert all(moved[1:]), moved  # the first block has only one state: its alphas are fixed at 1
    # Detached: the skip sends no gradient to older states (compare with the undetached model).
    attached = copy.deepcopy(model)
    attached.config.detach_history = False
    for s in attached.skips:
        s.detach_history = False
    x = torch.randn(4, 8, requires_grad=True)
    g_det = torch.autograd.grad(model(x).sum(), model.blocks[0][0].weight)[0]
    g_att = torch.autograd.grad(attached(x).sum(), attached.blocks[0][0].weight)[0]
    assert not torch.allclose(g_det, g_att)


@pytest.mark.parametrize("shape", [(2, 9, 16), (2, 16, 5, 7)])  # sequences [B, S, C] and feature maps [B, C, H, W]
@pytest.mark.parametrize("history_dtype", [None, torch.float16, torch.bfloat16])
def test_shapes_and_history_dtypes(shape, history_dtype):
    C = 16
    if len(shape) == 3:
        blocks = [nn.Sequential(nn.Linear(C, C), nn.GELU()) for _ in range(5)]
    else:
        blocks = [nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.ReLU()) for _ in range(5)]
    model = MHCSequential(*blocks, max_history=3, history_dtype=history_dtype)
    _randomise_skips(model)
    x = torch.randn(*shape, requires_grad=True)
    out = model(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    ref = reference_forward(copy.deepcopy(model), x)
    tol = dict(rtol=1e-5, atol=1e-5) if history_dtype is None else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        inference = model(x)
    torch.testing.assert_close(inference, out.detach(), rtol=1e-6, atol=1e-6)
    held = model.history.states()[0]
    assert held.dtype == (history_dtype or torch.float32)
    # The formula B x C x S x H x bytes is what the ring holds.
    B, spatial = shape[0], shape[1] * shape[2] * (shape[3] if len(shape) == 4 else 1) // C
    nbytes = 4 if history_dtype is None else 2
    assert model.history_nbytes() == history_memory_bytes(B, C, spatial, 3, nbytes)
    assert model.predicted_history_nbytes(shape, torch.float32) == model.history_nbytes()


def test_history_buffer_ring_and_references():
    buf = HistoryBuffer(3, dtype="fp16")
    with torch.no_grad():
        xs = [torch.full((2, 4), float(i)) for i in range(5)]
        for x in xs:
            buf.push(x)
        assert len(buf) == 3 and buf._ring_mode
        assert [s[0, 0].item() for s in buf.states()] == [4.0, 3.0, 2.0]
        ring = buf._ring
        buf.clear()
        buf.push(xs[0])
        assert buf._ring is ring  # pre-allocated memory reused
        assert buf.allocated_nbytes == 3 * 8 * 2
    buf.release()
    assert buf.allocated_nbytes == 0
    x = torch.randn(2, 4, requires_grad=True)
    buf.push(x)
    assert not buf._ring_mode and buf.states()[0].requires_grad  # autograd: references, no ring
    with pytest.raises(ValueError, match="shape"):
        buf.push(torch.randn(3, 4))
    with pytest.raises(ValueError, match="max_history"):
        HistoryBuffer(0)
    with pytest.raises(TypeError, match="history_dtype"):
        HistoryBuffer(2, dtype="int8")


def test_clear_history_frees_the_buffer():
    model = MHCSequential(*_mlp_blocks(8, 3), max_history=2)
    with torch.no_grad():
        model(torch.randn(4, 8))
    assert model.history.allocated_nbytes == 2 * 4 * 8 * 4
    model.clear_history()
    assert model.history.allocated_nbytes == 0 and len(model.history) == 0
    clear_history(nn.Sequential(model))  # the module-level helper reaches nested ones


@pytest.mark.parametrize("constraint", ["simplex", "softmax", "identity", "doubly_stochastic"])
def test_freeze_gives_the_same_outputs(constraint):
    model = MHCSequential(*_mlp_blocks(8, 6), max_history=4, constraint=constraint, use_gating=True).eval()
    _randomise_skips(model, 2.0)
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
        frozen = freeze_mhc(copy.deepcopy(model))
        got = frozen(x)
    assert not any(isinstance(m, (MHCSkip, MatrixMHCSkip)) for m in frozen.modules())
    assert sum(p.numel() for m in frozen.modules() if isinstance(m, WeightedSum) for p in m.parameters()) == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_weighted_sum_one_hot_is_a_residual_add():
    ws = WeightedSum(torch.tensor([0.0, 1.0, 0.0]))
    x = torch.randn(2, 5)
    states = [torch.randn(2, 5), torch.randn(2, 5), torch.full((2, 5), float("nan"))]
    assert torch.equal(ws(x, states), x + states[1])


def test_matrix_skip_is_doubly_stochastic_and_remixes_history():
    skip = MatrixMHCSkip(max_history=4, init_diagonal=0.0)
    with torch.no_grad():
        skip.logits.normal_()
    m = skip.matrix()
    torch.testing.assert_close(m.sum(0), torch.ones(4), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.sum(1), torch.ones(4), rtol=1e-3, atol=1e-3)
    buf = HistoryBuffer(4)
    states = [torch.randn(3, 2) for _ in range(4)]
    for s in reversed(states):
        buf.push(s)
    x = torch.randn(3, 2)
    out = skip(x, buf)
    mixed = torch.einsum("rk,kbc->rbc", m, torch.stack(states))
    torch.testing.assert_close(out, x + mixed[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(buf.states()), mixed, rtol=1e-5, atol=1e-5)
    # Doubly stochastic: the remix keeps the history's total.
    torch.testing.assert_close(mixed.sum(0), torch.stack(states).sum(0), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("block", [MHCConv2d, MHCBasicBlock, MHCBottleneck])
def test_conv_blocks(block):
    model = MHCSequential(*[block(8, max_history=3) for _ in range(4)])
    _randomise_skips(model)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    out = model(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "skip" in n and "logits" in n)
    single = block(8)
    assert single(x).shape == x.shape  # on its own: a residual block


def test_inject_mhc():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                          nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(4)]),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    weight = model[1][2][0].weight.detach().clone()
    x = torch.randn(2, 3, 8, 8)
    replaced = inject_mhc(model, x, max_history=3)
    assert replaced == ["1"]
    assert isinstance(model[1], MHCSequential) and len(model[1].blocks) == 4
    assert torch.equal(model[1].blocks[2][0].weight, weight)
    model(x).sum().backward()
    assert model[1].skips[3].logits.grad is not None


def test_presets_and_config_validation():
    for name, cfg in PRESETS.items():
        model = MHCSequential(*_mlp_blocks(4, 3), config=cfg)
        assert model(torch.randn(2, 4)).shape == (2, 4), name
    assert MHCSkipConfig.preset("dense", max_history=6).max_history == 6
    with pytest.raises(ValueError, match="preset"):
        MHCSkipConfig.preset("nope")
    with pytest.raises(ValueError, match="max_history"):
        MHCSkipConfig(max_history=0)
    with pytest.raises(ValueError, match="constraint"):
        MHCSkip(constraint="doubly_stochastic")
    with pytest.raises(ValueError, match="changed the shape"):
        MHCSequential(nn.Linear(4, 4), nn.Linear(4, 2))(torch.randn(1, 4))
    assert MHCSequential(nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(2, 2), allow_shape_change=True)(
        torch.randn(1, 4)).shape == (1, 2)
    assert history_memory_bytes(8, 64, 32 * 32, 4, "fp16") == 8 * 64 * 1024 * 4 * 2


def test_autocast_cpu_bf16():
    model = MHCSequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(4)], max_history=3)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(s.logits.grad is not None for s in model.skips)


def test_torch_compile_fullgraph_matches_eager():
    model = MHCSequential(*_mlp_blocks(8, 5), max_history=3, use_gating=True)
    _randomise_skips(model)
    x = torch.randn(4, 8)
    eager = model(x)
    eager.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


_COMPILE_FIRST = """
import torch
from torch import nn
from mhc.history import MHCBasicBlock, MHCSequential, freeze_mhc

def mlp(depth, **kwargs):
    return MHCSequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(depth)], max_history=3, **kwargs)

models = [(mlp(3), torch.randn(4, 8)), (mlp(3, constraint="doubly_stochastic"), torch.randn(4, 8)),
          (freeze_mhc(mlp(3)), torch.randn(4, 8)),
          (MHCSequential(*[MHCBasicBlock(4, max_history=3) for _ in range(2)]), torch.randn(2, 4, 4, 4))]
for model, x in models:  # compiled before any eager call of the process
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    out.sum().backward()
    torch.testing.assert_close(out, model(x))
print("compiled", len(models))
"""


def test_torch_compile_fullgraph_as_the_first_call():
    # A fresh process whose first call of the history modules is compiled: the ONNX-export check in their forward
    # must trace without a graph break (torch 2.11's dynamo refuses the exporter's internal flags).
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FIRST], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled 4" in proc.stdout


@requires_cuda
@pytest.mark.parametrize("history_dtype", [None, torch.bfloat16])
def test_cuda_sequential_matches_cpu(history_dtype):
    model = MHCSequential(*[MHCBasicBlock(16, max_history=4) for _ in range(5)], history_dtype=history_dtype)
    _randomise_skips(model)
    x = torch.randn(2, 16, 8, 8)
    want = model(x)
    cuda_model = copy.deepcopy(model).cuda()
    got = cuda_model(x.cuda())
    tol = dict(rtol=1e-4, atol=1e-4) if history_dtype is None else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got.cpu(), want, **tol)
    got.sum().backward()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert cuda_model(x.cuda()).dtype == torch.bfloat16


# ---- what a new user hits: clear_history on their own model, valid input rejected, invalid input accepted ----


class _SeedModel(HistoryMixin, nn.Module):
    """The usual `model = MyMHCModel(); model.clear_history()`: a user model with a history inside."""

    def __init__(self):
        super().__init__()
        self.body = MHCSequential(*_mlp_blocks(8, 3), max_history=2)
        self.head = nn.Linear(8, 2)
        self.cache = HistoryBuffer(2)  # a buffer the model keeps itself

    def forward(self, x):
        self.cache.push(x)
        return self.head(self.body(x))


def test_user_model_clear_history_frees_every_buffer():
    model = _SeedModel()
    with torch.no_grad():
        model(torch.randn(4, 8))
    assert model.body.history.allocated_nbytes > 0 and model.cache.allocated_nbytes > 0
    model.clear_history()
    assert model.body.history.allocated_nbytes == 0 and model.cache.allocated_nbytes == 0
    assert len(model.cache) == 0
    copy.deepcopy(model).clear_history()  # a plain method: copies and pickles like any module
    with pytest.raises(TypeError, match="model"):
        clear_history("model")


def test_zero_size_and_meta_inputs_run():
    model = MHCSequential(*_mlp_blocks(8, 3), max_history=3, constraint="softmax")
    out = model(torch.randn(2, 0, 8, requires_grad=True))
    assert out.shape == (2, 0, 8)
    out.sum().backward()
    with torch.no_grad():
        assert model(torch.randn(0, 8)).shape == (0, 8)
    with torch.device("meta"):
        meta_model = MHCSequential(*_mlp_blocks(8, 3), max_history=3)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            got = meta_model(torch.randn(4, 8, device="meta"))
        assert got.is_meta and got.shape == (4, 8)
    matrix = MHCSequential(*_mlp_blocks(8, 2), config=MHCSkipConfig.preset("matrix")).to("meta")
    assert matrix(torch.randn(3, 8, device="meta")).is_meta


def test_invalid_module_arguments_raise_naming_them():
    x = torch.randn(2, 5)
    cases = [
        (ValueError, "max_history", lambda: MatrixMHCSkip(max_history=0)),
        (ValueError, "max_history", lambda: MatrixMHCSkip(max_history=65)),
        (TypeError, "max_history", lambda: MatrixMHCSkip(max_history=4.0)),
        (TypeError, "bogus", lambda: MatrixMHCSkip(bogus=1)),
        (ValueError, "temperature", lambda: MatrixMHCSkip(temperature=0.0)),
        (TypeError, "max_history", lambda: MHCSkipConfig(max_history=4.0)),
        (ValueError, "table", lambda: WeightedSum(torch.tensor([0.5, float("nan")]))),
        (ValueError, "table", lambda: WeightedSum(torch.ones(2, 3))),
        (TypeError, "table", lambda: WeightedSum(torch.tensor([1, 0]))),
        (ValueError, "history", lambda: WeightedSum(torch.tensor([0.5, 0.5]))(x, [x])),       # missing state
        (ValueError, "history", lambda: WeightedSum(torch.tensor([0.5, 0.5]))(x, [x, x, x])),  # extra state
        (TypeError, "history", lambda: MHCSkip()(x, 5)),
        (TypeError, "states\\[0\\]", lambda: MHCSkip()(x, [x.int()])),                          # int32 state
        (TypeError, "modules", lambda: MHCSequential(3)),
        (TypeError, "x", lambda: MHCSequential(nn.Identity())([1.0])),
        (TypeError, "x", lambda: HistoryBuffer(2).push([1.0])),
    ]
    for error, name, call in cases:
        with pytest.raises(error, match=name):
            call()
    frozen = MHCSkip(max_history=3).freeze()  # a [H, H] table: fewer states use their own row, more the newest H
    states = [torch.randn(2, 5) for _ in range(4)]
    torch.testing.assert_close(frozen(x, states), frozen(x, states[:3]))


# ---- found by a review of the modules as a new user meets them ---------------------------------------------


def _linear_sequential(depth=3, width=8, **kwargs):
    return MHCSequential(*[nn.Linear(width, width) for _ in range(depth)], **kwargs)


def test_no_grad_after_inference_mode_reuses_no_inference_ring():
    # A ring made under inference_mode is an inference tensor; a later no_grad call must not write into it.
    torch.manual_seed(0)
    model = _linear_sequential(max_history=3)
    _randomise_skips(model)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        first = model(x)
    with torch.no_grad():
        again = model(x)
    with torch.inference_mode():
        third = model(x)
    assert torch.equal(first, again) and torch.equal(first, third)


@pytest.mark.parametrize("grad", [False, True])
def test_concurrent_calls_from_threads_give_each_its_own_history(grad):
    # One module called from two threads (an inference server): each call runs on a buffer of its own.
    import threading

    torch.manual_seed(0)
    width = 128
    model = _linear_sequential(6, width, max_history=4, constraint="softmax").eval()
    xs = [torch.randn(32, width) for _ in range(2)]
    with torch.set_grad_enabled(grad):
        want = [model(x).detach().clone() for x in xs]
    wrong = [0, 0]
    errors = []

    def worker(i):
        try:
            with torch.set_grad_enabled(grad):
                for _ in range(60):
                    wrong[i] += not torch.equal(model(xs[i]).detach(), want[i])
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and wrong == [0, 0]


def test_max_history_beside_a_config_overrides_it():
    cfg = MHCSkipConfig.preset("stable")  # max_history 4
    model = MHCSequential(nn.Linear(8, 8), nn.Linear(8, 8), config=cfg, max_history=2)
    assert model.max_history == 2 and all(s.max_history == 2 for s in model.skips)
    assert model.skips[0].constraint == "identity"
    assert MHCSequential(nn.Linear(8, 8), config=cfg).max_history == 4
    assert MHCSequential(nn.Linear(8, 8)).max_history == 4


def test_parametrized_skip_logits():
    # A parametrization moves the logits out of _parameters; the skip must read them through the module.
    import torch.nn.utils.parametrize as parametrize

    class Double(nn.Module):
        def forward(self, t):
            return 2 * t

    torch.manual_seed(0)
    skip = MHCSkip(3)
    plain = copy.deepcopy(skip)
    with torch.no_grad():
        plain.logits.mul_(2)
    parametrize.register_parametrization(skip, "logits", Double())
    x, states = torch.randn(4, 8), torch.randn(3, 4, 8)
    assert torch.equal(skip(x, states), plain(x, states))


def test_bad_hyper_parameters_fail_at_construction():
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        MHCSkipConfig(sinkhorn_iters=0)
    with pytest.raises(ValueError, match="gate_init"):
        MHCSkipConfig(gate_init=float("nan"))
    with pytest.raises(TypeError, match="max_history"):
        HistoryBuffer(2.5)
