"""ONNX export of models built from the mhc modules (multi-history skips and n-stream sites), checked against onnxruntime.

While ``torch.onnx.export`` traces, the skips switch to plain PyTorch ops that map to standard ONNX
operators (TopK and CumSum for sparsemax, Softmax, Mul/Add for the weighted sum; a frozen
:class:`~mhc.history.WeightedSum` exports only its non-zero terms), and :class:`~mhc.history.MHCSequential`
keeps its history functional. So both the plain torch.onnx.export call and these helpers work:

    model.clear_history()
    torch.onnx.export(model, dummy_input, "model.onnx", opset_version=14, do_constant_folding=True)

The n-stream modules (``StreamExpand``, ``MHC`` sites, ``MHCLayer``, ``MHCHead``, ``MHCRewire``) call custom
ops; :mod:`mhc.decompositions` registers their plain-PyTorch decompositions, which the torch.export-based
exporter (``torch.onnx.export(..., dynamo=True)``, torch's default) applies, so these models export to
standard ONNX operators too, Sinkhorn iterations unrolled. The TorchScript exporter cannot apply them and
says so.

``export_onnx`` adds: clearing the history, optional freezing (on a copy), and the choice of exporter
(the torch.export-based one needs the ``onnxscript`` package; without it the TorchScript exporter is used).
``check_onnx`` runs the file with onnxruntime and returns the largest difference from PyTorch.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import decompositions  # noqa: F401  (registers the n-stream ops' decompositions)
from .history import clear_history, freeze_mhc

__all__ = ["export_onnx", "check_onnx", "has_dynamo_exporter"]

Inputs = Union[Tensor, Tuple[Tensor, ...]]


def has_dynamo_exporter() -> bool:
    """True when the torch.export-based ONNX exporter can run (it needs ``onnxscript``)."""
    return importlib.util.find_spec("onnxscript") is not None


def _as_tuple(inputs: Inputs) -> Tuple[Tensor, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def export_onnx(model: nn.Module, example_input: Inputs, path: Union[str, os.PathLike], *,
                opset_version: Optional[int] = None,
                freeze: bool = False, dynamo: Optional[bool] = None, input_names: Sequence[str] = ("input",),
                output_names: Sequence[str] = ("output",), **kwargs) -> str:
    """Export ``model`` (in eval mode) to ``path``; returns the path.

    ``freeze=True`` exports a copy whose skips are replaced by constant weighted sums (no projection in
    the graph). ``dynamo`` picks the exporter (default: the torch.export one when onnxscript is installed;
    models with n-stream modules need it). ``opset_version`` defaults to 18 for that exporter (its lowest),
    17 for the TorchScript one.
    """
    if freeze:
        model = freeze_mhc(copy.deepcopy(model))
    clear_history(model)
    if dynamo is None:
        dynamo = has_dynamo_exporter()
    if opset_version is None:
        opset_version = 18 if dynamo else 17
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, _as_tuple(example_input), str(path), opset_version=opset_version,
                              do_constant_folding=True, input_names=list(input_names), output_names=list(output_names),
                              dynamo=dynamo, **kwargs)
    finally:
        model.train(was_training)
    return str(path)


def check_onnx(model: nn.Module, example_input: Inputs, path: Union[str, os.PathLike]) -> float:
    """Run ``path`` with onnxruntime on ``example_input`` and return max |onnx - torch| over the outputs."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = _as_tuple(example_input)
    feed = {arg.name: t.detach().cpu().numpy() for arg, t in zip(session.get_inputs(), inputs)}
    got = session.run(None, feed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(*inputs)
    finally:
        model.train(was_training)
    want = want if isinstance(want, (tuple, list)) else (want,)
    return max(float(np.max(np.abs(g - w.detach().cpu().numpy()))) for g, w in zip(got, want))
