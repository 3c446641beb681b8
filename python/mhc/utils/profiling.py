"""``from mhc.utils.profiling import PerformanceAudit`` (the import path seed 000 writes) = :mod:`mhc.profiling`."""

from ..profiling import HistoryRecord, LayerRecord, PerformanceAudit

__all__ = ["PerformanceAudit", "LayerRecord", "HistoryRecord"]
