"""Shared fixtures of the Python tests: devices, backends, random inputs, tolerances."""

from __future__ import annotations

import os

import pytest
import torch

import mhc
from mhc import ops

HAS_CUDA = torch.cuda.is_available() and mhc._C.cuda_device_count() > 0
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and an mhc build with CUDA")

# Every place an op can run: (device, backend). CPU has two backends, compared against each other
# and against mhc.reference; the CUDA case is skipped cleanly without a GPU.
# Use as @pytest.mark.parametrize("device, backend", TARGETS).
TARGETS = [
    pytest.param("cpu", "reference", id="cpu-reference"),
    pytest.param("cpu", "fast", id="cpu-fast"),
    pytest.param("cuda", "auto", id="cuda", marks=requires_cuda),
]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]

# |got - want| <= atol + rtol * |want| per element, by the dtype of the compared tensor.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
}


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (or set MHC_RUN_SLOW=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes on a 2-core CPU; run with --run-slow or MHC_RUN_SLOW=1")


def _run_slow(config) -> bool:
    return config.getoption("--run-slow") or os.environ.get("MHC_RUN_SLOW") == "1"


def pytest_runtest_setup(item):
    # Also sees markers applied inside the test's parametrisation or by request.applymarker in a fixture.
    if item.get_closest_marker("slow") and not _run_slow(item.config):
        pytest.skip("slow: run with --run-slow or MHC_RUN_SLOW=1")


@pytest.fixture(autouse=True)
def _poison_and_seed():
    """NaN-fill every op output before the op runs (unwritten elements show) and fix the seed."""
    previous = mhc._plumbing.poison_outputs
    mhc._plumbing.set_poison_outputs(True)
    torch.manual_seed(0)
    yield
    mhc._plumbing.set_poison_outputs(previous)


def coef(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def site_params(n: int, C: int, *, dtype=torch.float32, device="cpu", static=False, head=False):
    """Random parameters of a site (or a head) with O(1) logits, so Sinkhorn and the sigmoids are exercised
    away from both the uniform and the saturated regime."""
    rows = n if head else n * n + 2 * n
    fn = None if static else torch.randn(rows, n * C, dtype=dtype, device=device) / (n * C) ** 0.5
    base = torch.randn(rows, dtype=dtype, device=device)
    scale = None if static else torch.rand(1 if head else 3, dtype=dtype, device=device) + 0.5
    return fn, base, scale


def coefficients(lead, n, *, dtype=torch.float32, device="cpu"):
    """Valid per-token (h_pre, h_post, comb) for post / residual_add_agg inputs."""
    h_pre = torch.rand(*lead, n, dtype=dtype, device=device) + 0.1
    h_post = 2 * torch.rand(*lead, n, dtype=dtype, device=device)
    comb = mhc.reference.sinkhorn(torch.randn(*lead, n, n, dtype=dtype, device=device))
    return h_pre, h_post, comb


def assert_close(got, want, dtype=None, name=""):
    """Compare with the tolerance of `dtype` (default: got's dtype); want may have higher precision."""
    tol = TOL[dtype or got.dtype]
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in the output (an element left unwritten?)"
    torch.testing.assert_close(got.double(), want.double(), **tol, msg=lambda m: f"{name}: {m}")
