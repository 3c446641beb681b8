"""mhc: Manifold-Constrained Hyper-Connections for PyTorch.

The engine is the C++/CUDA extension ``mhc._C``; :mod:`mhc.ops` registers its ops with ``torch.library``
(autograd, fake tensors, torch.compile), :mod:`mhc.modules` builds the layers on them, and
:mod:`mhc.reference` holds the plain-PyTorch implementations used as test oracle and baseline.
"""

import torch  # noqa: F401  (first: the extension links torch's libraries and registers its ops with torch)

from . import _C
from . import ops, reference
from .modules import MHC, MHCHead, MHCLayer, MHCState, StreamExpand
from .ops import (
    expand_streams,
    mhc_head,
    mhc_post,
    mhc_post_pre,
    mhc_pre,
    residual_add_agg,
    sinkhorn,
    use_backend,
)

__version__ = _C.version()

__all__ = [
    "MHC",
    "MHCHead",
    "MHCLayer",
    "MHCState",
    "StreamExpand",
    "expand_streams",
    "mhc_head",
    "mhc_post",
    "mhc_post_pre",
    "mhc_pre",
    "residual_add_agg",
    "sinkhorn",
    "use_backend",
    "ops",
    "reference",
]

# --- activation recomputation (recompute.py) ---
from . import recompute
from .recompute import MHCStack

__all__ += ["MHCStack", "recompute"]
# --- end activation recomputation ---

# --- model integrations (rewire.py, hf.py, diagnostics.py) ---
from . import diagnostics, hf
from .rewire import AutoPatcher, MHCRewire, PatchReport

__all__ += ["AutoPatcher", "MHCRewire", "PatchReport", "diagnostics", "hf"]  # hf does not import transformers
# --- end model integrations ---

# --- multi-history skip connections (history.py, history_ops.py, profiling.py, export.py) ---
from . import export, history, history_ops, profiling, utils
from .history import (
    PRESETS,
    HistoryBuffer,
    MatrixMHCSkip,
    MHCBasicBlock,
    MHCBlock,
    MHCBottleneck,
    MHCConv2d,
    MHCSequential,
    MHCSkip,
    MHCSkipConfig,
    HistoryMixin,
    WeightedSum,
    clear_history,
    freeze_mhc,
    history_memory_bytes,
    inject_mhc,
)
from .history_ops import history_mix, history_skip, project_logits
from .profiling import PerformanceAudit

__all__ += ["PRESETS", "HistoryBuffer", "HistoryMixin", "MatrixMHCSkip", "MHCBasicBlock", "MHCBlock", "MHCBottleneck", "MHCConv2d",
            "MHCSequential", "MHCSkip", "MHCSkipConfig", "WeightedSum", "clear_history", "freeze_mhc",
            "history_memory_bytes", "inject_mhc", "history_mix", "history_skip", "project_logits",
            "PerformanceAudit", "export", "history", "history_ops", "profiling", "utils"]
# --- end multi-history skip connections ---

from . import flops  # noqa: E402  FLOP formulas of every torch.ops.mhc op (torch.utils.flop_counter)

__all__ += ["flops"]
