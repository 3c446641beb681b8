"""The `mhc` command (mhc.cli): info, demo flags, bench/tune dispatch."""
import json
import subprocess
import sys

import pytest
import torch

import mhc
from mhc import cli


def test_info_reports_build_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"mhc version     {mhc._C.version()}" in out
    assert "CUDA kernels    " + ("built" if mhc._C.built_with_cuda() else "not built") in out
    assert "backend cpu reference  ok" in out  # the probe ran a real Sinkhorn and checked it
    assert "backend cpu fast       ok" in out
    assert "pre_forward" in out and "post_backward" in out
    from mhc import tuning

    found = tuning.tuning_file_path()
    assert f"tuning file     {found}" in out if found else f"looked for {tuning.default_path()}" in out


def test_console_entry_point_runs_info():
    # `python -m mhc.cli` is what the `mhc` console script calls (pyproject: mhc = "mhc.cli:main").
    proc = subprocess.run([sys.executable, "-m", "mhc.cli", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mhc version" in proc.stdout


def test_probe_reports_a_missing_backend():
    if torch.cuda.is_available() and mhc._C.built_with_cuda():
        pytest.skip("this build has a working CUDA backend")
    result = cli._probe_backend(mhc._C, "cuda", "cpu")  # CUDA backend asked to run on CPU tensors
    assert result.startswith("unavailable ("), result


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_missing_tool_says_so(capsys):
    assert cli._dispatch_tool("mhc.tools.no_such_tool", []) == 2
    assert "mhc.tools.no_such_tool is missing" in capsys.readouterr().err


def test_bench_and_tune_dispatch_to_tools(monkeypatch, capsys):
    """`mhc bench ARGS` hands ARGS untouched to mhc.tools.bench.main (when that module is installed)."""
    calls = []
    for name in ("bench", "tune"):
        module = type(sys)(f"mhc.tools.{name}")
        module.main = lambda argv, name=name: calls.append((name, argv)) or 0
        monkeypatch.setitem(sys.modules, f"mhc.tools.{name}", module)
    if "mhc.tools" not in sys.modules:
        package = type(sys)("mhc.tools")
        package.__path__ = []
        monkeypatch.setitem(sys.modules, "mhc.tools", package)
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())
    assert cli.main(["bench", "--sizes", "1024", "-h"]) == 0
    assert cli.main(["tune"]) == 0
    assert calls == [("bench", ["--sizes", "1024", "-h"]), ("tune", [])]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_without_a_gpu_says_why(capsys):
    assert cli.main(["bench", "--quick"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_bench_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--help"])
    assert stop.value.code == 0
    assert "--tokens" in capsys.readouterr().out


def test_demo_flags_reach_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["demo", "--device", "cpu", "--steps", "8", "--width", "18", "--depth", "1", "--n", "2",
                   "--batch-size", "4", "--seq-len", "16", "--seed", "5", "--threads", "1", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "demo.json").read_text())
    cfg = data["config"]
    assert (cfg["steps"], cfg["width"], cfg["depth"], cfg["n_streams"], cfg["batch_size"], cfg["seq_len"],
            cfg["seed"], cfg["device"]) == (8, 18, 1, 2, 4, 16, 5, "cpu")
    assert cfg["width"] % cfg["heads"] == 0  # the default 4 heads do not divide 18: adapted
    assert data["runs"]["mhc"]["model"]["n_streams"] == 2
    assert len(data["runs"]["hc"]["history"]["amax_forward_max"]) == 8
    assert (out / "demo.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "Final validation loss" in printed and "Amax gain" in printed


def test_demo_variants_flag_and_errors(tmp_path):
    out = tmp_path / "two"
    assert cli.main(["demo", "--device", "cpu", "--steps", "4", "--width", "16", "--depth", "1", "--batch-size", "2",
                     "--seq-len", "8", "--variants", "residual,hc", "--threads", "1", "--out", str(out)]) == 0
    assert set(json.loads((out / "demo.json").read_text())["runs"]) == {"residual", "hc"}
    # A mistake is a message and exit status 2, not a traceback.
    assert cli.main(["demo", "--device", "cpu", "--variants", "residual,dense", "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["demo", "--device", "tpu", "--out", str(tmp_path / "y")]) == 2
    if not torch.cuda.is_available():
        assert cli.main(["demo", "--device", "cuda", "--out", str(tmp_path / "z")]) == 2


# ---- the tuning file in `mhc info`, and `mhc tune` without a GPU ----------------------------------------


@pytest.mark.parametrize("text, reason", [
    ("{not json", "not valid JSON"),
    ('{"format": "other", "version": 1, "entries": []}', "format"),
    ('{"format": "mhc-tuning", "version": 1, "entries": [{"op": "pre_forward"}]}', "params"),
])
def test_info_warns_that_a_malformed_tuning_file_is_ignored(tmp_path, monkeypatch, capsys, text, reason):
    path = tmp_path / "tuning.json"
    path.write_text(text)
    monkeypatch.setenv("MHC_TUNING_FILE", str(path))
    assert cli.main(["info"]) == 0
    captured = capsys.readouterr()
    assert f"tuning file     {path}: MALFORMED, ignored" in captured.out
    assert "WARNING" in captured.err and reason in captured.err


def test_info_names_the_tuning_file_in_use(tmp_path, monkeypatch, capsys):
    from mhc import tuning

    path = tmp_path / "tuning.json"
    tuning.save(tuning.make_table([tuning.make_entry("pre_forward", {"cluster": 8}, n=4, C=4096)], device="GPU X"),
                path)
    monkeypatch.setenv("MHC_TUNING_FILE", str(path))
    assert cli.main(["info"]) == 0
    assert f"tuning file     {path} (1 entries, measured on GPU X)" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available() and mhc._C.built_with_cuda(), reason="checks the message shown without a GPU")
def test_tune_without_a_gpu_says_why_and_writes_nothing(tmp_path, monkeypatch, capsys):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("MHC_TUNING_FILE", str(path))
    assert cli.main(["tune", "--quick"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mhc tune: ") and ("CUDA" in err) and "Traceback" not in err
    assert not path.exists()


def test_tune_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["tune", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--dry-run" in out and "MHC_TUNING_FILE" in out


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "steps: expected >= 1"),
    (["--lr", "-1"], "lr: expected > 0"),
    (["--variants", "foo"], "variants: expected"),
    (["--device", "foo"], "device: expected"),
    (["--corpus", "/nonexistent/corpus.txt"], "corpus: expected a text file"),
])
def test_demo_mistakes_get_a_message_and_exit_2(flags, message, capsys):
    from mhc import cli

    assert cli.main(["demo", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mhc demo: error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--device", "foo"], "--device: expected"),
    (["--history", "0"], "--history: expected values >= 1"),
    (["--n", "0"], "--n: expected values >= 1"),
    (["--steps", "0"], "--steps: expected values >= 1"),
    (["--json", "/nonexistent/x.json"], "--json: no folder"),
])
def test_bench_model_mistakes_are_refused_before_running(flags, message, capsys):
    from mhc import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", "vision", "--device", "cpu", "--quick", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_info_says_a_file_the_cuda_backend_loads_is_in_use(tmp_path, monkeypatch):
    # The Python check knows each parameter's kernel values and is stricter than the C++ reader, which clamps: when
    # the backend reports the file loaded, `mhc info` says so (with a warning), not "ignored".
    from mhc import _C

    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"format": "mhc-tuning", "version": 1, "entries": [
        {"op": "post_pre_forward", "params": {"direct_ks": 64}}]}))
    monkeypatch.setenv("MHC_TUNING_FILE", str(path))
    monkeypatch.setattr(_C, "reload_tuning", lambda: {"entries": 1, "error": ""})
    line, warning = cli._tuning_file(True)
    assert "loaded (1 entries)" in line and "MALFORMED" not in line
    assert "in use" in warning and "direct_ks" in warning
    monkeypatch.setattr(_C, "reload_tuning", lambda: {"entries": 0, "error": "bad"})
    line, warning = cli._tuning_file(True)
    assert "MALFORMED, ignored" in line
