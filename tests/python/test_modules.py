"""Modules: initialisation near a plain residual network, fused vs plain-PyTorch implementations,
post_pre fusion, every use of a site a module call (hooks, PerformanceAudit), MHCLayer shapes, head,
state_dict round trip, autocast."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import mhc
from conftest import DEVICES, assert_close


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_init_starts_as_residual_network(n):
    """Embedding copied into n streams: layer_input ~ x and every stream of x_next ~ x + F(x)."""
    C = 32
    site = mhc.MHC(n, C)
    e = torch.randn(6, C)
    x = mhc.expand_streams(e, n)
    layer_input, state = site.pre(x)
    torch.testing.assert_close(layer_input, e, rtol=0.02, atol=0.02)
    y = torch.randn(6, C)
    x_next = site.post(x, y, state)
    torch.testing.assert_close(x_next, (e + y).unsqueeze(-2).expand_as(x), rtol=0.03, atol=0.03)
    if n > 1:  # comb near identity, but not saturated
        diag = state.comb.diagonal(dim1=-2, dim2=-1)
        assert ((diag > 0.9) & (diag < 0.99)).all()
    torch.testing.assert_close(state.h_post, torch.ones_like(state.h_post), rtol=0.02, atol=0.02)


def test_parameters_and_static_mode():
    n, C = 4, 16
    site = mhc.MHC(n, C)
    assert site.fn.shape == (n * n + 2 * n, n * C) and site.base.shape == (n * n + 2 * n,)
    assert site.scale.shape == (3,) and all(p.dtype == torch.float32 for p in site.parameters())
    assert torch.equal(site.scale.detach(), torch.full((3,), 0.01))
    static = mhc.MHC(n, C, static=True)
    assert static.fn is None and static.scale is None
    assert [name for name, _ in static.named_parameters()] == ["base"]
    x = torch.randn(3, n, C, requires_grad=True)
    layer_input, state = static.pre(x)
    static.post(x, layer_input, state).sum().backward()
    assert static.base.grad is not None and torch.isfinite(static.base.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("static", [False, True])
def test_fused_matches_torch_impl(device, static):
    """impl="fused" (mhc.ops) and impl="torch" (mhc.reference) agree in values and parameter gradients."""
    n, C = 4, 24
    fused = mhc.MHC(n, C, static=static).to(device)
    with torch.no_grad():  # move away from the symmetric initialisation
        for p in fused.parameters():
            p.add_(0.5 * torch.randn_like(p))
    plain = copy.deepcopy(fused)
    plain.impl = "torch"
    x = torch.randn(2, 5, n, C, device=device)
    y = torch.randn(2, 5, C, device=device)
    results = []
    for site in (fused, plain):
        xs = x.clone().requires_grad_()
        layer_input, state = site.pre(xs)
        out = site.post(xs, y * layer_input, state)
        out.square().sum().backward()
        results.append([out, xs.grad] + [p.grad for p in site.parameters()])
    for i, (a, b) in enumerate(zip(*results)):
        s = max(1.0, b.abs().max().item())
        assert_close(a / s, b / s, name=f"tensor {i}")


def test_post_pre_equals_post_then_pre():
    n, C = 3, 20
    first, second = mhc.MHC(n, C), mhc.MHC(n, C)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(4, n, C)
    y = torch.randn(4, C)
    _, state = first.pre(x)
    x_next, layer_input, next_state = first.post_pre(x, y, state, second)
    want_x = first.post(x, y, state)
    want_input, want_state = second.pre(want_x)
    assert_close(x_next, want_x)
    assert_close(layer_input, want_input)
    for got, want in zip(next_state, want_state):
        assert_close(got, want)


def test_every_use_of_a_site_is_a_module_call():
    """pre, post and post_pre go through nn.Module.__call__ (FSDP2 and profilers hook there); post_pre is a call of
    the site whose parameters it reads, and each equals the op it wraps."""
    n, C = 3, 8
    first, second = mhc.MHC(n, C), mhc.MHC(n, C)
    calls = []
    for name, site in (("first", first), ("second", second)):
        site.register_forward_pre_hook(lambda module, args, kwargs, name=name: calls.append(
            (name, len(args), kwargs.get("then_pre", False))), with_kwargs=True)
    x, y = torch.randn(2, 5, n, C), torch.randn(2, 5, C)
    layer_input, state = first.pre(x)
    x_next, next_input, next_state = first.post_pre(x, y, state, second)
    out = second.post(x_next, y, next_state)
    assert calls == [("first", 1, False), ("second", 3, True), ("second", 3, False)]
    want = mhc.ops.mhc_pre(x, first.fn, first.base, first.scale)
    assert torch.equal(layer_input, want[0]) and torch.equal(state.comb, want[3])
    want_x = mhc.ops.mhc_post(x, y, state.h_post, state.comb)
    assert torch.equal(x_next, want_x)
    assert torch.equal(next_input, mhc.ops.mhc_pre(want_x, second.fn, second.base, second.scale)[0])
    assert torch.equal(out, mhc.ops.mhc_post(x_next, y, next_state.h_post, next_state.comb))
    assert torch.equal(first(x)[0], layer_input) and torch.equal(first(x, y, state), want_x)


def test_site_call_needs_y_and_state_together():
    site = mhc.MHC(2, 4)
    x = torch.randn(3, 2, 4)
    _, state = site(x)
    with pytest.raises(ValueError, match="y and state: give both"):
        site(x, torch.randn(3, 4))
    with pytest.raises(ValueError, match="y and state: give both"):
        site(x, state=state)
    with pytest.raises(ValueError, match="then_pre=True needs y and state"):
        site(x, then_pre=True)


def test_performance_audit_times_n_stream_sites():
    """The audit hooks modules: each site's pre and post (2 calls) are timed and their bytes counted as mixing."""
    from mhc.profiling import PerformanceAudit

    n, C = 4, 16

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.expand, self.head = mhc.StreamExpand(n), mhc.MHCHead(n, C)
            self.sites = nn.ModuleList(mhc.MHC(n, C) for _ in range(2))
            self.blocks = nn.ModuleList(nn.Linear(C, C) for _ in range(2))

        def forward(self, e):
            x = self.expand(e)
            for site, block in zip(self.sites, self.blocks):
                layer_input, state = site.pre(x)
                x = site.post(x, block(layer_input), state)
            return self.head(x)

    audit = PerformanceAudit(Model(), training=True, repeats=1).run(input_size=(2, 8, C))
    records = {r.name: r for r in audit.layers}
    for name in ("sites.0", "sites.1"):
        site = records[name]
        assert site.kind == "mixing" and site.calls == 2 and site.time_s > 0, site
        assert site.output_bytes >= 2 * 8 * n * C * 4 and site.saved_bytes > 0, site
    assert records["head"].time_s > 0 and records["expand"].time_s > 0
    assert audit.mixing_time_s > 0 and "sites.0" in audit.report()


