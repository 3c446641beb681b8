"""MHCRewire and AutoPatcher: stream and plain modes against a plain-PyTorch re-implementation (fp64), the
gated-residual identity of plain mode, initialisation near x + F(x), gradients, quantised Linear layers,
exact folding of a static site into one nn.Linear, patch/unpatch, bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import mhc
from mhc import reference
from mhc.rewire import is_square_linear


def _randomise(site: mhc.MHC, seed: int = 0) -> None:
    """Parameters away from the initialisation, so every coefficient path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        site.base.copy_(torch.randn(site.base.shape, generator=g))
        if site.fn is not None:
            site.fn.copy_(torch.randn(site.fn.shape, generator=g) / site.fn.shape[1] ** 0.5)
            site.scale.copy_(torch.rand(3, generator=g) + 0.5)


def _reference_site(site: mhc.MHC, x, F):
    """pre -> F -> post with mhc.reference (plain PyTorch)."""
    layer_input, h_pre, h_post, comb = reference.mhc_pre(x, site.fn, site.base, site.scale, **site._hyper())
    return reference.mhc_post(x, F(layer_input), h_post, comb), (h_pre, h_post, comb)


def _dynamic_quantized(linear: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)[0]


@pytest.mark.parametrize("n, dims, lead", [(4, 16, (2, 5)), (3, 7, (9,)), (1, 5, (3,)), (8, 12, (1, 2, 3))])
def test_stream_mode_matches_reference(n, dims, lead):
    torch.manual_seed(1)
    linear = nn.Linear(dims, dims).double()
    rewire = mhc.MHCRewire(linear, dims, n, io="streams")
    _randomise(rewire.mhc)
    x = torch.randn(*lead, n, dims, dtype=torch.float64)
    got = rewire(x)
    want, _ = _reference_site(rewire.mhc, x, linear)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n, dims, lead", [(4, 16, (2, 5)), (3, 7, (9,)), (5, 10, ())])
def test_plain_mode_matches_reference_and_is_a_gated_residual(n, dims, lead):
    torch.manual_seed(2)
    F = nn.Sequential(nn.Linear(dims, 2 * dims), nn.Tanh(), nn.Linear(2 * dims, dims)).double()
    rewire = mhc.MHCRewire(F, dims, n, io="plain")
    _randomise(rewire.mhc, seed=3)
    x = torch.randn(*lead, dims, dtype=torch.float64)
    got = rewire(x)
    streams = x.unsqueeze(-2).expand(*x.shape[:-1], n, dims)
    want, (h_pre, h_post, comb) = _reference_site(rewire.mhc, streams, F)
    torch.testing.assert_close(got, want.mean(dim=-2), rtol=1e-10, atol=1e-10)
    # the documented identity: identical streams in, mean out
    gated = (h_post.mean(-1, keepdim=True) * F(h_pre.sum(-1, keepdim=True) * x)
             + comb.sum((-2, -1)).unsqueeze(-1) / n * x)
    torch.testing.assert_close(got, gated, rtol=1e-10, atol=1e-10)


def test_io_is_fixed_at_construction_plain_by_default():
    """A plain [B, S, dims] input with S == n used to be read as streams (tokens mixed across positions)."""
    torch.manual_seed(3)
    n, dims = 4, 8
    linear = nn.Linear(dims, dims)
    default = mhc.MHCRewire(linear, dims, n)
    plain = copy.deepcopy(default)
    plain.io = "plain"
    streams = mhc.MHCRewire(linear, dims, n, io="streams")
    streams.mhc.load_state_dict(default.mhc.state_dict())
    for S in (n - 1, n, n + 1):
        x = torch.randn(3, S, dims)
        with torch.no_grad():
            torch.testing.assert_close(default(x), plain(x), rtol=0, atol=0)
            per_token = torch.stack([default(x[:, s]) for s in range(S)], dim=1)  # tokens are independent
            torch.testing.assert_close(default(x), per_token, rtol=1e-6, atol=1e-6)
    x = torch.randn(3, n, dims)
    with torch.no_grad():
        assert (streams(x) - default(x)).abs().max() > 0.1  # S == n as streams means something else
    assert default.io == "plain" and default.residual
    with pytest.raises(ValueError, match="io.*auto"):
        mhc.MHCRewire(linear, dims, n, io="auto")
    with pytest.raises(ValueError, match="x"):
        streams(torch.randn(3, 5, dims))
    with pytest.raises(ValueError, match="residual"):
        mhc.MHCRewire(linear, dims, n, io="streams", residual=False)


