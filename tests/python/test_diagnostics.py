"""mhc.diagnostics: Amax gain magnitude against hand-computed and brute-force values, doubly stochastic vs
unconstrained mixing, reductions and broadcasting; CombRecorder on models of mhc.MHC sites (pre/post and
post_pre), hooks removed afterwards; bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mhc
from mhc import reference
from mhc.diagnostics import AmaxGain, CombRecorder, amax_gain


def test_hand_computed_two_layers():
    comb1 = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    comb2 = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    # H_res = comb^T; composite P = H2 H1 = (comb1 comb2)^T = [[6, -3], [1, 0.5]]
    # rows: |6| + |-3| = 9, |1| + |0.5| = 1.5 -> forward 9; columns: 7, 3.5 -> backward 7
    gain = amax_gain([comb1, comb2])
    assert isinstance(gain, AmaxGain) and gain.forward.dtype == torch.float64
    assert gain.forward.item() == 9.0 and gain.backward.item() == 7.0
    # after layer 1 alone: P = comb1^T = [[1, 0.5], [2, -1]]: rows 1.5, 3; columns 3, 1.5
    curve = amax_gain([comb1, comb2], cumulative=True)
    assert curve.forward.tolist() == [3.0, 9.0] and curve.backward.tolist() == [3.0, 7.0]


@pytest.mark.parametrize("n, layers, tokens", [(4, 6, 5), (3, 1, 2), (7, 4, 1)])
def test_matches_brute_force(n, layers, tokens):
    torch.manual_seed(n * 10 + layers)
    combs = [torch.randn(tokens, n, n) for _ in range(layers)]
    gain = amax_gain(combs, reduce="none", cumulative=True)
    assert gain.forward.shape == (layers, tokens)
    for t in range(tokens):
        composite = torch.eye(n, dtype=torch.float64)
        for layer, comb in enumerate(combs):
            composite = comb[t].double().T @ composite  # H_res(l) ... H_res(1)
            want_forward = composite.abs().sum(dim=1).max()
            want_backward = composite.abs().sum(dim=0).max()
            torch.testing.assert_close(gain.forward[layer, t], want_forward, rtol=1e-12, atol=0)
            torch.testing.assert_close(gain.backward[layer, t], want_backward, rtol=1e-12, atol=0)
    full = amax_gain(combs, reduce="none")
    torch.testing.assert_close(full.forward, gain.forward[-1])
    torch.testing.assert_close(amax_gain(combs).forward, gain.forward[-1].max())
    torch.testing.assert_close(amax_gain(combs, reduce="mean").backward, gain.backward[-1].mean())


def test_doubly_stochastic_stays_at_one_unconstrained_grows():
    torch.manual_seed(3)
    n, layers = 4, 30
    sinkhorn_combs = [reference.sinkhorn(torch.randn(8, n, n, dtype=torch.float64), iters=200, eps=0.0)
                      for _ in range(layers)]
    gain = amax_gain(sinkhorn_combs, cumulative=True)
    torch.testing.assert_close(gain.forward, torch.ones(layers, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gain.backward, torch.ones(layers, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # unconstrained HC drifting above the identity
    amplifying = [1.1 * torch.eye(n, dtype=torch.float64) for _ in range(layers)]
    grown = amax_gain(amplifying, cumulative=True)
    torch.testing.assert_close(grown.forward, 1.1 ** torch.arange(1, layers + 1, dtype=torch.float64))


def test_broadcasts_per_site_and_per_token():
    torch.manual_seed(4)
    static = torch.rand(3, 3)
    per_token = torch.rand(5, 3, 3)
    gain = amax_gain([static, per_token], reduce="none", cumulative=True)
    assert gain.forward.shape == (2, 5)
    torch.testing.assert_close(gain.forward[0], amax_gain([static]).forward.expand(5))


class _Block(nn.Module):
    def __init__(self, n, C):
        super().__init__()
        self.site, self.norm = mhc.MHC(n, C), nn.RMSNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))

    def forward(self, x):
        layer_input, state = self.site.pre(x)
        return self.site.post(x, self.mlp(self.norm(layer_input)), state)


class _FusedPair(nn.Module):
    """Two sites chained with post_pre (the fused path must be recorded too)."""

    def __init__(self, n, C):
        super().__init__()
        self.first, self.second = mhc.MHC(n, C), mhc.MHC(n, C)
        self.f1, self.f2 = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x):
        layer_input, state = self.first.pre(x)
        x, layer_input, state = self.first.post_pre(x, self.f1(layer_input), state, self.second)
        return self.second.post(x, self.f2(layer_input), state)


def _randomise(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for site in (m for m in model.modules() if isinstance(m, mhc.MHC)):
            site.base.copy_(torch.randn(site.base.shape, generator=g))
            site.scale.fill_(1.0)


def test_comb_recorder_collects_every_site_in_order():
    torch.manual_seed(5)
    n, C = 4, 12
    model = nn.Sequential(mhc.StreamExpand(n), _Block(n, C), _FusedPair(n, C), mhc.MHCLayer(n, C), mhc.MHCHead(n, C))
    _randomise(model)
    tokens = torch.randn(2, 3, C)
    with torch.no_grad():
        plain_out = model(tokens)
    sites = [m for m in model.modules() if isinstance(m, mhc.MHC)]
    with CombRecorder(model) as recorder:
        with torch.no_grad():
            recorded_out = model(tokens)
    torch.testing.assert_close(recorded_out, plain_out, rtol=0, atol=0)
    assert recorder.site_names == ["1.site", "2.first", "2.second", "3.mhc"]
    assert all(c.shape == (2, 3, n, n) and not c.requires_grad for c in recorder.combs)
    # each recorded comb is the one the site computed from its own input
    x = mhc.expand_streams(tokens, n)
    _, _, _, comb0 = reference.mhc_pre(x, sites[0].fn, sites[0].base, sites[0].scale)
    torch.testing.assert_close(recorder.combs[0], comb0, rtol=1e-5, atol=1e-6)
    gain = recorder.amax_gain(cumulative=True)
    torch.testing.assert_close(gain, amax_gain(recorder.combs, cumulative=True))
    assert gain.forward.shape == (4,) and (gain.forward - 1).abs().max() < 1e-3  # Sinkhorn: near 1
    for site in sites:  # hooks gone: the class methods are back
        assert "post" not in site.__dict__ and "post_pre" not in site.__dict__
    with torch.no_grad():
        model(tokens)
    assert len(recorder.combs) == 4
    recorder.clear()
    assert recorder.combs == [] and recorder.site_names == []


def test_comb_recorder_with_gradients_and_repeated_runs():
    n, C = 2, 8
    model = nn.Sequential(mhc.StreamExpand(n), _Block(n, C), _Block(n, C), mhc.MHCHead(n, C, mode="mean"))
    with CombRecorder(model) as recorder:
        model(torch.randn(4, C)).sum().backward()
        model(torch.randn(4, C))
    assert len(recorder.combs) == 4 and recorder.site_names == ["1.site", "2.site"] * 2
    assert model[1].site.fn.grad is not None


def test_bad_input():
    comb = torch.eye(3)
    with pytest.raises(ValueError, match="combs"):
        amax_gain([])
    with pytest.raises(TypeError, match="combs"):
        amax_gain(comb)
    with pytest.raises(TypeError, match=r"combs\[1\]"):
        amax_gain([comb, "x"])
    with pytest.raises(ValueError, match=r"combs\[0\]"):
        amax_gain([torch.ones(3, 4)])
    with pytest.raises(ValueError, match=r"combs\[0\]"):
        amax_gain([torch.ones(3)])
    with pytest.raises(ValueError, match=r"combs\[1\]"):
        amax_gain([comb, torch.eye(4)])
    with pytest.raises(TypeError, match=r"combs\[0\]"):
        amax_gain([torch.eye(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="reduce"):
        amax_gain([comb], reduce="sum")
    with pytest.raises(TypeError, match="model"):
        CombRecorder("model")
    with pytest.raises(ValueError, match="model"):
        CombRecorder(nn.Linear(3, 3))
    recorder = CombRecorder(mhc.MHCLayer(2, 4))
    with pytest.raises(ValueError, match="nothing recorded"):
        recorder.amax_gain()
    with recorder:
        with pytest.raises(RuntimeError, match="already recording"):
            recorder.__enter__()
