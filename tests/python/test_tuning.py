"""mhc.tuning: the tuning-table format the CUDA backend reads (docs/TUNING.md). Needs no GPU."""

from __future__ import annotations

import json

import pytest

from mhc import tuning


def table():
    return tuning.make_table([
        tuning.make_entry("pre_forward", {"cluster": 8, "tile": 32}, n=4, dtype="bfloat16", C=4096,
                          tokens=[4096, None]),
        tuning.make_entry("pre_forward", {"cluster": 4}, n=4, C=[1024, 8192]),
    ], device="Test GPU")


def test_first_matching_entry_sets_each_parameter():
    t = table()
    kw = dict(n=4, dtype="bfloat16", C=4096)
    assert tuning.lookup(t, "pre_forward", "cluster", tokens=8192, **kw) == 8
    assert tuning.lookup(t, "pre_forward", "tile", tokens=8192, **kw) == 32
    assert tuning.lookup(t, "pre_forward", "cluster", tokens=100, **kw) == 4  # the broader entry
    assert tuning.lookup(t, "pre_forward", "tile", tokens=100, **kw) is None  # built-in heuristic
    assert tuning.lookup(t, "pre_forward", "cluster", n=8, dtype="bfloat16", C=4096, tokens=8192) is None
    assert tuning.lookup(t, "pre_forward", "cluster", tokens=8192, device="Other GPU", **kw) is None


