"""bench/python/bench_history.py runs end to end (a tiny size) and reports what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_history_quick_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench/python/bench_history.py"), "--device", "cpu", "--quick", "--depth", "3",
           "--batch", "2", "--size", "8", "--channels", "8", "--steps", "1", "--warmup", "0", "--op-repeats", "2",
           "--threads", "1", "--models", "residual,mhc-4,mhc-4-detach,mhc-4-bf16,dense", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    models = {m["model"]: m for m in result["models"]}
    assert set(models) == {"residual", "mhc-4", "mhc-4-detach", "mhc-4-bf16", "dense"}
    assert all(m["step_ms"] > 0 and m["saved_bytes"] > 0 for m in models.values())
    # Concatenation keeps more for the backward than a residual or multi-history stack.
    assert models["dense"]["saved_bytes"] > models["mhc-4"]["saved_bytes"]
    assert {r["op"] for r in result["ops"]} >= {"x + h (torch)", "skip one-hot", "skip dense"}
    assert "skip one-hot" in proc.stdout
