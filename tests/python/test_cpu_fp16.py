"""fp16 on the CPU: the extension converts with F16C or its own exact integer code, never libgcc's
soft-float helpers (which made fp16 4-20x slower than bf16), and the fp16 results are torch's rounding of
the same fp32 arithmetic, bit for bit (the conversions themselves are tested exhaustively in C++:
tests/cpp/test_f16_conversion.cpp)."""

from __future__ import annotations

import platform

import pytest
import torch

import mhc
from mhc import ops


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="libgcc's fp16 helpers are x86-64's")
def test_extension_does_not_call_libgcc_soft_fp16_conversions():
    with open(mhc._C.__file__, "rb") as f:
        binary = f.read()
    for helper in (b"__extendhfsf2", b"__truncsfhf2"):
        assert helper not in binary, f"{helper.decode()} is linked: fp16 converts through libgcc's soft float"


HALF_CASES = [(4099, 3.0), (4099, 1e-4), (17, 6e4)]  # odd sizes (vector body + tail); subnormals; near overflow


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("N, magnitude", HALF_CASES)
def test_fp16_history_mix_rounds_like_torch(backend, N, magnitude):
    torch.manual_seed(N)
    x = (torch.randn(N) * magnitude).to(torch.float16)
    h = (torch.randn(N) * magnitude).to(torch.float16)
    with ops.use_backend(backend):
        out = ops.history_mix(x, [h], torch.ones(1))
    want = (x.float() + h.float()).to(torch.float16)  # fp32 sum, rounded once
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("N, magnitude", HALF_CASES)
def test_fp16_post_rounds_like_torch(backend, N, magnitude):
    torch.manual_seed(N + 1)
    x = (torch.randn(3, 1, N) * magnitude).to(torch.float16)
    y = (torch.randn(3, N) * magnitude).to(torch.float16)
    with ops.use_backend(backend):
        out = ops.mhc_post(x, y, torch.ones(3, 1), torch.ones(3, 1, 1))
    want = (y.float() + x[:, 0].float()).to(torch.float16).unsqueeze(1)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
