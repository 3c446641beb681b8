"""The repository ships the license pyproject.toml declares (MIT, held by the mhc authors)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_license_file_is_the_mit_text_pyproject_declares():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 The mhc authors" in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
