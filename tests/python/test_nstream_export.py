"""ONNX export of the n-stream modules (StreamExpand, MHC sites with pre / post / post_pre, MHCLayer, MHCHead,
MHCRewire) and of a small mHC transformer, through the decompositions in mhc.decompositions, compared with
onnxruntime in fp32; the decompositions themselves against the custom ops; and the TorchScript exporter's
clear refusal."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mhc
from mhc.decompositions import DECOMPOSITIONS
from mhc.export import check_onnx, export_onnx, has_dynamo_exporter

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
needs_dynamo = pytest.mark.skipif(not has_dynamo_exporter(), reason="the torch.export-based exporter needs onnxscript")

TOL = 1e-5  # fp32, relative to the output's largest magnitude: onnxruntime against the fused CPU ops


def _tolerance(model: nn.Module, inputs) -> float:
    with torch.no_grad():
        return TOL * max(1.0, float(model(inputs).abs().max()))


def _perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    # Away from the near-identity initialisation, so every coefficient and Sinkhorn iteration matters.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return module.eval()


class SiteAround(nn.Module):
    """Two MHC sites around two linear sub-layers: pre, post_pre (fused), post."""

    def __init__(self, n: int, C: int, static: bool = False):
        super().__init__()
        self.sites = nn.ModuleList([mhc.MHC(n, C, iters=20, static=static) for _ in range(2)])
        self.layers = nn.ModuleList([nn.Linear(C, C) for _ in range(2)])

    def forward(self, x):
        layer_input, state = self.sites[0].pre(x)
        y = self.layers[0](layer_input)
        x, layer_input, state = self.sites[0].post_pre(x, y, state, self.sites[1])
        return self.sites[1].post(x, self.layers[1](layer_input), state)


class Tiny(nn.Module):
    """expand -> MHCLayer -> residual_add_agg -> head: every fused op in one graph."""

    def __init__(self, n: int, C: int):
        super().__init__()
        self.expand = mhc.StreamExpand(n)
        self.layer = mhc.MHCLayer(n, C, nn.Linear(C, C))
        self.head = mhc.MHCHead(n, C)

    def forward(self, h):
        x = self.layer(self.expand(h))
        x, agg = mhc.residual_add_agg(x, x, torch.softmax(x[..., 0], dim=-1))
        return self.head(x) + agg


def _assert_exports(model: nn.Module, inputs, tmp_path, name: str):
    path = export_onnx(model, inputs, tmp_path / f"{name}.onnx")
    graph = onnx.load(path).graph
    assert not [n.op_type for n in graph.node if n.domain not in ("", "ai.onnx")], "custom ONNX ops left"
    assert check_onnx(model, inputs, path) < _tolerance(model, inputs)
    return graph


MODULES = {
    "stream_expand": (lambda: mhc.StreamExpand(4).eval(), (2, 5, 24)),
    "mhc_sites": (lambda: _perturbed(SiteAround(4, 24)), (3, 4, 24)),
    "mhc_sites_static_n3": (lambda: _perturbed(SiteAround(3, 7, static=True)), (2, 3, 3, 7)),
    "mhc_layer": (lambda: _perturbed(mhc.MHCLayer(4, 16)), (2, 3, 4, 16)),
    "mhc_head": (lambda: _perturbed(mhc.MHCHead(2, 33)), (5, 2, 33)),
    "all_fused_ops": (lambda: _perturbed(Tiny(4, 16)), (2, 3, 16)),
}


@needs_dynamo
@pytest.mark.parametrize("name", list(MODULES))
def test_module_exports_and_matches_onnxruntime(tmp_path, name):
    torch.manual_seed(1)
    build, shape = MODULES[name]
    graph = _assert_exports(build(), torch.randn(*shape), tmp_path, name)
    if name == "mhc_sites":  # two pre's of 20 Sinkhorn iterations each: 2 * (2 * 20 - 1) + 2 normalisations
        assert sum(n.op_type == "Div" for n in graph.node) >= 2 * (2 * 20 - 1)


@needs_dynamo
def test_mhc_transformer_exports_and_matches_onnxruntime(tmp_path):
    from mhc.demo.model import GPT, ModelConfig

    class Logits(nn.Module):
        def __init__(self, gpt):
            super().__init__()
            self.gpt = gpt

        def forward(self, idx):
            return self.gpt(idx)[0]

    torch.manual_seed(2)
    gpt = GPT(ModelConfig(vocab_size=19, seq_len=8, width=16, depth=1, heads=2, n_streams=4))
    for module in (gpt.expand, gpt.sites, gpt.head):
        _perturbed(module)
    _assert_exports(Logits(gpt).eval(), torch.randint(0, 19, (2, 8)), tmp_path, "gpt")


@needs_dynamo
def test_rewired_model_exports(tmp_path):
    torch.manual_seed(3)
    block = nn.Sequential(nn.Linear(12, 12), nn.GELU())
    model = nn.Sequential(mhc.MHCRewire(block, 12, n=2, io="plain")).eval()
    _assert_exports(model, torch.randn(2, 5, 12), tmp_path, "rewire")


@needs_dynamo
def test_plain_torch_onnx_export_call(tmp_path):
    # What a user writes, without mhc.export: torch's default exporter finds the registered decompositions.
    model = _perturbed(mhc.MHCLayer(4, 8))
    x = torch.randn(3, 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp_path / "layer.onnx"), dynamo=True, opset_version=18)
    assert check_onnx(model, x, tmp_path / "layer.onnx") < _tolerance(model, x)


def test_torchscript_exporter_refuses_clearly(tmp_path):
    with pytest.raises(RuntimeError, match="dynamo=True"):
        export_onnx(mhc.StreamExpand(2), torch.randn(2, 4), tmp_path / "x.onnx", dynamo=False)


# ---- the decompositions against the custom ops, every output (also those saved for the backward) ----


def _op_cases():
    torch.manual_seed(4)
    T, n, C = 5, 3, 11
    m = n * n + 2 * n
    x, y = torch.randn(T, n, C), torch.randn(T, C)
    fn, base, scale = torch.randn(m, n * C) * 0.3, torch.randn(m), torch.rand(3) + 0.5
    h_post, comb = torch.rand(T, n), torch.rand(T, n, n)
    hyper = (7, 1.5, 1e-5, 1e-4, 1e-3, "auto")
    ops = torch.ops.mhc
    return {
        "pre": (ops.pre.default, (x, fn, base, scale, *hyper)),
        "pre_static": (ops.pre.default, (x, None, base, None, *hyper)),
        "post": (ops.post.default, (x, y, h_post, comb, "auto")),
        "post_pre": (ops.post_pre.default, (x, y, h_post, comb, fn, base, scale, *hyper)),
        "sinkhorn": (ops.sinkhorn.default, (torch.randn(T, n, n) * 3, 9, 1e-4, "auto")),
        "expand_streams": (ops.expand_streams.default, (y, n, "auto")),
        "head": (ops.head.default, (x, fn[:n], base[:n], scale[:1], 1e-3, "auto")),
        "head_static": (ops.head.default, (x, None, base[:n], None, 1e-3, "auto")),
        "residual_add_agg": (ops.residual_add_agg.default, (x, x.flip(0), h_post, "auto")),
    }


@pytest.mark.parametrize("case", list(_op_cases()))
def test_decomposition_matches_the_op(case):
    op, args = _op_cases()[case]
    want = op(*args)
    got = DECOMPOSITIONS[op](*args)
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_every_forward_op_has_a_decomposition():
    # The history ops are left out: their modules switch to plain PyTorch ops while exporting.
    forward_ops = {name for name in torch.ops.mhc
                   if not name.endswith("_backward") and name not in ("history_mix", "history_skip", "project_logits")}
    assert forward_ops == {op.name().split("::")[1] for op in DECOMPOSITIONS}