@pytest.mark.parametrize("shape", [(3, 4, 16), (2, 5, 4, 16)])
def test_mhc_layer_shapes_and_gradients(shape):
    layer = mhc.MHCLayer(4, 16)
    assert isinstance(layer.sublayer, nn.RMSNorm)
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad.shape == x.shape
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_mhc_layer_custom_sublayer():
    """y = F(layer_input) of the given sublayer: with F = 0 the layer is x -> comb-mixed x."""
    n, C = 4, 8
    zero = nn.Linear(C, C)
    nn.init.zeros_(zero.weight)
    nn.init.zeros_(zero.bias)
    layer = mhc.MHCLayer(n, C, sublayer=zero)
    x = torch.randn(2, n, C)
    _, state = layer.mhc.pre(x)
    assert_close(layer(x), mhc.reference.mhc_post(x, torch.zeros(2, C), state.h_post, state.comb))


def test_stream_expand_and_head():
    n, C = 4, 12
    e = torch.randn(2, 3, C, requires_grad=True)
    x = mhc.StreamExpand(n)(e)
    assert x.shape == (2, 3, n, C) and torch.equal(x, e.unsqueeze(-2).expand(2, 3, n, C))
    x.sum().backward()
    assert torch.equal(e.grad, torch.full_like(e, n))
    streams = torch.randn(2, 3, n, C)
    head = mhc.MHCHead(n, C)
    assert_close(head(streams), streams.mean(-2), dtype=torch.bfloat16)  # w ~ 1/n at init
    assert_close(mhc.MHCHead(n, C, mode="mean")(streams), streams.mean(-2))
    assert list(dict(mhc.MHCHead(n, C, mode="mean").named_parameters())) == []


