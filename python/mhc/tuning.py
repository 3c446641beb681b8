"""The tuning table of the CUDA backend: where it lives, its format, reading, validating and writing it.

The C++ side (src/cuda/tuning.cpp) reads the same file once per process, at the first CUDA op that
consults it; a table written by ``mhc tune`` therefore applies to processes started afterwards.
Format (docs/TUNING.md)::

    {
      "format": "mhc-tuning",
      "version": 1,
      "device": "NVIDIA H100 80GB HBM3",        # entries apply only on a GPU of this name ("" = any)
      "entries": [
        {"op": "pre_forward", "n": 4, "dtype": "bfloat16", "C": 4096, "tokens": [4096, null],
         "params": {"cluster": 16, "tile": 32}},
        ...
      ]
    }

Matching: ``op`` must be equal; ``n`` and ``dtype`` match when absent or equal; ``C`` and ``tokens``
are a number (exact), ``[lo, hi]`` (inclusive, ``null`` = unbounded) or absent (any). For each
parameter the first entry that matches and sets it wins, so put specific entries before broad ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

__all__ = [
    "FORMAT",
    "VERSION",
    "PARAMS",
    "PATH_PARAMS",
    "default_path",
    "tuning_file_path",
    "file_problem",
    "make_entry",
    "make_table",
    "validate",
    "load",
    "save",
    "lookup",
]

FORMAT = "mhc-tuning"
VERSION = 1

# The parameters the CUDA backend reads, per op, with the values it accepts.
# Per op, every parameter an entry may set: the cluster kernel's `cluster` and `tile` (f32, and any dtype under
# MHC_CUDA_PRE=cluster), the streaming kernels' `stream_tile` (tokens per projection tile) and `stream_group`
# (tokens per coefficient block) for 16-bit streams (the default path there; docs/TUNING.md), `wave` (1: the wave
# pre for that shape, where it runs; not searched by `mhc tune`: slower than the streaming pre on the H200 so far), and
# the direct projection's `direct` (1: on, 0: the ring projection; default on from 1024 tokens for n in {2, 4}),
# `direct_ks` (k elements per slice) and `direct_prefetch` (chunks ahead prefetched into L2, default 0). `mhc tune`
# searches none of the three: the direct and ring projections (and other slice sizes) sum the split-K partials in
# different orders, so they differ in the last bits and a tuning must not change results; the prefetch changes no
# bits but measured slower at every distance on the H200.
PARAMS: Dict[str, Dict[str, Sequence[int]]] = {
    "pre_forward": {"cluster": (1, 2, 4, 8, 16), "tile": (16, 32), "stream_tile": (16, 64, 128),
                    "stream_group": (1, 2, 4, 8), "wave": (0, 1), "direct": (0, 1),
                    "direct_ks": (64, 128, 256, 512, 1024), "direct_prefetch": (0, 1, 2, 3, 4, 6, 8)},
    "post_pre_forward": {"cluster": (1, 2, 4, 8, 16), "tile": (16, 32), "stream_tile": (16, 64, 128),
                         "stream_group": (1, 2, 4, 8), "direct": (0, 1), "direct_ks": (128, 256, 512, 1024),
                         "direct_prefetch": (0, 1, 2, 3, 4, 6, 8)},
}

# The parameters each kernel path reads.
PATH_PARAMS: Dict[str, Sequence[str]] = {"cluster": ("cluster", "tile"), "stream": ("stream_tile", "stream_group")}

DTYPES = ("float32", "float16", "bfloat16", "float64")

Range = Union[None, int, Sequence[Optional[int]]]


def default_path() -> Path:
    """$MHC_TUNING_FILE, else $XDG_CACHE_HOME/mhc/tuning.json, else ~/.cache/mhc/tuning.json (as the C++ side)."""
    if os.environ.get("MHC_TUNING_FILE"):
        return Path(os.environ["MHC_TUNING_FILE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "mhc" / "tuning.json"
    return Path.home() / ".cache" / "mhc" / "tuning.json"


def tuning_file_path() -> Optional[Path]:
    """The tuning file a new process would load, or None when there is none."""
    path = default_path()
    return path if path.is_file() else None


def file_problem(path: Union[str, Path]) -> Optional[str]:
    """Why the table at path is unusable (the library ignores such a file), or None when it is valid."""
    try:
        load(path)
    except json.JSONDecodeError as e:
        return f"not valid JSON: {e}"
    except (ValueError, OSError) as e:
        return str(e)
    return None


def _check_range(value: Any, what: str) -> None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in value)):
        return
    raise ValueError(f"mhc.tuning: {what}: expected an integer, [lo, hi] (null = unbounded) or absent, got {value!r}")


def make_entry(op: str, params: Dict[str, int], *, n: Optional[int] = None, dtype: Optional[str] = None,
               C: Range = None, tokens: Range = None) -> Dict[str, Any]:
    """One table entry; absent keys match anything."""
    entry: Dict[str, Any] = {"op": op}
    if n is not None:
        entry["n"] = n
    if dtype is not None:
        entry["dtype"] = dtype
    if C is not None:
        entry["C"] = list(C) if isinstance(C, (list, tuple)) else C
    if tokens is not None:
        entry["tokens"] = list(tokens) if isinstance(tokens, (list, tuple)) else tokens
    entry["params"] = dict(params)
    validate_entry(entry)
    return entry


def make_table(entries: Iterable[Dict[str, Any]], device: str = "") -> Dict[str, Any]:
    table = {"format": FORMAT, "version": VERSION, "device": device, "entries": list(entries)}
    validate(table)
    return table


def validate_entry(entry: Dict[str, Any]) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"mhc.tuning: every entry must be an object, got {entry!r}")
    op = entry.get("op")
    if not isinstance(op, str):
        raise ValueError(f"mhc.tuning: entry without a string \"op\": {entry!r}")
    if "n" in entry and not (isinstance(entry["n"], int) and 1 <= entry["n"] <= 64):
        raise ValueError(f"mhc.tuning: {op}: n: expected 1..64, got {entry['n']!r}")
    if "dtype" in entry and entry["dtype"] not in DTYPES:
        raise ValueError(f"mhc.tuning: {op}: dtype: expected one of {DTYPES}, got {entry['dtype']!r}")
    _check_range(entry.get("C"), f"{op}: C")
    _check_range(entry.get("tokens"), f"{op}: tokens")
    params = entry.get("params")
    if not isinstance(params, dict):
        raise ValueError(f"mhc.tuning: {op}: \"params\" must be an object")
    known = PARAMS.get(op, {})
    for key, value in params.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"mhc.tuning: {op}: param {key}: expected an integer, got {value!r}")
        if key in known and value not in known[key]:
            raise ValueError(f"mhc.tuning: {op}: param {key}: expected one of {tuple(known[key])}, got {value}")


def validate(table: Dict[str, Any]) -> None:
    """Raises ValueError naming the first problem; accepts what the C++ reader accepts, and checks the
    values of the parameters it knows."""
    if not isinstance(table, dict):
        raise ValueError("mhc.tuning: the document must be an object")
    if table.get("format") != FORMAT:
        raise ValueError(f"mhc.tuning: \"format\" must be {FORMAT!r}, got {table.get('format')!r}")
    if table.get("version") != VERSION:
        raise ValueError(f"mhc.tuning: \"version\" must be {VERSION}, got {table.get('version')!r}")
    if "device" in table and not isinstance(table["device"], str):
        raise ValueError("mhc.tuning: \"device\" must be a string")
    entries = table.get("entries")
    if not isinstance(entries, list):
        raise ValueError("mhc.tuning: \"entries\" must be an array")
    for entry in entries:
        validate_entry(entry)


def load(path: Union[str, Path, None] = None) -> Optional[Dict[str, Any]]:
    """The validated table at path (default: default_path()), or None when the file does not exist."""
    path = Path(path) if path is not None else default_path()
    if not path.is_file():
        return None
    with open(path) as f:
        table = json.load(f)
    validate(table)
    return table


def save(table: Dict[str, Any], path: Union[str, Path, None] = None) -> Path:
    """Validates and writes the table atomically; returns the path written."""
    validate(table)
    path = Path(path) if path is not None else default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _in_range(value: int, rng: Range) -> bool:
    if rng is None:
        return True
    if isinstance(rng, int):
        return value == rng
    lo, hi = rng
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def lookup(table: Dict[str, Any], op: str, param: str, *, n: int, dtype: str, C: int, tokens: int,
           device: str = "") -> Optional[int]:
    """The value the CUDA backend would use for `param`, or None (its built-in heuristic)."""
    if table.get("device") and device and table["device"] != device:
        return None
    entries: List[Dict[str, Any]] = table.get("entries", [])
    for e in entries:
        if e["op"] != op or ("n" in e and e["n"] != n) or ("dtype" in e and e["dtype"] != dtype):
            continue
        if not _in_range(C, e.get("C")) or not _in_range(tokens, e.get("tokens")):
            continue
        if param in e["params"]:
            return e["params"][param]
    return None
