"""Multi-history skip ops (mhc.history_ops): values and gradients against plain PyTorch in fp64, gradcheck,
opcheck, dtype pairs, the zero-weight rule, errors, torch.compile, and on CUDA: no host sync, CUDA graphs."""

from __future__ import annotations

import pytest
import torch

import mhc
from mhc import history_ops as hops
from mhc import ops

from conftest import HAS_CUDA, TARGETS, TOL, requires_cuda

CONSTRAINTS = ["simplex", "softmax", "identity"]


@pytest.fixture(autouse=True)
def _poison():
    previous = mhc._plumbing.poison_outputs
    mhc._plumbing.set_poison_outputs(True)
    yield
    mhc._plumbing.set_poison_outputs(previous)


def _close(got, want, dtype=None):
    tol = TOL[dtype or got.dtype]
    torch.testing.assert_close(got.to(want.dtype), want, **tol)


def _coarser(a, b):
    return a if torch.finfo(a).eps > torch.finfo(b).eps else b


def _coef_tol(stream):
    # Weight gradients are dot products with grad_out, which arrives rounded to the stream dtype.
    if stream == torch.float64:
        return dict(rtol=1e-9, atol=1e-9)
    return dict(rtol=1e-4, atol=1e-4) if stream == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def _rand(*shape, dtype=torch.float32, device="cpu", grad=False):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)


# ---- project_logits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("constraint", CONSTRAINTS + ["doubly_stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_project_logits_matches_reference(device, backend, constraint, dtype):
    shape = (3, 5, 5) if constraint == "doubly_stochastic" else (4, 7)
    logits = _rand(*shape, dtype=torch.float64, device=device) * 2
    kw = dict(temperature=0.75, epsilon=0.2, sinkhorn_iters=8)
    z = logits.to(dtype).detach().clone().requires_grad_()
    with ops.use_backend(backend):
        w = hops.project_logits(z, constraint, **kw)
    zr = logits.detach().clone().requires_grad_()
    wr = hops.reference_project_logits(zr, constraint, **kw)
    _close(w, wr.to(dtype))
    g = torch.randn_like(wr)
    (w * g.to(dtype)).sum().backward()
    (wr * g).sum().backward()
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z.grad.double(), zr.grad, **tol)
    if constraint != "doubly_stochastic":
        torch.testing.assert_close(w.sum(-1).double(), torch.ones(shape[:-1], dtype=torch.float64, device=device),
                                   rtol=1e-6, atol=1e-6)
    if constraint == "identity":
        assert (w[..., 0] >= 0.2 - 1e-6).all()


def test_sparsemax_exact_zeros_and_one_hot():
    w = hops.project_logits(torch.tensor([[3.0, 1.0, 0.2, -1.0], [0.5, 0.0, 0.0, -0.4]]))
    assert w[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert w[1, 3].item() == 0.0
    torch.testing.assert_close(w[1, :3], torch.tensor([2 / 3, 1 / 6, 1 / 6]))


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("constraint", CONSTRAINTS + ["doubly_stochastic"])
def test_project_logits_gradcheck(device, backend, constraint):
    shape = (2, 3, 3) if constraint == "doubly_stochastic" else (2, 5)
    z = _rand(*shape, dtype=torch.float64, device=device, grad=True)
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: hops.project_logits(t, constraint, temperature=0.5,
                                                                      sinkhorn_iters=4), (z,))


# ---- history_mix ------------------------------------------------------------------------------------

PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
         (torch.float16, torch.float16), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
         (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("stream, storage", PAIRS)
@pytest.mark.parametrize("shape, rows", [((2, 5, 7), None), ((2, 3, 4, 4), None), ((33,), 3)])
def test_history_mix_values_and_grads(device, backend, stream, storage, shape, rows):
    H = 4
    x64 = _rand(*((rows,) if rows else ()), *shape, dtype=torch.float64, device=device)
    s64 = _rand(H, *shape, dtype=torch.float64, device=device)
    w64 = torch.rand(*((rows,) if rows else ()), H, dtype=torch.float64, device=device)
    w64[..., 1] = 0.0  # a zero weight: not read, still gets its gradient
    gate64 = torch.tensor([0.8], dtype=torch.float64, device=device)
    x = x64.to(stream).requires_grad_()
    states = s64.to(storage).requires_grad_()
    w = w64.float().requires_grad_() if stream != torch.float64 else w64.clone().requires_grad_()
    gate = gate64.to(w.dtype).requires_grad_()
    with ops.use_backend(backend):
        out = hops.history_mix(x, states, w, gate=gate)
    assert out.dtype == stream and out.shape == x.shape
    # The oracle: plain PyTorch in fp64 on the same (rounded) inputs.
    xr, sr, wr, gr = (t.detach().double().requires_grad_() for t in (x, states, w, gate))
    ref = hops.reference_history_mix(xr, sr, wr, gate=gr)
    _close(out, ref.to(stream))
    g = torch.randn_like(ref)
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    _close(x.grad, xr.grad.to(stream))
    _close(states.grad, sr.grad.to(storage), dtype=_coarser(stream, storage))
    coef_tol = _coef_tol(stream)
    torch.testing.assert_close(w.grad.double(), wr.grad, **coef_tol)
    torch.testing.assert_close(gate.grad.double(), gr.grad, **coef_tol)


@pytest.mark.parametrize("device, backend", TARGETS)
def test_history_mix_gradcheck(device, backend):
    x = _rand(3, 5, dtype=torch.float64, device=device, grad=True)
    states = _rand(3, 3, 5, dtype=torch.float64, device=device, grad=True)
    w = _rand(3, dtype=torch.float64, device=device, grad=True)
    wm = _rand(2, 3, dtype=torch.float64, device=device, grad=True)
    gate = _rand(1, dtype=torch.float64, device=device, grad=True)
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, b, c, d: hops.history_mix(a, b, c, gate=d), (x, states, w, gate))
        assert torch.autograd.gradcheck(lambda b, c: hops.history_mix(None, b, c), (states, wm))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_history_mix_list_of_states_and_zero_weights_not_read(device):
    x = _rand(4, 9, device=device)
    states = [_rand(4, 9, device=device), torch.full((4, 9), float("nan"), device=device), _rand(4, 9, device=device)]
    w = torch.tensor([0.25, 0.0, 0.75], device=device)
    out = hops.history_mix(x, states, w)
    torch.testing.assert_close(out, x + 0.25 * states[0] + 0.75 * states[2])
    one_hot = hops.history_mix(x, states, torch.tensor([0.0, 0.0, 1.0], device=device))
    assert torch.equal(one_hot, x + states[2])  # exactly a residual add


# ---- history_skip (fused) ---------------------------------------------------------------------------


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("constraint", CONSTRAINTS)
@pytest.mark.parametrize("stream, storage", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_history_skip_matches_project_then_mix(device, backend, constraint, stream, storage):
    H, shape = 5, (2, 6, 11)
    x = _rand(*shape, dtype=stream, device=device, grad=True)
    states = _rand(H, *shape, dtype=storage, device=device, grad=True)
    coef = torch.float64 if stream == torch.float64 else torch.float32
    logits = (torch.randn(H, dtype=coef, device=device) * 1.5).requires_grad_()
    gate = torch.tensor([1.3], dtype=coef, device=device, requires_grad=True)
    kw = dict(constraint=constraint, temperature=0.75, epsilon=0.25)
    with ops.use_backend(backend):
        out, w = hops.history_skip(x, states, logits, gate=gate, **kw)
    leaves = [t.detach().double().requires_grad_() for t in (x, states, logits, gate)]
    wr = hops.reference_project_logits(leaves[2], constraint, temperature=0.75, epsilon=0.25)
    ref = hops.reference_history_mix(leaves[0], leaves[1], wr, gate=leaves[3])
    _close(out, ref.to(stream))
    torch.testing.assert_close(w.double(), wr.detach(), rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    _close(x.grad, leaves[0].grad.to(stream))
    _close(states.grad, leaves[1].grad.to(storage), dtype=_coarser(stream, storage))
    for got, want in zip((logits, gate), leaves[2:]):
        torch.testing.assert_close(got.grad.double(), want.grad, **_coef_tol(stream))


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("constraint", CONSTRAINTS)
def test_history_skip_gradcheck(device, backend, constraint):
    x = _rand(2, 7, dtype=torch.float64, device=device, grad=True)
    states = _rand(4, 2, 7, dtype=torch.float64, device=device, grad=True)
    logits = torch.tensor([0.6, 0.1, -0.3, 0.25], dtype=torch.float64, device=device, requires_grad=True)
    gate = torch.tensor([0.9], dtype=torch.float64, device=device, requires_grad=True)
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda a, b, c, d: hops.history_skip(a, b, c, gate=d, constraint=constraint, temperature=0.5)[0],
            (x, states, logits, gate))


def test_detached_states_get_no_gradient_but_logits_do():
    x = _rand(3, 4, grad=True)
    states = _rand(3, 3, 4)  # constants
    logits = torch.zeros(3, requires_grad=True)
    out, _ = hops.history_skip(x, states, logits, constraint="softmax")
    out.square().sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, 2 * out.detach())