@pytest.mark.parametrize("n, dims, lead", [(4, 16, (2, 5)), (3, 7, (9,)), (1, 5, ())])
def test_plain_mode_without_residual_gates_the_module(n, dims, lead):
    torch.manual_seed(6)
    F = nn.Sequential(nn.Linear(dims, 2 * dims), nn.Tanh(), nn.Linear(2 * dims, dims)).double()
    rewire = mhc.MHCRewire(F, dims, n, residual=False)
    x = torch.randn(*lead, dims, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        fresh = rewire(x)
    assert (fresh - F(x)).norm() / F(x).norm() < 0.02  # starts as F(x), not x + F(x)
    _randomise(rewire.mhc, seed=7)
    streams = x.unsqueeze(-2).expand(*x.shape[:-1], n, dims)
    _, h_pre, h_post, _ = reference.mhc_pre(streams, rewire.mhc.fn, rewire.mhc.base, rewire.mhc.scale,
                                            **rewire.mhc._hyper())
    want = h_post.mean(-1, keepdim=True) * F(h_pre.sum(-1, keepdim=True) * x)
    torch.testing.assert_close(rewire(x), want, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(rewire, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_plain_mode_starts_as_residual(n):
    torch.manual_seed(4)
    dims = 32
    linear = nn.Linear(dims, dims)
    rewire = mhc.MHCRewire(linear, dims, n, io="plain")
    x = torch.randn(10, dims)
    with torch.no_grad():
        want = x + linear(x)
        got = rewire(x)
    assert (got - want).norm() / want.norm() < 0.02


def test_gradients_fp64_gradcheck_and_against_torch_impl():
    torch.manual_seed(5)
    n, dims = 3, 5
    fused = mhc.MHCRewire(nn.Linear(dims, dims).double(), dims, n, io="plain")
    _randomise(fused.mhc, seed=6)
    plain_torch = copy.deepcopy(fused)
    plain_torch.mhc.impl = "torch"
    x = torch.randn(4, dims, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused, (x,), eps=1e-6, atol=1e-7)
    fused(x).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in fused.named_parameters()}
    grad_x = x.grad.clone()
    x.grad = None
    plain_torch(x).square().sum().backward()
    torch.testing.assert_close(x.grad, grad_x, rtol=1e-9, atol=1e-9)
    for name, p in plain_torch.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-9, atol=1e-9, msg=name)
        assert grads[name].abs().sum() > 0, name


def test_wraps_dynamic_quantized_linear():
    torch.manual_seed(7)
    dims, n = 16, 4
    quantized = _dynamic_quantized(nn.Linear(dims, dims))
    assert is_square_linear(quantized) and not isinstance(quantized, nn.Linear)
    rewire = mhc.MHCRewire(quantized, dims, n, io="streams")
    _randomise(rewire.mhc, seed=8)
    x = torch.randn(6, n, dims, requires_grad=True)
    got = rewire(x)
    with torch.no_grad():
        want, _ = _reference_site(rewire.mhc, x, quantized)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # torch.ao's quantised Linear has no autograd formula: its output acts as a constant, the site still learns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got.square().sum().backward()
    grads = (x.grad.clone(), rewire.mhc.fn.grad.clone(), rewire.mhc.base.grad.clone())
    x_ref = x.detach().clone().requires_grad_()
    site_ref = copy.deepcopy(rewire.mhc)
    want, _ = _reference_site(site_ref, x_ref, lambda h: quantized(h.detach()))
    want.square().sum().backward()
    for got_grad, want_grad in zip(grads, (x_ref.grad, site_ref.fn.grad, site_ref.base.grad)):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)
        assert got_grad.abs().sum() > 0
    with pytest.raises(TypeError, match="module"):
        mhc.MHCRewire(quantized, dims, n, io="plain", static=True).fold()


