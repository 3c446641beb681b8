"""Utilities of mhc; :mod:`mhc.utils.profiling` re-exports :class:`mhc.profiling.PerformanceAudit`."""

from . import profiling
from .profiling import PerformanceAudit

__all__ = ["PerformanceAudit", "profiling"]
