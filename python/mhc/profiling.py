"""PerformanceAudit: memory by layer and mixing vs transformation time of a model.

    from mhc.profiling import PerformanceAudit      # also mhc.utils.profiling.PerformanceAudit
    print(PerformanceAudit(model).run(input_size=(1, 64, 64)).report())

For every leaf module (and every multi-history skip) the audit records its parameter bytes, the bytes
of its output, the bytes autograd saved for the backward during its forward (``training=True``), on
CUDA the memory it allocated and its transient peak, and its forward time, summed over its calls (an
:class:`~mhc.MHC` site is called for its pre and for its post). Skips (:class:`~mhc.history.MHCSkip`,
:class:`~mhc.history.MatrixMHCSkip`, :class:`~mhc.history.WeightedSum`) and the n-stream modules
(:class:`~mhc.MHC`, :class:`~mhc.StreamExpand`, :class:`~mhc.MHCHead`) count as *mixing*, everything else as
*transformation*; what remains of the measured forward time (history pushes, Python, containers) is *other*.
For every :class:`~mhc.history.MHCSequential` it compares the history memory predicted by ``B x C x S x H x bytes``
with the bytes its history buffer actually held.

The audit synchronises the device around every module to time it: it is a diagnostic, not a training
path (the ops themselves never synchronise).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .history import HistoryBuffer, MatrixMHCSkip, MHCSequential, MHCSkip, WeightedSum, _FrozenMatrix
from .modules import MHC, MHCHead, StreamExpand

__all__ = ["PerformanceAudit", "LayerRecord", "HistoryRecord"]

_MIXING = (MHCSkip, MatrixMHCSkip, WeightedSum, _FrozenMatrix, MHC, StreamExpand, MHCHead)


@dataclasses.dataclass
class LayerRecord:
    name: str
    type: str
    kind: str  # "mixing" or "transformation"
    calls: int = 0
    param_bytes: int = 0
    output_bytes: int = 0
    saved_bytes: int = 0  # saved for the backward during this module's forward (training audits)
    allocated_bytes: int = 0  # CUDA: memory still allocated after the call, per call
    peak_bytes: int = 0  # CUDA: transient peak above the memory at entry
    time_s: float = 0.0  # per forward pass (mean over the measured runs)


@dataclasses.dataclass
class HistoryRecord:
    name: str
    max_history: int
    state_shape: Sequence[int]
    dtype: torch.dtype
    predicted_bytes: int
    measured_bytes: int


def _bytes_of(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_bytes_of(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_bytes_of(o) for o in obj.values())
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class PerformanceAudit:
    """Audit of ``model``: run it with :meth:`run`, read :meth:`report` (text) or :meth:`to_dict`.

    ``training=True`` runs forward + backward with autograd (memory saved for the backward by layer);
    the default audits inference (no grad: MHCSequential uses its pre-allocated ring buffer).
    ``repeats`` measured runs follow ``warmup`` unmeasured ones.
    """

    def __init__(self, model: nn.Module, *, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
                 training: bool = False, warmup: int = 1, repeats: int = 3):
        self.model = model
        try:
            first = next(model.parameters())
            default_device = first.device
        except StopIteration:
            default_device = torch.device("cpu")
        self.device = torch.device(device) if device is not None else default_device
        self.dtype = dtype
        self.training = training
        self.warmup = max(0, int(warmup))
        self.repeats = max(1, int(repeats))
        self.layers: List[LayerRecord] = []
        self.histories: List[HistoryRecord] = []
        self.total_time_s = 0.0
        self.peak_memory_bytes: Optional[int] = None
        self.input_shape: Optional[Sequence[int]] = None
        self._ran = False

    # ---- running ----------------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, input_size: Optional[Sequence[int]] = None, *, input: Optional[Tensor] = None) -> "PerformanceAudit":
        """Run the model on ``input`` or on ``torch.randn(input_size)`` (the full shape, batch included)."""
        if input is None:
            if input_size is None:
                raise ValueError("PerformanceAudit.run: give input_size (the full input shape) or input")
            input = torch.randn(tuple(input_size), dtype=self.dtype, device=self.device)
        self.input_shape = tuple(input.shape)
        model = self.model
        cuda = self.device.type == "cuda"
        watched = [(name or type(model).__name__, m) for name, m in model.named_modules()
                   if isinstance(m, _MIXING) or not any(True for _ in m.children())]
        records: Dict[int, LayerRecord] = {}
        for name, m in watched:
            kind = "mixing" if isinstance(m, _MIXING) else "transformation"
            records[id(m)] = LayerRecord(name, type(m).__name__, kind,
                                         param_bytes=sum(_bytes_of(p) for p in m.parameters(recurse=False)))
        measuring = {"on": False}
        stack: List[Dict[str, Any]] = []
        saved_storages: set = set()

        def pre_hook(mod, args):
            if not measuring["on"]:
                return
            self._sync()
            entry = {"id": id(mod), "t": time.perf_counter()}
            if cuda:
                entry["mem"] = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            stack.append(entry)

        def post_hook(mod, args, out):
            if not measuring["on"] or not stack:
                return
            self._sync()
            entry = stack.pop()
            rec = records[entry["id"]]
            rec.calls += 1
            rec.time_s += time.perf_counter() - entry["t"]
            rec.output_bytes = max(rec.output_bytes, _bytes_of(out))
            if cuda:
                rec.allocated_bytes = max(rec.allocated_bytes, torch.cuda.memory_allocated(self.device) - entry["mem"])
                rec.peak_bytes = max(rec.peak_bytes, torch.cuda.max_memory_allocated(self.device) - entry["mem"])

        def pack(t: Tensor):
            # Attribute what autograd saves to the module whose forward is running (once per storage).
            if measuring["on"] and stack:
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
                if key not in saved_storages:
                    saved_storages.add(key)
                    records[stack[-1]["id"]].saved_bytes += t.numel() * t.element_size()
            return t

        handles = []
        for _, m in watched:
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(post_hook))
        was_training = model.training
        totals = 0.0
        try:
            model.train(self.training)
            for i in range(self.warmup + self.repeats):
                measuring["on"] = i >= self.warmup
                saved_storages.clear()
                if cuda and measuring["on"]:
                    torch.cuda.reset_peak_memory_stats(self.device)
                    base = torch.cuda.memory_allocated(self.device)
                self._sync()
                start = time.perf_counter()
                if self.training:
                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        out = model(input)
                    self._sync()
                    forward_end = time.perf_counter()
                    loss = out.float().square().mean() if isinstance(out, Tensor) else sum(
                        o.float().square().mean() for o in out)
                    loss.backward()
                    model.zero_grad(set_to_none=True)
                else:
                    with torch.no_grad():
                        out = model(input)
                    self._sync()
                    forward_end = time.perf_counter()
                if measuring["on"]:
                    totals += forward_end - start
                    if cuda:
                        peak = torch.cuda.max_memory_allocated(self.device) - base
                        self.peak_memory_bytes = max(self.peak_memory_bytes or 0, peak)
                del out
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        for rec in records.values():
            rec.time_s /= self.repeats
            rec.calls //= self.repeats
            rec.saved_bytes //= self.repeats
        self.layers = [records[id(m)] for _, m in watched if records[id(m)].calls > 0 or records[id(m)].param_bytes]
        self.total_time_s = totals / self.repeats
        self.histories = self._history_records()
        self._ran = True
        return self

    def _history_records(self) -> List[HistoryRecord]:
        out = []
        for name, m in self.model.named_modules():
            if not isinstance(m, MHCSequential):
                continue
            buf: HistoryBuffer = m.history
            shape, held_dtype = buf.last_shape, buf.last_dtype
            if not shape:
                continue
            predicted = m.predicted_history_nbytes(shape, held_dtype)
            out.append(HistoryRecord(name or type(m).__name__, m.max_history, shape, held_dtype, predicted,
                                     buf.peak_nbytes))
        return out

    # ---- results ----------------------------------------------------------------------------------

    @property
    def mixing_time_s(self) -> float:
        return sum(r.time_s for r in self.layers if r.kind == "mixing")

    @property
    def transformation_time_s(self) -> float:
        return sum(r.time_s for r in self.layers if r.kind == "transformation")

    def to_dict(self) -> Dict[str, Any]:
        self._require_run()
        return {
            "input_shape": list(self.input_shape),
            "device": str(self.device),
            "training": self.training,
            "total_time_s": self.total_time_s,
            "mixing_time_s": self.mixing_time_s,
            "transformation_time_s": self.transformation_time_s,
            "peak_memory_bytes": self.peak_memory_bytes,
            "layers": [dataclasses.asdict(r) for r in self.layers],
            "histories": [dict(dataclasses.asdict(h), dtype=str(h.dtype), state_shape=list(h.state_shape))
                          for h in self.histories],
        }

    def _require_run(self) -> None:
        if not self._ran:
            raise RuntimeError("PerformanceAudit: call run(input_size=...) before reading the results")

    def report(self) -> str:
        """A text report: memory by layer, mixing vs transformation time, history memory vs the formula."""
        self._require_run()
        cuda = self.device.type == "cuda"
        mode = "training (forward + backward)" if self.training else "inference (no grad)"
        lines = [f"PerformanceAudit of {type(self.model).__name__}: input {tuple(self.input_shape)} {self.dtype} on "
                 f"{self.device}, {mode}, mean of {self.repeats} run(s)"]
        width = max([len(r.name) for r in self.layers] + [5])
        header = f"{'layer':<{width}}  {'type':<16} {'kind':<14} {'params':>10} {'output':>10}"
        if self.training:
            header += f" {'saved':>10}"
        if cuda:
            header += f" {'allocated':>10} {'peak':>10}"
        header += f" {'time ms':>9}"
        lines += ["", header, "-" * len(header)]
        for r in self.layers:
            row = (f"{r.name:<{width}}  {r.type[:16]:<16} {r.kind:<14} {_human(r.param_bytes):>10} "
                   f"{_human(r.output_bytes):>10}")
            if self.training:
                row += f" {_human(r.saved_bytes):>10}"
            if cuda:
                row += f" {_human(r.allocated_bytes):>10} {_human(r.peak_bytes):>10}"
            row += f" {r.time_s * 1e3:>9.3f}"
            lines.append(row)
        total = self.total_time_s
        mix, trans = self.mixing_time_s, self.transformation_time_s
        other = max(0.0, total - mix - trans)
        pct = (lambda v: f"{100 * v / total:.1f}%") if total > 0 else (lambda v: "-")
        lines += ["", f"Forward time: {total * 1e3:.3f} ms = transformation {trans * 1e3:.3f} ms ({pct(trans)}) + "
                      f"mixing {mix * 1e3:.3f} ms ({pct(mix)}) + other {other * 1e3:.3f} ms ({pct(other)})"]
        by_kind = {k: sum(r.param_bytes for r in self.layers if r.kind == k) for k in ("transformation", "mixing")}
        lines.append(f"Parameters: transformation {_human(by_kind['transformation'])}, mixing "
                     f"{_human(by_kind['mixing'])}")
        if self.training:
            saved = {k: sum(r.saved_bytes for r in self.layers if r.kind == k) for k in ("transformation", "mixing")}
            lines.append(f"Saved for backward: transformation {_human(saved['transformation'])}, mixing "
                         f"{_human(saved['mixing'])} (mixing saves references to the history, shared with the blocks)")
        if self.peak_memory_bytes is not None:
            lines.append(f"Peak memory above the start of a pass: {_human(self.peak_memory_bytes)}")
        for h in self.histories:
            shape = list(h.state_shape)
            B, C = shape[0], shape[1] if len(shape) > 1 else 1
            S = math.prod(shape[2:]) if len(shape) > 2 else 1
            nbytes = torch.empty((), dtype=h.dtype).element_size()
            lines.append(f"History of {h.name}: H={h.max_history} states of {shape} {h.dtype}: predicted "
                         f"B x C x S x H x bytes = {B} x {C} x {S} x {h.max_history} x {nbytes} = {h.predicted_bytes} B "
                         f"({_human(h.predicted_bytes)}), measured {h.measured_bytes} B")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report() if self._ran else f"PerformanceAudit({type(self.model).__name__}, not run)"