def test_state_dict_round_trip():
    """Saved and reloaded into a differently initialised model: identical outputs."""
    def build(seed):
        torch.manual_seed(seed)
        return nn.Sequential(mhc.StreamExpand(4), mhc.MHCLayer(4, 16), mhc.MHCLayer(4, 16, static=True),
                             mhc.MHCHead(4, 16))
    model, other = build(0), build(1)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    x = torch.randn(3, 16)
    assert not torch.equal(model(x), other(x))
    other.load_state_dict(torch.load(buffer))
    assert torch.equal(model(x), other(x))
    assert set(model.state_dict()) == {"1.mhc.fn", "1.mhc.base", "1.mhc.scale", "1.sublayer.weight", "2.mhc.base",
                                       "2.sublayer.weight", "3.fn", "3.base", "3.scale"}


class Block(nn.Module):
    """One pre-norm MLP sub-layer of a transformer between two mHC sites."""

    def __init__(self, n, C):
        super().__init__()
        self.site = mhc.MHC(n, C)
        self.norm = nn.RMSNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))

    def forward(self, x):
        layer_input, state = self.site.pre(x)
        return self.site.post(x, self.mlp(self.norm(layer_input)), state)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    """Under autocast the Linear layers produce bf16 y while the residual stays fp32: the ops cast, no error."""
    n, C = 4, 32
    model = nn.Sequential(mhc.StreamExpand(n), Block(n, C), Block(n, C), mhc.MHCHead(n, C)).to(device)
    x = torch.randn(2, 7, C, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.float32  # the residual's dtype
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    with torch.no_grad():  # and it is close to the fp32 result
        assert_close(out.detach(), model(x), dtype=torch.bfloat16)


def test_deepcopy_and_repr():
    layer = mhc.MHCLayer(4, 8)
    clone = copy.deepcopy(layer)
    x = torch.randn(2, 4, 8)
    assert torch.equal(layer(x), clone(x))
    assert "n=4" in repr(layer) and "impl='fused'" in repr(layer)


def test_x_of_another_width_is_named():
    # The op alone would name the parameter that disagrees with x (fn, or base for a static site).
    for static in (False, True):
        site = mhc.MHC(3, 8, static=static)
        with pytest.raises(ValueError, match=r"mhc.MHC: x: expected \[\.\.\., n, C\] = \[\.\.\., 3, 8\]"):
            site.pre(torch.randn(2, 4, 8))
        layer_input, state = site.pre(torch.randn(2, 3, 8))
        with pytest.raises(ValueError, match="x: expected"):
            site.post_pre(torch.randn(2, 4, 8), layer_input, state, site)


def test_bad_hyper_parameters_fail_at_construction():
    with pytest.raises(ValueError, match="mhc.MHC: iters"):
        mhc.MHC(2, 4, iters=0)
    with pytest.raises(ValueError, match="mhc.MHC: eps"):
        mhc.MHC(2, 4, eps=-1.0)
    with pytest.raises(TypeError, match="mhc.MHC: iters"):
        mhc.MHC(2, 4, iters=2.5)


def test_parametrized_fn():
    # weight_norm moves fn out of _parameters; the site must read it through the module.
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    site = mhc.MHC(3, 8)
    plain = copy.deepcopy(site)
    weight_norm(site, "fn")
    x = torch.randn(2, 3, 8)
    assert_close(site.pre(x)[0], plain.pre(x)[0])
    site.pre(x)[0].sum().backward()
    assert site.parametrizations.fn.original0.grad is not None