def test_save_and_load_round_trip(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "tuning.json"
    monkeypatch.setenv("MHC_TUNING_FILE", str(path))
    assert tuning.tuning_file_path() is None
    assert tuning.save(table()) == path
    assert tuning.tuning_file_path() == path
    assert tuning.load() == table()
    assert json.loads(path.read_text())["format"] == "mhc-tuning"


@pytest.mark.parametrize("bad, message", [
    ({"format": "other", "version": 1, "entries": []}, "format"),
    ({"format": "mhc-tuning", "version": 2, "entries": []}, "version"),
    ({"format": "mhc-tuning", "version": 1, "entries": [{"op": "pre_forward"}]}, "params"),
    ({"format": "mhc-tuning", "version": 1, "entries": [{"op": "pre_forward", "params": {"cluster": 3}}]}, "cluster"),
    ({"format": "mhc-tuning", "version": 1, "entries": [{"op": "pre_forward", "C": [1], "params": {}}]}, "C"),
    ({"format": "mhc-tuning", "version": 1, "entries": [{"op": "x", "dtype": "int8", "params": {}}]}, "dtype"),
])
def test_invalid_tables_are_rejected_naming_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        tuning.validate(bad)


# ---- mhc tune's decisions (mhc/tools/tune.py): everything but the GPU measurements ----------------------

from mhc.tools import tune  # noqa: E402


def test_file_problem_names_what_is_wrong(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("{not json")
    assert tuning.file_problem(path).startswith("not valid JSON")
    path.write_text(json.dumps(table()))
    assert tuning.file_problem(path) is None


def test_tuner_tries_every_combination_of_the_documented_parameters():
    got = tune.candidates("pre_forward")
    assert len(got) == len(tuning.PARAMS["pre_forward"]["cluster"]) * len(tuning.PARAMS["pre_forward"]["tile"])
    assert (("cluster", 16), ("tile", 16)) in got


@pytest.mark.parametrize("C, tokens, cluster, tile", [
    (1024, 4096, 4, 32),   # docs/TUNING.md: slices of 256-512 channels for many tokens (measured: C = 1024 -> 4)
    (4096, 4096, 8, 32),   # C = 4096 -> 8
    (7168, 16384, 16, 32),
    (1024, 16, 16, 16),    # decode: 16 slices, 16-token tiles
    (512, 200, 8, 32),     # keeps >= 64 channels per slice
])
def test_heuristic_mirrors_the_kernel_defaults(C, tokens, cluster, tile):
    assert tune.heuristic("pre_forward", C, tokens) == (("cluster", cluster), ("tile", tile))


def test_token_ranges_cover_every_count_once():
    ranges = tune.token_ranges([4096, 64, 1024, 16384])
    assert ranges == {64: [None, 256], 1024: [257, 2048], 4096: [2049, 8192], 16384: [8193, None]}
    assert tune.token_ranges([512]) == {512: [None, None]}


def _result(op, C, tokens, best, gain):
    default = tune.heuristic(op, C, tokens)
    best = default if best is None else best
    return tune.Result(op, C, tokens, default, 10.0 * gain, best, 10.0)


def test_entries_only_for_choices_that_beat_the_heuristic():
    faster = (("cluster", 8), ("tile", 16))
    results = [_result("pre_forward", 1024, 64, None, 1.0), _result("pre_forward", 1024, 4096, faster, 1.2),
               _result("post_pre_forward", 4096, 64, faster, 1.5)]
    entries = tune.entries_for(results, 4, "bfloat16")
    assert entries == [
        {"op": "post_pre_forward", "n": 4, "dtype": "bfloat16", "C": 4096, "tokens": [None, None],
         "params": {"cluster": 8, "tile": 16}},
        {"op": "pre_forward", "n": 4, "dtype": "bfloat16", "C": 1024, "tokens": [513, None],
         "params": {"cluster": 8, "tile": 16}},
    ]
    t = tuning.make_table(entries, device="GPU")
    kw = dict(n=4, dtype="bfloat16", device="GPU")
    assert tuning.lookup(t, "pre_forward", "cluster", C=1024, tokens=8192, **kw) == 8
    assert tuning.lookup(t, "pre_forward", "cluster", C=1024, tokens=64, **kw) is None  # the heuristic stays


def test_a_retune_replaces_the_entries_of_its_shapes_and_keeps_the_others():
    old = tuning.make_table([
        tuning.make_entry("pre_forward", {"cluster": 2}, n=4, dtype="bfloat16", C=1024, tokens=[None, 100]),
        tuning.make_entry("pre_forward", {"cluster": 2}, n=4, dtype="bfloat16", C=2048),
        tuning.make_entry("pre_forward", {"cluster": 2}, n=8, dtype="bfloat16", C=1024),
        tuning.make_entry("pre_forward", {"cluster": 2}, n=4, dtype="bfloat16", C=[1, 99999]),
    ], device="GPU")
    new = [tuning.make_entry("pre_forward", {"cluster": 16}, n=4, dtype="bfloat16", C=1024)]
    merged = tune.merged_table(new, old, "GPU", 4, "bfloat16", {("pre_forward", 1024)})
    assert merged["entries"] == new + old["entries"][1:]
    assert tune.merged_table(new, old, "Other GPU", 4, "bfloat16", set())["entries"] == new  # another GPU's file


def test_tune_main_writes_the_file_the_library_reads(tmp_path, monkeypatch, capsys):
    # The command's flow with the GPU measurement replaced: what it prints, writes and merges.
    import types

    path = tmp_path / "tuning.json"
    monkeypatch.setenv("MHC_TUNING_FILE", str(path))
    monkeypatch.setenv("MHC_CUDA_PRE", "cluster")  # the cluster kernels' parameters; the stream path: below
    tuning.save(tuning.make_table([tuning.make_entry("pre_forward", {"cluster": 2}, n=4, dtype="bfloat16", C=512)],
                                  device="Fake GPU"), path)
    monkeypatch.setattr(tune, "why_not_runnable", lambda: None)
    props = types.SimpleNamespace(name="Fake GPU", major=9, minor=0, L2_cache_size=50 << 20)
    monkeypatch.setattr(tune.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(tune.torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(tune.torch.cuda, "empty_cache", lambda: None)
    faster = (("cluster", 16), ("tile", 16))

    def fake_tune_shape(op, n, C, T, dtype, tolerance, min_gain, l2):
        assert (n, dtype, tolerance, min_gain, l2) == (4, "bfloat16", 0.0, 0.03, 50 << 20)
        wins = op == "pre_forward" and T == 4096
        return tune.Result(op, C, T, tune.heuristic(op, C, T), 12.0 if wins else 10.0,
                           faster if wins else tune.heuristic(op, C, T), 10.0, {faster: 1e-7} if T == 64 else {})

    monkeypatch.setattr(tune, "tune_shape", fake_tune_shape)
    assert tune.main(["--quick", "--json", str(tmp_path / "all.json")]) == 0
    out = capsys.readouterr().out
    assert "chose cluster=16,tile=16 10.00 us (1.20x)" in out and "1 rejected (outputs differ by up to 1e-07)" in out
    assert "2 of 8 shapes beat the heuristic" in out and f"to {path}" in out
    written = tuning.load(path)
    assert written["device"] == "Fake GPU"
    assert [(e["op"], e["C"], e.get("tokens")) for e in written["entries"]] == [
        ("pre_forward", 1024, [513, None]), ("pre_forward", 4096, [513, None]), ("pre_forward", 512, None)]
    assert len(json.loads((tmp_path / "all.json").read_text())) == 8
    assert tune.main(["--quick", "--dry-run"]) == 0 and "nothing written" in capsys.readouterr().out


def test_tuner_sweeps_the_parameters_of_the_kernel_path_the_library_takes(monkeypatch):
    monkeypatch.delenv("MHC_CUDA_PRE", raising=False)
    assert tune.kernel_path("bfloat16", 4) == "stream" and tune.kernel_path("float16", 8) == "stream"
    assert tune.kernel_path("float32", 4) == "cluster" and tune.kernel_path("bfloat16", 16) == "cluster"
    monkeypatch.setenv("MHC_CUDA_PRE", "cluster")
    assert tune.kernel_path("bfloat16", 4) == "cluster"
    got = tune.candidates("pre_forward", "stream")
    assert len(got) == 12 and all(dict(p).keys() == {"stream_tile", "stream_group"} for p in got)
    # src/cuda/pre_stream.cu's defaults: 16-token tiles up to 32 tokens, 64 below 512, then 128; groups of up to 8
    # tokens while that leaves 4 blocks per SM.
    assert tune.heuristic("pre_forward", 4096, 16, "stream", 132) == (("stream_group", 1), ("stream_tile", 16))
    assert tune.heuristic("pre_forward", 4096, 256, "stream", 132) == (("stream_group", 1), ("stream_tile", 64))
    assert tune.heuristic("pre_forward", 4096, 16384, "stream", 132) == (("stream_group", 8), ("stream_tile", 128))
    assert tune.heuristic("pre_forward", 4096, 1100, "stream", 132) == (("stream_group", 2), ("stream_tile", 128))
