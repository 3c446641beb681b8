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
