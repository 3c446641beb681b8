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
    rewire = mhc.MHCRewire(linear, dims, n)
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


def test_auto_io_picks_streams_by_shape():
    n, dims = 4, 8
    rewire = mhc.MHCRewire(nn.Linear(dims, dims), dims, n)
    assert rewire(torch.randn(3, n, dims)).shape == (3, n, dims)     # streams
    assert rewire(torch.randn(3, 5, dims)).shape == (3, 5, dims)     # plain ([B, S, dims], S != n)
    plain = mhc.MHCRewire(nn.Linear(dims, dims), dims, n, io="plain")
    assert plain(torch.randn(3, n, dims)).shape == (3, n, dims)      # S == n, forced plain
    with pytest.raises(ValueError, match="x"):
        mhc.MHCRewire(nn.Linear(dims, dims), dims, n, io="streams")(torch.randn(3, 5, dims))


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
    rewire = mhc.MHCRewire(quantized, dims, n)
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
    rewire = mhc.MHCRewire(layer, dims, n)
    _randomise(rewire.mhc, seed=13)
    x = torch.randn(4, n, dims, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rewire, (x,), eps=1e-6, atol=1e-7)
    want, _ = _reference_site(rewire.mhc, x, layer)
    torch.testing.assert_close(rewire(x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_static_plain_linear_is_exact(dtype, tol, bias):
    torch.manual_seed(9)
    dims, n = 13, 4
    rewire = mhc.MHCRewire(nn.Linear(dims, dims, bias=bias).to(dtype), dims, n, io="plain", static=True)
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
    report = mhc.AutoPatcher.patch(model, n_streams=4)
    assert report.patched == ["mix", "blocks.0", "blocks.1", "quant", "weight_only"]
    assert report.widths == [32, 32, 32, 16, 16] and len(report) == 5
    assert report.layer_types[-2:] == ["Linear", "Int8WeightOnlyLinear"]
    assert report.added_parameters == sum(p.numel() for m in model.modules() if isinstance(m, mhc.MHC)
                                          for p in m.parameters())
    assert "blocks.1" in str(report)
    for name, original in originals.items():
        wrapper = model.get_submodule(name)
        assert isinstance(wrapper, mhc.MHCRewire) and wrapper.module is original and wrapper.io == "plain"
    out = model(x)
    assert out.shape == before.shape and not torch.allclose(out, before)  # a residual path was added
    with warnings.catch_warnings():  # torch.ao's quantised Linear has no autograd formula
        warnings.simplefilter("ignore")
        out.square().sum().backward()
    assert all(m.mhc.fn.grad is not None for m in model.modules() if isinstance(m, mhc.MHCRewire))
    # patching again wraps nothing new (no MHCRewire in MHCRewire)
    assert len(mhc.AutoPatcher.patch(model, 4)) == 0
    assert mhc.AutoPatcher.unpatch(model) == ["mix", "blocks.0", "blocks.1", "quant", "weight_only"]
    for name, original in originals.items():
        assert model.get_submodule(name) is original
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_autopatcher_select():
    model = _TinyNet()
    assert mhc.AutoPatcher.patch(model, 2, select=r"^blocks\.").patched == ["blocks.0", "blocks.1"]
    mhc.AutoPatcher.unpatch(model)
    chosen = mhc.AutoPatcher.patch(model, 2, select=lambda name, m: isinstance(m, nn.Linear) and m.bias is None)
    assert chosen.patched == ["blocks.0"]
    mhc.AutoPatcher.unpatch(model)
    static = mhc.AutoPatcher.patch(model, 8, select="mix", static=True, alpha_init=0.02)
    site = model.mix.mhc
    assert static.patched == ["mix"] and site.static and site.n == 8 and site.fn is None


def test_autopatcher_fold_for_deployment():
    torch.manual_seed(14)
    model = _TinyNet()
    mhc.AutoPatcher.patch(model, 4, select=r"^blocks\.", static=True)
    mhc.AutoPatcher.patch(model, 4, select="mix")  # dynamic: stays
    for site in (m for m in model.modules() if isinstance(m, mhc.MHC)):
        with torch.no_grad():
            site.base.normal_()
    x = torch.randn(6, 16)
    with torch.no_grad():
        before = model(x)
    assert mhc.AutoPatcher.fold(model) == ["blocks.0", "blocks.1"]
    assert type(model.blocks[0]) is nn.Linear and model.blocks[0].bias is None
    assert isinstance(model.mix, mhc.MHCRewire)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=2e-5, atol=2e-5)
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
    with pytest.raises(TypeError, match="model"):
        mhc.AutoPatcher.unpatch(None)
    assert not any(isinstance(m, mhc.MHCRewire) for m in model.modules())  # nothing half-patched