class Int8WeightOnlyLinear(nn.Module):
    """A weight-only int8 linear of the kind other libraries ship (not an nn.Linear subclass)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(weight / scale).to(torch.int8))
        self.register_buffer("wscale", scale)
        self.bias = nn.Parameter(linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        return nn.functional.linear(x, self.qweight.to(x.dtype) * self.wscale.to(x.dtype), self.bias.to(x.dtype))


def test_wraps_weight_only_quantized_linear_with_gradients():
    torch.manual_seed(12)
    dims, n = 6, 3
    layer = Int8WeightOnlyLinear(nn.Linear(dims, dims))
    assert is_square_linear(layer)
    rewire = mhc.MHCRewire(layer, dims, n, io="streams")
    _randomise(rewire.mhc, seed=13)
    x = torch.randn(4, n, dims, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rewire, (x,), eps=1e-6, atol=1e-7)
    want, _ = _reference_site(rewire.mhc, x, layer)
    torch.testing.assert_close(rewire(x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_fold_static_plain_linear_is_exact(dtype, tol, bias, residual):
    torch.manual_seed(9)
    dims, n = 13, 4
    rewire = mhc.MHCRewire(nn.Linear(dims, dims, bias=bias).to(dtype), dims, n, io="plain", static=True,
                           residual=residual)
    _randomise(rewire.mhc, seed=10)
    folded = rewire.fold()
    assert type(folded) is nn.Linear and folded.weight.dtype == dtype and (folded.bias is not None) == bias
    x = torch.randn(7, 3, dims, dtype=dtype)
    with torch.no_grad():
        want = rewire(x)
        got = folded(x)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert (want - rewire.module(x)).abs().max() > 0.1  # the site is not a no-op


def test_fold_refuses_what_does_not_fold():
    dims = 8
    with pytest.raises(ValueError, match="dynamic"):
        mhc.MHCRewire(nn.Linear(dims, dims), dims, 4, io="plain").fold()
    with pytest.raises(ValueError, match="streams"):
        mhc.MHCRewire(nn.Linear(dims, dims), dims, 4, io="streams", static=True).fold()
    with pytest.raises(ValueError, match="norm"):
        mhc.MHCRewire(nn.Linear(dims, dims), dims, 4, io="plain", static=True, norm=nn.RMSNorm(dims)).fold()
    with pytest.raises(TypeError, match="module"):
        mhc.MHCRewire(nn.Sequential(nn.Linear(dims, dims)), dims, 4, io="plain", static=True).fold()
    with pytest.raises(ValueError, match="dynamic"):
        mhc.MHCRewire(nn.Linear(dims, dims), dims, 4).static_coefficients()
    quantized = mhc.MHCRewire(_dynamic_quantized(nn.Linear(dims, dims)), dims, 4, static=True)
    with pytest.raises(TypeError, match="torch.ao.nn.quantized.dynamic.*Linear is quantised.*re-quantising"):
        quantized.fold()


def test_rewire_bad_arguments():
    with pytest.raises(TypeError, match="module"):
        mhc.MHCRewire(lambda x: x, 8)
    with pytest.raises(ValueError, match="dims"):
        mhc.MHCRewire(nn.Linear(8, 8), 0)
    with pytest.raises(ValueError, match="dims"):
        mhc.MHCRewire(nn.Linear(8, 8), 8.0)
    with pytest.raises(ValueError, match="module"):
        mhc.MHCRewire(nn.Linear(8, 16), 8)
    with pytest.raises(ValueError, match="io"):
        mhc.MHCRewire(nn.Linear(8, 8), 8, io="both")
    with pytest.raises(ValueError, match="n"):
        mhc.MHCRewire(nn.Linear(8, 8), 8, n=65)
    rewire = mhc.MHCRewire(nn.Linear(8, 8), 8, 4)
    with pytest.raises(ValueError, match="x"):
        rewire(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x"):
        rewire([1.0] * 8)


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.mix = nn.Linear(32, 32)
        self.blocks = nn.ModuleList([nn.Linear(32, 32, bias=False), nn.Linear(32, 32)])
        self.down = nn.Linear(32, 16)
        self.quant = _dynamic_quantized(nn.Linear(16, 16))
        self.weight_only = Int8WeightOnlyLinear(nn.Linear(16, 16))

    def forward(self, x):
        h = torch.relu(self.up(x))
        h = self.mix(h)
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.weight_only(self.quant(self.down(h)))


def test_autopatcher_patch_and_unpatch():
    torch.manual_seed(11)
    model = _TinyNet()
    originals = {name: model.get_submodule(name) for name in ("mix", "blocks.0", "blocks.1", "quant", "weight_only")}
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = model(x)
    report = mhc.AutoPatcher.patch(model, n_streams=4, max_added_fraction=None)  # a tiny model: sites dominate
    assert report.patched == ["mix", "blocks.0", "blocks.1", "quant", "weight_only"]
    assert report.widths == [32, 32, 32, 16, 16] and len(report) == 5
    assert report.layer_types[-2:] == ["Linear", "Int8WeightOnlyLinear"]
    assert report.added_parameters == sum(p.numel() for m in model.modules() if isinstance(m, mhc.MHC)
                                          for p in m.parameters())
    assert report.model_parameters == sum(p.numel() for p in model.parameters()) - report.added_parameters + sum(
        b.numel() for b in model.buffers()) + 16 * 16  # torch.ao's packed weight counted by its shape
    assert "blocks.1" in str(report) and f"{report.added_fraction:.2%}" in str(report)
    for name, original in originals.items():
        wrapper = model.get_submodule(name)
        assert isinstance(wrapper, mhc.MHCRewire) and wrapper.module is original and wrapper.io == "plain"
        assert not wrapper.residual and wrapper.mhc.alpha_init == 0.0
    out = model(x)
    torch.testing.assert_close(out, before, rtol=1e-4, atol=1e-5)  # starts as the function it was
    with warnings.catch_warnings():  # torch.ao's quantised Linear has no autograd formula
        warnings.simplefilter("ignore")
        out.square().sum().backward()
    assert all(m.mhc.fn.grad is not None for m in model.modules() if isinstance(m, mhc.MHCRewire))
    # the per-token part starts switched off and learns (gradients stop at torch.ao's Linear: sites after it)
    assert all(model.get_submodule(name).mhc.scale.grad.abs().sum() > 0 for name in ("quant", "weight_only"))
    # patching again wraps nothing new (no MHCRewire in MHCRewire)
    assert len(mhc.AutoPatcher.patch(model, 4)) == 0
    assert mhc.AutoPatcher.unpatch(model) == ["mix", "blocks.0", "blocks.1", "quant", "weight_only"]
    for name, original in originals.items():
        assert model.get_submodule(name) is original
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_autopatcher_select():
    model = _TinyNet()
    unlimited = dict(max_added_fraction=None)
    assert mhc.AutoPatcher.patch(model, 2, select=r"^blocks\.", **unlimited).patched == ["blocks.0", "blocks.1"]
    mhc.AutoPatcher.unpatch(model)
    chosen = mhc.AutoPatcher.patch(model, 2, select=lambda name, m: isinstance(m, nn.Linear) and m.bias is None,
                                   **unlimited)
    assert chosen.patched == ["blocks.0"]
    mhc.AutoPatcher.unpatch(model)
    static = mhc.AutoPatcher.patch(model, 8, select="mix", static=True, alpha_init=0.02)
    site = model.mix.mhc
    assert static.patched == ["mix"] and site.static and site.n == 8 and site.fn is None


def test_autopatcher_fold_for_deployment():
    torch.manual_seed(14)
    model = _TinyNet()
    mhc.AutoPatcher.patch(model, 4, select=r"^blocks\.", static=True, residual=True)
    mhc.AutoPatcher.patch(model, 4, select="mix", max_added_fraction=None)  # dynamic: stays
    for site in (m for m in model.modules() if isinstance(m, mhc.MHC)):
        with torch.no_grad():
            site.base.normal_()
    x = torch.randn(6, 16)
    with torch.no_grad():
        before = model(x)
    with pytest.warns(UserWarning, match="1 site.* left unfolded: mix \\(the site is dynamic"):
        assert mhc.AutoPatcher.fold(model) == ["blocks.0", "blocks.1"]
    assert type(model.blocks[0]) is nn.Linear and model.blocks[0].bias is None
    assert isinstance(model.mix, mhc.MHCRewire)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=2e-5, atol=2e-5)
    with pytest.warns(UserWarning, match="mix"):
        assert mhc.AutoPatcher.fold(model) == []
    with pytest.raises(TypeError, match="model"):
        mhc.AutoPatcher.fold(3)


def test_autopatcher_bad_arguments():
    model = _TinyNet()
    with pytest.raises(TypeError, match="model"):
        mhc.AutoPatcher.patch("model", 4)
    with pytest.raises(ValueError, match="n_streams"):
        mhc.AutoPatcher.patch(model, 0)
    with pytest.raises(ValueError, match="n_streams"):
        mhc.AutoPatcher.patch(model, 65)
    with pytest.raises(TypeError, match="select"):
        mhc.AutoPatcher.patch(model, 4, select=3)
    with pytest.raises(ValueError, match="select"):
        mhc.AutoPatcher.patch(model, 4, select="(")
    with pytest.raises(ValueError, match="io"):
        mhc.AutoPatcher.patch(model, 4, io="streams")
    with pytest.raises(ValueError, match="max_added_fraction"):
        mhc.AutoPatcher.patch(model, 4, max_added_fraction=-1.0)
    with pytest.raises(ValueError, match="max_added_fraction: 5 site.*n_streams = 32"):
        mhc.AutoPatcher.patch(model, 32)
    with pytest.raises(TypeError, match="model"):
        mhc.AutoPatcher.unpatch(None)
    assert not any(isinstance(m, mhc.MHCRewire) for m in model.modules())  # nothing half-patched


def _tiny_llama(kv_heads: int):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(15)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                                      head_dim=12)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_autopatcher_keeps_the_function_of_a_llama(kv_heads):
    """AutoPatcher.patch(model, n_streams) with n_streams = 32 changed a small Llama's logits by 135%."""
    model = _tiny_llama(kv_heads)
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    report = mhc.AutoPatcher.patch(model, 4, max_added_fraction=None)
    square = ["q_proj", "o_proj"] + (["k_proj", "v_proj"] if kv_heads == 4 else [])
    assert sorted({name.rsplit(".", 1)[1] for name in report.patched}) == sorted(square)
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).norm() / before.norm() < 1e-3
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(m.mhc.scale.grad.abs().sum() > 0 for m in model.modules() if isinstance(m, mhc.MHCRewire))


