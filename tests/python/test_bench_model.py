"""`mhc bench --model gpt|vision` (mhc.tools.bench_model) runs on the CPU at a tiny size and reports what it
promises: every variant, eager and compiled, with its time, overheads against the residual model, and the one-hot
history skip against x + h. (Figures on a busy CPU mean nothing; this checks the fields, not the numbers.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mhc import cli

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--quick", "--device", "cpu", "--steps", "1", "--warmup", "1", "--compile-backend", "aot_eager"]


def _rows_by_mode(rows):
    by_mode = {}
    for row in rows:
        by_mode.setdefault(row["mode"], []).append(row)
    return by_mode


def test_gpt_variants_eager_and_compiled(tmp_path, capsys):
    out = tmp_path / "gpt.json"
    assert cli.main(["bench", "--model", "gpt", *FAST, "--precision", "fp32", "--n", "2", "--modes", "eager,compile",
                     "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["info"]["torch"] and data["info"]["device"] and "commit" in data["info"]
    by_mode = _rows_by_mode(data["rows"])
    assert set(by_mode) == {"eager", "compile"}
    for rows in by_mode.values():
        assert [r["name"] for r in rows] == ["residual", "mhc-2", "mhc-2-recompute"]
        assert [r["recompute"] for r in rows] == [False, False, True]
        assert rows[0]["time_overhead_pct"] == 0.0
        for r in rows:
            assert "error" not in r, r.get("error")
            assert r["step_ms"] > 0 and r["params_m"] > 0 and r["peak_bytes"] is None  # CPU: no peak
            assert r["time_overhead_pct"] == pytest.approx(100 * (r["step_ms"] / rows[0]["step_ms"] - 1))
        assert rows[1]["params_m"] > rows[0]["params_m"]  # the sites and the head
    printed = capsys.readouterr().out
    assert "| variant | params (M) | step ms | time overhead | peak GiB | memory overhead |" in printed
    assert "mhc-2-recompute" in printed


def test_vision_and_one_hot_rows(tmp_path, capsys):
    out = tmp_path / "vision.json"
    assert cli.main(["bench", "--model", "vision", *FAST, "--modes", "eager", "--profile", "--profile-rows", "3",
                     "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["residual", "mhc-4"]
    assert all(r["step_ms"] > 0 and len(r["profile"]) == 3 for r in data["rows"])
    assert {(r["dtype"], r["H"]) for r in data["one_hot"]} == {("float32", 4), ("bfloat16", 4)}
    for r in data["one_hot"]:
        assert r["add_us"] > 0 and r["one_hot_us"] > 0 and r["ratio"] == pytest.approx(r["one_hot_us"] / r["add_us"])
    printed = capsys.readouterr().out
    assert "one-hot history skip vs x + h" in printed and "profile of one step: vision eager mhc-4" in printed


def test_bench_gpt_step_script_keeps_its_defaults():
    proc = subprocess.run([sys.executable, str(ROOT / "bench/python/bench_gpt_step.py"), "--quick", "--device", "cpu",
                           "--steps", "1", "--warmup", "0", "--precision", "fp32"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| mhc-4 |" in proc.stdout and "recompute" not in proc.stdout and "compile:" not in proc.stdout


def test_help_and_bad_modes(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--help"])
    assert stop.value.code == 0 and "--model" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--model", "gpt", "--device", "cpu", "--modes", "jit"])
    assert stop.value.code == 2 and "--modes" in capsys.readouterr().err


def test_gpt_rounds_alternate_the_variants(tmp_path, capsys):
    out = tmp_path / "gpt.json"
    assert cli.main(["bench", "--model", "gpt", *FAST, "--precision", "fp32", "--n", "2", "--recompute", "off",
                     "--modes", "eager", "--rounds", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    # residual, mHC, residual, mHC: each round against its own residual step
    assert [(r["round"], r["name"]) for r in rows] == [(0, "residual"), (0, "mhc-2"), (1, "residual"), (1, "mhc-2")]
    for base, r in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert r["time_overhead_pct"] == pytest.approx(100 * (r["step_ms"] / base["step_ms"] - 1))
    printed = capsys.readouterr().out
    assert "eager, over 2 rounds (median; min-max of the overhead):" in printed
    assert "| mhc-2 |" in printed.split("over 2 rounds")[1]
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--model", "gpt", *FAST, "--rounds", "0"])
    assert stop.value.code == 2 and "--rounds: expected a count >= 1, got 0" in capsys.readouterr().err
