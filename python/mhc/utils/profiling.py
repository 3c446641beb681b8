"""``from mhc.utils.profiling import PerformanceAudit`` (the import path the multi-history skip's users know) = :mod:`mhc.profiling`."""

from ..profiling import HistoryRecord, LayerRecord, PerformanceAudit

__all__ = ["PerformanceAudit", "LayerRecord", "HistoryRecord"]
