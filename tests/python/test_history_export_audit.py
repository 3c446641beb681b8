"""ONNX export of multi-history models checked with onnxruntime (the plain torch.onnx.export call and mhc.export), and
PerformanceAudit (memory by layer, mixing vs transformation time, the history formula vs what is held)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mhc.export import check_onnx, export_onnx, has_dynamo_exporter
from mhc.history import MHCBasicBlock, MHCSequential, MHCSkip, history_memory_bytes

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

EXPORTERS = [pytest.param(False, id="torchscript"),
             pytest.param(True, id="dynamo", marks=pytest.mark.skipif(not has_dynamo_exporter(),
                                                                      reason="needs onnxscript"))]


def _vision_model(constraint="simplex", depth=4, **kw):
    torch.manual_seed(0)
    stages = MHCSequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                             for _ in range(depth)], max_history=3, constraint=constraint, **kw)
    with torch.no_grad():
        for m in stages.modules():
            if hasattr(m, "logits"):
                m.logits.normal_()
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), stages, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("constraint", ["simplex", "softmax", "identity", "doubly_stochastic"])
@pytest.mark.parametrize("freeze", [False, True])
def test_onnx_export_matches_onnxruntime(tmp_path, dynamo, constraint, freeze):
    model = _vision_model(constraint, use_gating=True)
    x = torch.randn(2, 3, 8, 8)
    path = export_onnx(model, x, tmp_path / "model.onnx", dynamo=dynamo, freeze=freeze)
    assert check_onnx(model, x, path) < 1e-4
    graph = onnx.load(path).graph
    assert not any(node.domain.startswith("mhc") for node in graph.node)  # standard operators only
    if freeze:
        assert not any(node.op_type == "TopK" for node in graph.node)  # no projection left


def test_frozen_export_drops_zero_terms(tmp_path):
    model = MHCSequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(4)], max_history=4).eval()
    with torch.no_grad():
        for s in model.skips:
            s.logits.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))  # sparsemax one-hot: a plain residual
    x = torch.randn(2, 4)
    path = export_onnx(model, x, tmp_path / "frozen.onnx", dynamo=False, freeze=True)
    assert check_onnx(model, x, path) < 1e-5
    muls = [n for n in onnx.load(path).graph.node if n.op_type == "Mul"]
    assert len(muls) == 4  # one weight x state term per block, the zero-weight states left out


def test_seed_snippet_plain_torch_onnx_export(tmp_path):
    # the plain export call (the default exporter needs onnxscript; otherwise the TorchScript one).
    model = _vision_model()
    dummy_input = torch.randn(1, 3, 16, 16)
    model[1].clear_history()
    kwargs = {} if has_dynamo_exporter() else {"dynamo": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, dummy_input, str(tmp_path / "honey_badger.onnx"), opset_version=14,
                          do_constant_folding=True, **kwargs)
    assert check_onnx(model, dummy_input, tmp_path / "honey_badger.onnx") < 1e-4


# ---- PerformanceAudit ----------------------------------------------------------------------------------


def test_audit_seed_call_and_report():
    from mhc.utils.profiling import PerformanceAudit as SeedPath
    from mhc.profiling import PerformanceAudit

    assert SeedPath is PerformanceAudit
    model = MHCSequential(*[nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(4)], max_history=4)
    audit = PerformanceAudit(model)
    assert audit.run(input_size=(1, 64, 64)) is audit
    text = audit.report()
    assert "mixing" in text and "transformation" in text and "History of" in text
    d = audit.to_dict()
    kinds = {r["kind"] for r in d["layers"]}
    assert kinds == {"mixing", "transformation"}
    assert d["mixing_time_s"] > 0 and d["transformation_time_s"] > 0
    assert d["mixing_time_s"] + d["transformation_time_s"] <= d["total_time_s"] * 1.05
    (h,) = d["histories"]
    assert h["predicted_bytes"] == history_memory_bytes(1, 64, 64, 4, torch.float32) == h["measured_bytes"]
    linear = next(r for r in d["layers"] if r["type"] == "Linear")
    assert linear["param_bytes"] == (64 * 64 + 64) * 4 and linear["output_bytes"] == 64 * 64 * 4
    skip = next(r for r in d["layers"] if r["type"] == "MHCSkip")
    assert skip["param_bytes"] == 4 * 4 and skip["calls"] == 1


def test_audit_training_reports_saved_memory_by_layer():
    from mhc.profiling import PerformanceAudit

    model = MHCSequential(*[MHCBasicBlock(8, max_history=3, history_dtype="bf16") for _ in range(3)],
                          history_dtype=torch.bfloat16)
    audit = PerformanceAudit(model, training=True, repeats=1).run(input_size=(2, 8, 8, 8))
    d = audit.to_dict()
    convs = [r for r in d["layers"] if r["type"] == "Conv2d"]
    assert all(r["saved_bytes"] > 0 for r in convs)
    (h,) = d["histories"]
    assert h["dtype"] == "torch.bfloat16"
    assert h["predicted_bytes"] == history_memory_bytes(2, 8, 64, 3, torch.bfloat16)
    assert h["measured_bytes"] == h["predicted_bytes"]
    assert "Saved for backward" in audit.report()
    with pytest.raises(RuntimeError, match="run"):
        PerformanceAudit(model).report()


def test_audit_skip_only_model():
    from mhc.profiling import PerformanceAudit

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)
            self.skip = MHCSkip(2)

        def forward(self, x):
            return self.skip(self.lin(x), [x])

    d = PerformanceAudit(Tiny()).run(input_size=(3, 5)).to_dict()
    assert {r["name"] for r in d["layers"]} == {"lin", "skip"} and d["histories"] == []