def test_autopatcher_states_and_bounds_the_parameter_cost():
    model = _tiny_llama(2)
    own = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    with pytest.raises(ValueError, match="max_added_fraction"):
        mhc.AutoPatcher.patch(model, 4)  # 4 sites of width 48 would add 33% to this tiny model
    assert not any(isinstance(m, mhc.MHCRewire) for m in model.modules())  # nothing patched
    static = mhc.AutoPatcher.patch(model, 4, static=True)  # base only: 24 per site
    assert static.added_parameters == 4 * 24 and static.model_parameters == own
    assert static.added_fraction == pytest.approx(96 / own)
    mhc.AutoPatcher.unpatch(model)
    dynamic = mhc.AutoPatcher.patch(model, 4, max_added_fraction=0.5)
    assert dynamic.added_parameters == 4 * (24 * (4 * 48 + 1) + 3) == sum(
        p.numel() for m in model.modules() if isinstance(m, mhc.MHC) for p in m.parameters())


def test_a_layer_used_at_two_positions_is_patched_at_both():
    # named_modules() lists a shared layer once; every position gets the one wrapper, so the layer stays shared.
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    x = torch.randn(2, 8)
    want = model(x)
    report = mhc.AutoPatcher.patch(model, 2, static=True, max_added_fraction=None)
    assert report.patched == ["0", "2"] and model[0] is model[2] and isinstance(model[2], mhc.MHCRewire)
    assert report.added_parameters == sum(p.numel() for p in model[0].mhc.parameters())
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert mhc.AutoPatcher.fold(model) == ["0", "2"] and model[0] is model[2] and type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    mhc.AutoPatcher.patch(model, 2, max_added_fraction=None)
    assert mhc.AutoPatcher.unpatch(model) == ["0", "2"] and model[0] is model[2] and type(model[0]) is nn.Linear