def test_opcheck():
    x = _rand(2, 8)
    states = [_rand(2, 8) for _ in range(3)]
    logits = torch.randn(3)
    w = torch.rand(3)
    cases = [
        (torch.ops.mhc.project_logits.default, (logits.view(1, 3), "simplex", 1.0, 0.1, 20, 1e-6, "auto")),
        (torch.ops.mhc.history_mix.default, (x, states, w, None, "auto")),
        (torch.ops.mhc.history_skip.default, (x, states, logits, torch.ones(1), "softmax", 1.0, 0.1, "auto")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_opcheck_backwards():
    # The backwards, and the *_per_state_backward ones (one need flag per state) that the eager backwards call.
    g = _rand(2, 8)
    states = [_rand(2, 8) for _ in range(3)]
    logits, w, gate = torch.randn(3), torch.rand(3), torch.ones(1)
    weights = hops.project_logits(logits, "softmax")
    skip = ("softmax", 1.0, 0.1, "auto")
    mix_per_state = torch.ops.mhc.history_mix_per_state_backward.default
    skip_per_state = torch.ops.mhc.history_skip_per_state_backward.default
    cases = [
        (torch.ops.mhc.project_logits_backward.default, (logits.view(1, 3), weights.view(1, 3), g[:1, :3].contiguous(),
                                                         "softmax", 1.0, 0.1, 20, 1e-6, "auto")),
        (torch.ops.mhc.history_mix_backward.default, (g, states, w, gate, True, "auto")),
        (mix_per_state, (g, states, w, None, [True, False, True], "auto")),
        (mix_per_state, (g, states, w, gate, [False] * 3, "auto")),
        (torch.ops.mhc.history_skip_backward.default, (g, states, logits, weights, None, False, *skip)),
        (skip_per_state, (g, states, logits, weights, gate, [False, True, False], *skip)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    grad_w, _, grad_states = mix_per_state(g, states, w, None, [True, False, True], "auto")
    full_w, _, full_states = torch.ops.mhc.history_mix_backward(g, states, w, None, True, "auto")
    assert torch.equal(grad_w, full_w) and grad_states[1] is None
    assert torch.equal(grad_states[0], full_states[0]) and torch.equal(grad_states[2], full_states[2])


@pytest.mark.parametrize("gated", [False, True])
def test_eager_function_and_custom_op_agree(gated):
    # Eager calls take a torch.autograd.Function to the kernels; compile and fake tensors take the custom op.
    x = _rand(3, 7, grad=True)
    states = [_rand(3, 7, grad=True) for _ in range(4)]
    logits = torch.tensor([0.4, 0.1, -0.2, 0.3], requires_grad=True)
    gate = torch.tensor([0.7], requires_grad=True) if gated else None
    leaves = [x, *states, logits] + ([gate] if gated else [])
    out, w = hops.history_skip(x, states, logits, gate=gate)
    g1 = torch.autograd.grad(out.square().sum(), leaves)
    out2, w2 = torch.ops.mhc.history_skip(x, states, logits, gate, "simplex", 1.0, 0.1, "auto")
    g2 = torch.autograd.grad(out2.square().sum(), leaves)
    assert torch.equal(out, out2) and torch.equal(w, w2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    weights = torch.rand(4, requires_grad=True)
    m1 = hops.history_mix(x, states, weights, gate=gate)
    m2 = torch.ops.mhc.history_mix(x, states, weights, gate, "auto")
    assert torch.equal(m1, m2)
    for a, b in zip(torch.autograd.grad(m1.sum(), [weights, *states]), torch.autograd.grad(m2.sum(), [weights, *states])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("constraint", CONSTRAINTS)
def test_common_case_and_checked_path_agree(constraint):
    # A list of states with float hyper-parameters takes history_skip's one-test common case; a tuple of states and
    # an int temperature take the checked path. Same kernels, so the same bits, detached states included.
    x = _rand(2, 3, 5, grad=True)
    states = [_rand(2, 3, 5, grad=True), _rand(2, 3, 5), _rand(2, 3, 5, grad=True)]
    logits = torch.tensor([0.4, -0.3, 0.2], requires_grad=True)
    leaves = [x, states[0], states[2], logits]
    results = []
    for given, temperature in ((list(states), 2.0), (tuple(states), 2)):
        out, w = hops.history_skip(x, given, logits, constraint=constraint, temperature=temperature, epsilon=0.25)
        results.append((out, w, *torch.autograd.grad(out.square().sum(), leaves)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(hops.history_skip(x, states, logits, constraint=constraint, temperature=2.0)[0],
                           hops.history_skip(x, tuple(states), logits, constraint=constraint, temperature=2)[0])


def test_compile_fullgraph_forward_and_backward():
    def f(x, states, logits, w):
        out, _ = hops.history_skip(x, states, logits, constraint="simplex")
        return hops.history_mix(out, states, hops.project_logits(w, "softmax"))

    x = _rand(2, 5, 6, grad=True)
    states = _rand(3, 2, 5, 6)
    logits = torch.tensor([0.5, 0.0, -0.2], requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    eager = f(x, states, logits, w)
    eager.sum().backward()
    grads = [x.grad.clone(), logits.grad.clone(), w.grad.clone()]
    for t in (x, logits, w):
        t.grad = None
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, states, logits, w)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager)
    for got, want in zip((x.grad, logits.grad, w.grad), grads):
        torch.testing.assert_close(got, want)


# ---- errors -----------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x = _rand(2, 3)
    with pytest.raises(ValueError, match="states\\[1\\]"):
        hops.history_mix(x, [_rand(2, 3), _rand(2, 4)], torch.rand(2))
    with pytest.raises(ValueError, match="weights"):
        hops.history_mix(x, [_rand(2, 3)], torch.rand(2))
    with pytest.raises(ValueError, match="constraint"):
        hops.project_logits(torch.randn(3), "orthogonal")
    with pytest.raises(ValueError, match="doubly_stochastic"):
        hops.history_skip(x, [x], torch.zeros(1), constraint="doubly_stochastic")
    with pytest.raises(ValueError, match="temperature"):
        hops.history_skip(x, [x], torch.zeros(1), temperature=0.0)
    with pytest.raises(ValueError, match="logits"):
        hops.project_logits(torch.randn(2, 3, 4), "doubly_stochastic")
    with pytest.raises(ValueError, match="states"):
        hops.history_mix(x, [], torch.rand(0))


def test_dtype_policy():
    x = _rand(2, 3)
    states = _rand(2, 2, 3, dtype=torch.bfloat16, grad=True)
    out = hops.history_mix(x, states, torch.rand(2))
    assert out.dtype == torch.float32
    out.sum().backward()
    assert states.grad.dtype == torch.bfloat16  # fp32 stream, bf16 history: no cast, grads in bf16
    x64 = _rand(2, 3, dtype=torch.float64)
    assert hops.history_mix(x64, _rand(2, 2, 3), torch.rand(2)).dtype == torch.float64  # states cast up


# ---- CUDA only --------------------------------------------------------------------------------------


@requires_cuda
def test_cuda_forward_backward_do_not_sync():
    x = _rand(4, 1024, device="cuda", grad=True)
    states = _rand(4, 4, 1024, device="cuda", grad=True)
    logits = torch.zeros(4, device="cuda", requires_grad=True)
    out, _ = hops.history_skip(x, states, logits)  # warm up (workspace queries, allocator)
    out.sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = hops.history_skip(x, states, logits, constraint="simplex")
        out.sum().backward()
        mixed = hops.history_mix(x, states, torch.rand(4, device="cuda"))
        mixed.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
def test_cuda_graph_capture():
    x = _rand(2, 4096, device="cuda")
    states = _rand(3, 2, 4096, device="cuda")
    logits = torch.tensor([0.5, 0.0, 0.0], device="cuda")
    out, _ = hops.history_skip(x, states, logits)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = hops.history_skip(x, states, logits)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    want, _ = hops.history_skip(x, states, logits)
    torch.testing.assert_close(captured, want)


@requires_cuda
@pytest.mark.parametrize("stream, storage", PAIRS)
def test_cuda_matches_cpu_reference(stream, storage):
    H, shape = 6, (3, 4099)  # odd size: the scalar path
    x = _rand(*shape, dtype=stream)
    states = _rand(H, *shape, dtype=storage)
    logits = torch.tensor([1.0, 0.3, -0.2, 0.8, -1.0, 0.1], dtype=torch.float64 if stream == torch.float64
                          else torch.float32)
    with ops.use_backend("reference"):
        want, w_want = hops.history_skip(x, states, logits)
    got, w_got = hops.history_skip(x.cuda(), states.cuda(), logits.cuda())
    _close(got.cpu(), want)
    torch.testing.assert_close(w_got.cpu(), w_want, rtol=1e-5, atol=1e-6)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
_ = HAS_CUDA


# ---- valid input that used to be rejected, invalid input that used to pass ----------------------------------


@pytest.mark.parametrize("shape", [(2, 0, 8), (0, 5), (0,)])
def test_zero_size_states_give_empty_results(shape):
    x = _rand(*shape, grad=True)
    states = [_rand(*shape, grad=True) for _ in range(3)]
    logits = torch.tensor([0.5, 0.1, -0.3], requires_grad=True)
    out, w = hops.history_skip(x, states, logits, gate=torch.ones(1))
    assert out.shape == shape and torch.equal(w, hops.project_logits(logits.detach()))
    mixed = hops.history_mix(None, states, torch.rand(2, 3))
    assert mixed.shape == (2, *shape)
    (out.sum() + mixed.sum()).backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros(3))
    assert hops.project_logits(torch.randn(*shape[:-1], 0, 4)).shape == (*shape[:-1], 0, 4)


def test_states_of_rank_above_eight_match_reference():
    shape = (1, 2, 1, 3, 1, 2, 1, 2, 3)  # rank 9: beyond the core's tensor views
    x, states, logits = _rand(*shape), [_rand(*shape) for _ in range(2)], torch.tensor([0.3, -0.2])
    out, w = hops.history_skip(x, states, logits, constraint="softmax")
    _close(out, hops.reference_history_mix(x, states, w))
    weights = torch.rand(3, 2)
    _close(hops.history_mix(None, states, weights), hops.reference_history_mix(None, states, weights))
    z = torch.randn(*shape, 4)
    _close(hops.project_logits(z, "softmax"), torch.softmax(z, -1))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_tensors_raise_type_error(dtype):
    bad = torch.ones(2, 4).to(dtype)
    x = _rand(2, 4)
    with pytest.raises(TypeError, match="logits"):
        hops.project_logits(bad)
    with pytest.raises(TypeError, match="states\\[1\\]"):
        hops.history_mix(x, [x, bad], torch.rand(2))
    with pytest.raises(TypeError, match="states\\[0\\]"):
        hops.history_skip(x, [bad], torch.zeros(1))
    with pytest.raises(TypeError, match="x"):
        hops.history_skip(bad, [x], torch.zeros(1))
    with pytest.raises(TypeError, match="weights"):
        hops.history_mix(x, [x], torch.ones(1).to(dtype))


def test_unclear_errors_are_now_named():
    x = _rand(2, 3)
    cases = [
        (TypeError, "states", lambda: hops.history_mix(x, 5, torch.rand(1))),
        (TypeError, "states\\[1\\]", lambda: hops.history_mix(x, [x, "s"], torch.rand(2))),
        (ValueError, "states", lambda: hops.history_mix(None, [], torch.rand(1))),
        (ValueError, "gate", lambda: hops.history_mix(x, [x], torch.rand(1), gate=torch.ones(3))),
        (ValueError, "x", lambda: hops.history_mix(_rand(2, 4), [x], torch.rand(1))),
        (ValueError, "x", lambda: hops.history_skip(_rand(2, 4), [x], torch.zeros(1))),
        (ValueError, "logits", lambda: hops.history_skip(x, [x, x], torch.zeros(3))),
        (ValueError, "weights", lambda: hops.history_mix(None, [x], torch.rand(65, 1))),
        (ValueError, "logits", lambda: hops.project_logits(torch.randn(2, 65))),
        (ValueError, "logits", lambda: hops.project_logits(torch.randn(3, 0))),
        (ValueError, "epsilon", lambda: hops.project_logits(torch.randn(3), "identity", epsilon=1.5)),
        (ValueError, "sinkhorn_iters", lambda: hops.project_logits(torch.randn(3, 3), "sinkhorn", sinkhorn_iters=0)),
        (TypeError, "temperature", lambda: hops.project_logits(torch.randn(3), temperature="hot")),
        (TypeError, "constraint", lambda: hops.project_logits(torch.randn(3), ["simplex"])),
    ]
    for error, name, call in cases:
        with pytest.raises(error, match=name):
            call()
