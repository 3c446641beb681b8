"""The CUDA backend through the PyTorch layer: parity with the C++ CPU reference and with fp64 autograd of
mhc.reference at shapes that take the fused kernels (n in {2, 4, 8}, C a multiple of 8, several token
tiles and cluster slices) and the generic ones (odd n or C), bit-identical repeats, torch.compile
(fullgraph) and CUDA graph capture of forward + backward. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from mhc import ops
from mhc import reference as ref
from conftest import coef, requires_cuda, site_params

pytestmark = requires_cuda

# (n, C, T): fused pre (several tiles, tails of cluster slices), decode, generic paths.
SHAPES = [(4, 1024, 300), (4, 136, 7), (2, 64, 70), (8, 512, 40), (4, 4096, 1), (3, 37, 5), (1, 40, 9)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# norm-relative error bound of a stream output stored in the dtype, and of fp32 coefficients
STREAM_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 2e-5, torch.float64: 1e-10}
COEF_TOL = 1e-4


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    assert not torch.isnan(got).any(), "NaN in the output (an element left unwritten?)"
    got, want = got.double().cpu(), want.double().cpu()
    den = want.norm().item()
    return (got - want).norm().item() / (den if den > 0 else 1.0)


def inputs(n, C, T, dtype, *, grad=False):
    x = torch.randn(T, n, C, device="cuda").to(dtype)
    fn, base, scale = site_params(n, C, device="cuda")
    y = torch.randn(T, C, device="cuda").to(dtype)
    if grad:
        for t in (x, fn, base, scale, y):
            t.requires_grad_(True)
    return x, y, fn, base, scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, C, T", SHAPES)
def test_pre_post_pre_match_cpu_reference(n, C, T, dtype):
    x, y, fn, base, scale = inputs(n, C, T, dtype)
    got = ops.mhc_pre(x, fn, base, scale)
    got_pp = ops.mhc_post_pre(x, y, got[2], got[3], fn, base, scale)
    cpu = [t.cpu() for t in (x, y, fn, base, scale)]
    with ops.use_backend("reference"):
        want = ops.mhc_pre(cpu[0], *cpu[2:])
        want_pp = ops.mhc_post_pre(cpu[0], cpu[1], got[2].cpu(), got[3].cpu(), *cpu[2:])
    for name, g, w in zip(["layer_input", "h_pre", "h_post", "comb"], got, want):
        tol = STREAM_TOL[dtype] if name == "layer_input" else COEF_TOL
        assert rel(g, w) <= tol, f"pre {name}: {rel(g, w):.2e}"
    for name, g, w in zip(["x_next", "layer_input", "h_pre", "h_post", "comb"], got_pp, want_pp):
        tol = STREAM_TOL[dtype] if name in ("x_next", "layer_input") else COEF_TOL
        assert rel(g, w) <= tol, f"post_pre {name}: {rel(g, w):.2e}"


def site(lib, x, y, fn, base, scale):
    """pre -> F -> post with F(u) = u * y (so y gets a gradient and layer_input's is not trivial)."""
    layer_input, h_pre, h_post, comb = lib.mhc_pre(x, fn, base, scale)
    out = layer_input * y
    return lib.mhc_post(x, out, h_post, comb), h_pre


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, C, T", SHAPES)
def test_site_gradients_match_fp64_autograd(n, C, T, dtype):
    x, y, fn, base, scale = inputs(n, C, T, dtype, grad=True)
    g = torch.randn(T, n, C, device="cuda").to(dtype)
    g_h = torch.randn(T, n, device="cuda")
    out, h_pre = site(ops, x, y, fn, base, scale)
    got = torch.autograd.grad((out, h_pre), (x, y, fn, base, scale), (g, g_h))
    leaves = [t.detach().double().requires_grad_(True) for t in (x, y, fn, base, scale)]
    out64, h64 = site(ref, *leaves)
    want = torch.autograd.grad((out64, h64), leaves, (g.double(), g_h.double()))
    for name, gg, ww, tol in zip(["x", "y", "fn", "base", "scale"], got, want,
                                 [STREAM_TOL[dtype], STREAM_TOL[dtype], 1e-3, 1e-3, 1e-3]):
        # bf16/f16 forward outputs are rounded before the backward sees them; the parameter
        # gradients inherit that rounding, hence the looser bound for 16-bit streams.
        bound = tol if dtype == torch.float32 or name in ("x", "y") else 3e-2
        assert rel(gg, ww) <= bound, f"grad {name}: {rel(gg, ww):.2e}"


@pytest.mark.parametrize("n, C, T", [(4, 1024, 300), (8, 136, 33), (3, 37, 5)])
def test_repeated_runs_are_bit_identical(n, C, T):
    x, y, fn, base, scale = inputs(n, C, T, torch.bfloat16, grad=True)
    g = torch.randn(T, n, C, device="cuda").to(torch.bfloat16)

    def run():
        out, _ = site(ops, x, y, fn, base, scale)
        return [out.detach()] + list(torch.autograd.grad(out, (x, y, fn, base, scale), g))

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_sinkhorn_head_expand_residual_match_cpu_reference():
    for n, C, T in [(4, 1024, 50), (8, 64, 7), (5, 33, 3)]:
        logits = torch.randn(T, n, n, device="cuda", requires_grad=True)
        x = torch.randn(T, n, C, device="cuda", dtype=torch.bfloat16)
        fn, base, scale = site_params(n, C, device="cuda", head=True)
        h_pre = torch.rand(T, n, device="cuda")
        got = [ops.sinkhorn(logits), ops.mhc_head(x, fn, base, scale), ops.expand_streams(x[:, 0], n),
               *ops.residual_add_agg(x, x, h_pre)]
        with ops.use_backend("reference"):
            want = [ops.sinkhorn(logits.detach().cpu()), ops.mhc_head(x.cpu(), fn.cpu(), base.cpu(), scale.cpu()),
                    ops.expand_streams(x[:, 0].cpu(), n), *ops.residual_add_agg(x.cpu(), x.cpu(), h_pre.cpu())]
        for name, g, w in zip(["sinkhorn", "head", "expand", "x_out", "agg"], got, want):
            tol = COEF_TOL if name == "sinkhorn" else STREAM_TOL[torch.bfloat16]
            assert rel(g.detach(), w) <= tol, f"{name} n={n}: {rel(g.detach(), w):.2e}"
        gl = torch.randn(T, n, n, device="cuda")
        (got_grad,) = torch.autograd.grad(ops.sinkhorn(logits), logits, gl)
        l64 = logits.detach().double().requires_grad_(True)
        (want_grad,) = torch.autograd.grad(ref.sinkhorn(l64), l64, gl.double())
        assert rel(got_grad, want_grad) <= COEF_TOL


# The wave pre (x read from device memory once): MHC_CUDA_PRE=wave runs it at any token count (off by default).
WAVE_SHAPES = [(4, 1024, 600), (2, 64, 70), (4, 4096, 1), (4, 136, 7), (4, 1024, 4300), (2, 512, 2051)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, C, T", WAVE_SHAPES)
def test_wave_pre_matches_cpu_reference(n, C, T, dtype, monkeypatch):
    monkeypatch.setenv("MHC_CUDA_PRE", "wave")
    check_pre_and_post_pre(n, C, T, dtype)


def check_pre_and_post_pre(n, C, T, dtype):
    """pre and post_pre on the GPU against the fp64 CPU reference (post_pre's pre judged on x_next as stored), and a
    repeated pre bit-identical."""
    x, y, fn, base, scale = inputs(n, C, T, dtype)
    got = ops.mhc_pre(x, fn, base, scale)
    again = ops.mhc_pre(x, fn, base, scale)
    got_pp = ops.mhc_post_pre(x, y, got[2], got[3], fn, base, scale)
    cpu = [t.cpu() for t in (x, fn, base, scale)]
    with ops.use_backend("reference"):
        want = ops.mhc_pre(*cpu)
        want_pp = ops.mhc_pre(got_pp[0].cpu(), *cpu[1:])  # the pre of post_pre reads x_next as stored
    for name, g, w, g2, gp, wp in zip(["layer_input", "h_pre", "h_post", "comb"], got, want, again, got_pp[1:],
                                      want_pp):
        tol = STREAM_TOL[dtype] if name == "layer_input" else COEF_TOL
        assert rel(g, w) <= tol, f"pre {name}: {rel(g, w):.2e}"
        assert torch.equal(g, g2), f"pre {name}: repeat differs"
        assert rel(gp, wp) <= tol, f"post_pre {name}: {rel(gp, wp):.2e}"


def captured_pre(x, fn, base, scale):
    """mhc_pre captured in a CUDA graph after a warm-up on a side stream: (graph, its outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.mhc_pre(x, fn, base, scale)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.mhc_pre(x, fn, base, scale)
    return graph, captured


def test_wave_pre_runs_when_selected_and_replays_in_a_cuda_graph(monkeypatch):
    monkeypatch.setenv("MHC_CUDA_PRE", "wave")
    n, C, T = 4, 4096, 1100
    x, _, fn, base, scale = inputs(n, C, T, torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        eager = ops.mhc_pre(x, fn, base, scale)
        torch.cuda.synchronize()
    assert any("pre_wave_kernel" in e.key for e in prof.key_averages()), "MHC_CUDA_PRE=wave did not run the wave pre"
    with ops.use_backend("reference"):
        want = ops.mhc_pre(*[t.cpu() for t in (x, fn, base, scale)])
    for name, g, w in zip(["layer_input", "h_pre", "h_post", "comb"], eager, want):
        assert rel(g, w) <= (STREAM_TOL[torch.bfloat16] if name == "layer_input" else COEF_TOL), name
    monkeypatch.setenv("MHC_CUDA_PRE", "stream")
    stream = ops.mhc_pre(x, fn, base, scale)
    monkeypatch.setenv("MHC_CUDA_PRE", "wave")
    # the streaming pre sums the split-K partials in another order: equal to within fp32 rounding
    assert rel(eager[1], stream[1]) <= 1e-5

    graph, captured = captured_pre(x, fn, base, scale)
    for _ in range(2):  # the counters are zeroed inside the graph: every replay runs afresh
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, eager):
            assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["direct", "direct-fragment", "ring"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, C, T", WAVE_SHAPES)
def test_pre_projections_match_cpu_reference(n, C, T, dtype, path, monkeypatch):
    # MHC_CUDA_PRE=direct: the direct projection at every size (its default loads of whole rows shuffled into
    # fragments; -fragment: loads in fragment order); ring: the ring projection (the default below 1024 tokens)
    monkeypatch.setenv("MHC_CUDA_PRE", path.split("-")[0])
    if path.endswith("fragment"):
        monkeypatch.setenv("MHC_CUDA_DIRECT_LOADS", "fragment")
    check_pre_and_post_pre(n, C, T, dtype)


def test_direct_projection_is_the_default_from_1024_tokens_and_replays_in_a_cuda_graph(monkeypatch):
    monkeypatch.delenv("MHC_CUDA_PRE", raising=False)
    n, C, T = 4, 4096, 1100
    x, _, fn, base, scale = inputs(n, C, T, torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        eager = ops.mhc_pre(x, fn, base, scale)
        torch.cuda.synchronize()
    assert any("project_direct_kernel" in e.key for e in prof.key_averages()), "the default did not project directly"
    monkeypatch.setenv("MHC_CUDA_PRE", "ring")
    ring = ops.mhc_pre(x, fn, base, scale)
    monkeypatch.delenv("MHC_CUDA_PRE")
    assert rel(eager[1], ring[1]) <= 1e-5  # other split-K partials: equal to within fp32 rounding
    graph, captured = captured_pre(x, fn, base, scale)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


def test_compile_fullgraph_and_cuda_graph_replay_match_eager():
    n, C, T = 4, 512, 64
    x, y, fn, base, scale = inputs(n, C, T, torch.bfloat16, grad=True)
    g = torch.randn(T, n, C, device="cuda").to(torch.bfloat16)

    def step():
        # Fresh leaves per call: autograd nodes made on another stream must not outlive a capture.
        leaves = [t.detach().requires_grad_(True) for t in (x, y, fn, base, scale)]
        out, _ = site(ops, *leaves)
        return [out] + list(torch.autograd.grad(out, leaves, g))

    eager = [t.detach().clone() for t in step()]

    compiled_site = torch.compile(lambda *a: site(ops, *a)[0], fullgraph=True)
    out = compiled_site(x, y, fn, base, scale)
    grads = torch.autograd.grad(out, (x, y, fn, base, scale), g)
    for name, a, b in zip(["out", "grad_x", "grad_y", "grad_fn", "grad_base", "grad_scale"], [out] + list(grads),
                          eager):
        # Eager autograd pairs the site's pre and post and accumulates grad_x once, in fp32 (mhc.ops); compiled
        # graphs add the two bf16 halves, one rounding more. Everything else runs the same kernels.
        tol = STREAM_TOL[torch.bfloat16] if name == "grad_x" else 1e-6
        assert rel(a.detach(), b) <= tol, f"{name}: {rel(a.detach(), b):.2e}"

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a.detach(), b)
