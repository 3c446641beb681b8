"""mhc.ops against mhc.reference: forward values and gradients on every backend, fp64 gradcheck,
torch.library.opcheck of every custom op, dtype policy, leading dims, no host sync on CUDA."""

from __future__ import annotations

import pytest
import torch

from mhc import ops
from mhc import reference as ref
from conftest import DEVICES, TARGETS, assert_close, coef, coefficients, requires_cuda, site_params

# (n, C, leading dims): n in {1, 2, 3, 4, 8}, odd and tiny widths, no / one / two leading dims.
SHAPES = [(1, 5, (3,)), (2, 33, (2, 3)), (3, 7, ()), (4, 64, (5,)), (4, 1, (2,)), (8, 9, (2, 2)), (4, 200, (37,))]
OPS = ["pre", "pre_static", "post", "post_pre", "post_pre_static", "sinkhorn", "expand", "head", "head_static",
       "residual_add_agg"]


def make_case(op: str, n: int, C: int, lead: tuple, dtype: torch.dtype, device: str):
    """(ops function, reference function, positional args, keyword args) with fresh random inputs.

    Stream tensors have `dtype`; coefficients and parameters the matching coefficient dtype."""
    k = coef(dtype)
    static = op.endswith("_static")
    op = op.removesuffix("_static")
    x = torch.randn(*lead, n, C, dtype=dtype, device=device)
    if op == "pre":
        fn, base, scale = site_params(n, C, dtype=k, device=device, static=static)
        return ops.mhc_pre, ref.mhc_pre, [x, fn, base, scale], dict(iters=7, post_mult=1.5, eps=1e-5, norm_eps=1e-4,
                                                                     pre_eps=1e-3)
    if op in ("post", "post_pre"):
        y = torch.randn(*lead, C, dtype=dtype, device=device)
        _, h_post, comb = coefficients(lead, n, dtype=k, device=device)
        if op == "post":
            return ops.mhc_post, ref.mhc_post, [x, y, h_post, comb], {}
        fn, base, scale = site_params(n, C, dtype=k, device=device, static=static)

        def ref_post_pre(x, y, h_post, comb, fn, base, scale, **kw):
            # The next site's pre reads x_next as stored (rounded to the stream dtype).
            x_next = ref.mhc_post(x, y, h_post, comb).to(dtype).to(x.dtype)
            return (x_next, *ref.mhc_pre(x_next, fn, base, scale, **kw))

        return ops.mhc_post_pre, ref_post_pre, [x, y, h_post, comb, fn, base, scale], dict(iters=20)
    if op == "sinkhorn":
        logits = 2 * torch.randn(*lead, n, n, dtype=k, device=device)
        return ops.sinkhorn, ref.sinkhorn, [logits], dict(iters=5, eps=1e-6)
    if op == "expand":
        return ops.expand_streams, ref.expand_streams, [torch.randn(*lead, C, dtype=dtype, device=device), n], {}
    if op == "head":
        fn, base, scale = site_params(n, C, dtype=k, device=device, static=static, head=True)
        return ops.mhc_head, ref.mhc_head, [x, fn, base, scale], dict(eps=1e-3)
    if op == "residual_add_agg":
        h_pre, _, _ = coefficients(lead, n, dtype=k, device=device)

        def ref_residual_add_agg(x, res, h_pre):
            x_out = (x + res).to(dtype).to(x.dtype)  # agg and its gradient read x_out as stored
            return x_out, (h_pre.unsqueeze(-1) * x_out.to(h_pre.dtype)).sum(-2).to(x.dtype)

        return ops.residual_add_agg, ref_residual_add_agg, [x, torch.randn_like(x), h_pre], {}
    raise ValueError(op)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _leaves(args, dtype=None):
    """Fresh leaf copies of the tensor args (optionally cast), requiring grad."""
    return [a.detach().to(dtype or a.dtype).requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]


def forward_backward(f, args, kwargs, upstream=None):
    """Outputs of f and the gradients of sum(out * upstream) w.r.t. every tensor arg."""
    outs = _as_tuple(f(*args, **kwargs))
    if upstream is None:  # random upstream gradients, exactly representable in each output's dtype
        upstream = [torch.randn_like(o).to(o.dtype).double() for o in outs]
    loss = sum((o.double() * g.to(o.device)).sum() for o, g in zip(outs, upstream))
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return outs, torch.autograd.grad(loss, tensors), upstream


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, C, lead", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(op, n, C, lead, dtype, device, backend):
    """Forward outputs and every gradient against the fp64 plain-PyTorch reference on the same inputs."""
    f, f_ref, args, kwargs = make_case(op, n, C, lead, dtype, device)
    with ops.use_backend(backend):
        outs, grads, upstream = forward_backward(f, _leaves(args), kwargs)
    want_outs, want_grads, _ = forward_backward(f_ref, _leaves(args, torch.float64), kwargs, upstream)
    with torch.no_grad():
        want_dtypes = [o.dtype for o in _as_tuple(f_ref(*args, **kwargs))]
    for i, (got, want) in enumerate(zip(outs, want_outs)):
        assert got.dtype == want_dtypes[i], f"{op} output {i}: dtype {got.dtype}, expected {want_dtypes[i]}"
        assert_close(got, want, name=f"{op} output {i}")
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    # post_pre hands the gradient of x_next from the next pre's backward to the post's backward in the stream
    # dtype, so with 16-bit streams even its coefficient gradients carry 16-bit rounding.
    tol_dtype = dtype if op.startswith("post_pre") and dtype.itemsize == 2 else None
    for i, (a, got, want) in enumerate(zip(tensors, grads, want_grads)):
        assert got.dtype == a.dtype, f"{op}: gradient {i} has dtype {got.dtype}, its input {a.dtype}"
        # Parameter gradients sum over tokens and channels: compare relative to their largest element.
        scale = max(1.0, want.abs().max().item()) if got.dtype == torch.float32 and a.dim() <= 2 else 1.0
        assert_close(got / scale, want / scale, dtype=tol_dtype, name=f"{op} grad of input {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_float16_storage(op, device):
    f, f_ref, args, kwargs = make_case(op, 4, 24, (3,), torch.float16, device)
    outs, grads, upstream = forward_backward(f, _leaves(args), kwargs)
    want_outs, want_grads, _ = forward_backward(f_ref, _leaves(args, torch.float64), kwargs, upstream)
    for i, (got, want) in enumerate(zip(outs, want_outs)):
        assert_close(got, want, name=f"{op} output {i}")
    for i, (got, want) in enumerate(zip(grads, want_grads)):
        assert_close(got, want, dtype=torch.bfloat16, name=f"{op} grad {i}")


def test_fast_matches_reference_backend():
    """The two C++ CPU backends agree on a larger fp32 problem (forward and backward of a whole site)."""
    n, C, T = 4, 300, 96
    x = torch.randn(T, n, C)
    y = torch.randn(T, C)
    fn, base, scale = site_params(n, C)
    results = {}
    for backend in ("reference", "fast"):
        with ops.use_backend(backend):
            leaves = _leaves([x, y, fn, base, scale])
            outs, grads, _ = forward_backward(
                lambda x, y, fn, base, scale: ops.mhc_post(x, y, *ops.mhc_pre(x, fn, base, scale)[2:]), leaves, {},
                upstream=[torch.ones(T, n, C, dtype=torch.float64)])
            results[backend] = outs + grads
    for i, (fast, slow) in enumerate(zip(results["fast"], results["reference"])):
        scale = max(1.0, slow.abs().max().item())
        assert_close(fast / scale, slow / scale, name=f"fast vs reference, tensor {i}")


# ---- gradcheck in fp64 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op, n, device, backend):
    """Finite differences in fp64 for every differentiable argument of every op."""
    f, _, args, kwargs = make_case(op, n, 3, (2,), torch.float64, device)
    leaves = _leaves(args)
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: f(*a, **kwargs), leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


# ---- torch.library.opcheck of every custom op --------------------------------------------------------------


def _opcheck_samples(device: str):
    """(custom op, args) for every forward and backward op, small shapes, fp32 streams."""
    n, C, T = 3, 5, 4
    hyper = (5, 2.0, 1e-6, 1e-6, 1e-6)  # iters, post_mult, eps, norm_eps, pre_eps
    g = lambda *shape, dtype=torch.float32: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    x, y = g(T, n, C), g(T, C)
    fn, base, scale = site_params(n, C, device=device)
    hfn, hbase, hscale = site_params(n, C, device=device, head=True)
    h_pre, h_post, comb = coefficients((T,), n, device=device)
    _, _, _, _, mixes, rstd = torch.ops.mhc.pre(x, fn, base, scale, *hyper, "auto")
    _, _, hmixes, hrstd = torch.ops.mhc.head(x, hfn, hbase, hscale, 1e-6, "auto")
    m = n * n + 2 * n
    return [
        ("pre", torch.ops.mhc.pre, (x, fn, base, scale, *hyper, "auto")),
        ("pre static", torch.ops.mhc.pre, (x, None, base, None, *hyper, "auto")),
        ("pre_backward", torch.ops.mhc.pre_backward,
         (x, fn, base, scale, mixes, rstd, g(T, C), g(T, n), g(T, n), g(T, n, n), g(T, n, C), *hyper, "auto")),
        ("pre_backward partial", torch.ops.mhc.pre_backward,
         (x, None, base, None, g(T, m), rstd, g(T, C), None, None, None, None, *hyper, "auto")),
        ("post", torch.ops.mhc.post, (x, y, h_post, comb, "auto")),
        ("post_backward", torch.ops.mhc.post_backward, (g(T, n, C), x, y, h_post, comb, "auto")),
        ("post_pre", torch.ops.mhc.post_pre, (x, y, h_post, comb, fn, base, scale, *hyper, "auto")),
        ("sinkhorn", torch.ops.mhc.sinkhorn, (g(T, n, n), 5, 1e-6, "auto")),
        ("sinkhorn_backward", torch.ops.mhc.sinkhorn_backward, (g(T, n, n), g(T, n, n), 5, 1e-6, "auto")),
        ("expand_streams", torch.ops.mhc.expand_streams, (y, n, "auto")),
        ("expand_streams_backward", torch.ops.mhc.expand_streams_backward, (g(T, n, C), "auto")),
        ("head", torch.ops.mhc.head, (x, hfn, hbase, hscale, 1e-6, "auto")),
        ("head_backward", torch.ops.mhc.head_backward,
         (x, hfn, hbase, hscale, hmixes, hrstd, g(T, C), g(T, n), 1e-6, "auto")),
        ("residual_add_agg", torch.ops.mhc.residual_add_agg, (x, g(T, n, C), h_pre, "auto")),
        ("residual_add_agg_backward", torch.ops.mhc.residual_add_agg_backward,
         (g(T, n, C), g(T, C), x, h_pre, "auto")),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schema, fake tensor, autograd registration and AOT dispatch (dynamic shapes) of every custom op."""
    for name, op, args in _opcheck_samples(device):
        forward = not name.split()[0].endswith("_backward")
        if forward:  # forward ops are differentiable: check the autograd registration with grads required
            args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                         else a for a in args)
        try:
            torch.library.opcheck(op, args)
        except Exception as e:
            raise AssertionError(f"opcheck failed for {name}") from e


# ---- shapes, layouts, dtype policy ------------------------------------------------------------------------


@pytest.mark.parametrize("device, backend", TARGETS)
def test_empty_batch(device, backend):
    """T = 0 tokens: empty outputs of the right shapes, and empty gradients."""
    n, C = 4, 8
    x = torch.randn(0, 3, n, C, device=device, requires_grad=True)
    fn, base, scale = site_params(n, C, device=device)
    with ops.use_backend(backend):
        layer_input, h_pre, h_post, comb = ops.mhc_pre(x, fn, base, scale)
        x_next = ops.mhc_post(x, layer_input, h_post, comb)
        x_next.sum().backward()
    assert layer_input.shape == (0, 3, C) and h_pre.shape == (0, 3, n) and comb.shape == (0, 3, n, n)
    assert x_next.shape == x.shape and x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    """Views with arbitrary strides are accepted (copied to contiguous) and give the same results."""
    n, C = 3, 10
    base_x = torch.randn(C, 6, n, device=device)
    x = base_x.permute(1, 2, 0)  # [6, n, C], non-contiguous
    y = torch.randn(C, 6, device=device).t()
    fn, base, scale = site_params(n, C, device=device)
    got = ops.mhc_pre(x, fn, base, scale)
    want = ops.mhc_pre(x.contiguous(), fn, base, scale)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert torch.equal(ops.mhc_post(x, y, got[2], got[3]), ops.mhc_post(x.contiguous(), y.contiguous(), got[2], got[3]))


@pytest.mark.parametrize("device", DEVICES)
def test_dtype_policy_casts(device):
    """x decides: a bf16 y meets an fp32 residual, fp64 parameters meet fp32 x; gradients keep their dtypes."""
    n, C = 4, 16
    x = torch.randn(5, n, C, device=device, requires_grad=True)
    y = torch.randn(5, C, device=device, dtype=torch.bfloat16, requires_grad=True)
    fn, base, scale = (t.double().requires_grad_() for t in site_params(n, C, device=device))
    layer_input, h_pre, h_post, comb = ops.mhc_pre(x, fn, base, scale)
    assert layer_input.dtype == torch.float32 and h_pre.dtype == torch.float32
    x_next = ops.mhc_post(x, y, h_post, comb)
    assert x_next.dtype == torch.float32
    x_next.sum().backward()
    assert y.grad.dtype == torch.bfloat16 and fn.grad.dtype == torch.float64 and x.grad.dtype == torch.float32
    want = ref.mhc_post(x.detach(), y.detach().float(), h_post.detach(), comb.detach())
    assert_close(x_next.detach(), want)


def test_float64_stream_uses_float64_coefficients():
    n, C = 2, 6
    x = torch.randn(3, n, C, dtype=torch.float64)
    fn, base, scale = site_params(n, C)  # float32 parameters are promoted for an fp64 stream
    out = ops.mhc_pre(x, fn, base, scale)
    want = ref.mhc_pre(x, fn.double(), base.double(), scale.double())
    for g, w in zip(out, want):
        assert g.dtype == torch.float64
        assert_close(g, w)


def test_backend_selection():
    assert ops.get_backend() == "auto"
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
        with ops.use_backend("fast"):
            assert ops.get_backend() == "fast"
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend"):
        ops.set_backend("gpu")
    with pytest.raises(RuntimeError, match="cuda"):
        with ops.use_backend("cuda"):
            ops.sinkhorn(torch.randn(2, 3, 3))


def test_backward_runs_on_forward_backend():
    """The backend is captured at forward time: the backward ignores the backend selected when it runs
    (here one that would reject CPU tensors)."""
    x = torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True)
    fn, base, scale = site_params(2, 5, dtype=torch.float64)
    with ops.use_backend("reference"):
        out = ops.mhc_pre(x, fn, base, scale)[0]
    with ops.use_backend("cuda"):
        out.sum().backward()
    want = torch.autograd.grad(ref.mhc_pre(x, fn, base, scale)[0].sum(), x)[0]
    assert_close(x.grad, want)


# ---- CUDA: streams and host syncs --------------------------------------------------------------------------


@requires_cuda
def test_cuda_no_host_sync():
    """Forward and backward of every op without a synchronisation through torch (.item(), blocking copies);
    syncs inside the C++ code are caught by the CUDA graph capture test below."""
    n, C = 4, 128
    cases = [make_case(op, n, C, (2, 8), torch.bfloat16, "cuda") for op in OPS]
    prepared = []
    for f, _, args, kwargs in cases:
        leaves = _leaves(args)
        outs = _as_tuple(f(*leaves, **kwargs))  # warm-up (allocator, lazy init) outside the check
        prepared.append((f, leaves, kwargs, [torch.randn_like(o) for o in outs]))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for f, leaves, kwargs, upstream in prepared:
            outs = _as_tuple(f(*leaves, **kwargs))
            torch.autograd.backward(outs, upstream)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@requires_cuda
def test_cuda_runs_on_current_stream():
    """Ops run on torch's current stream: results computed on a side stream match the default stream."""
    n, C = 4, 256
    x = torch.randn(64, n, C, device="cuda")
    fn, base, scale = site_params(n, C, device="cuda")
    want = ops.mhc_pre(x, fn, base, scale)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = ops.mhc_pre(x, fn, base, scale)
    torch.cuda.current_stream().wait_stream(side)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@requires_cuda
@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_capture(op):
    """Forward and backward of every op replay correctly from a CUDA graph. Capture also fails on any
    synchronisation or stream handshake inside the C++ code, which set_sync_debug_mode cannot see."""
    f, _, args, kwargs = make_case(op, 4, 256, (2, 16), torch.bfloat16, "cuda")
    leaves = _leaves(args)
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    upstream = [torch.randn_like(o) for o in _as_tuple(f(*leaves, **kwargs))]

    def step():
        outs = _as_tuple(f(*leaves, **kwargs))
        return outs + torch.autograd.grad(outs, tensors, upstream)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph requires
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    eager = step()
    graph.replay()
    torch.cuda.synchronize()
    for c, e in zip(captured, eager):
        torch.testing.assert_close(c, e)


def test_residual_add_agg_eager_function_and_custom_op_agree():
    # Eager calls take the op's torch.autograd.Function to the kernels (mhc._plumbing.Op); compile, fake tensors and
    # dispatch modes take the custom op. Same kernels: bitwise the same values and gradients.
    x, res = torch.randn(5, 4, 9, requires_grad=True), torch.randn(5, 4, 9, requires_grad=True)
    h_pre = torch.rand(5, 4, requires_grad=True)
    cotangents = (torch.randn(5, 4, 9), torch.randn(5, 9))
    eager = ops.residual_add_agg(x, res, h_pre)
    assert "residual_add_agg_function" in type(eager[0].grad_fn).__name__  # the eager route; no view on top
    custom = torch.ops.mhc.residual_add_agg(x, res, h_pre, "auto")
    for a, b in zip(eager, custom):
        assert torch.equal(a, b)
    leaves = (x, res, h_pre)
    for a, b in zip(torch.autograd.grad(eager, leaves, cotangents), torch.autograd.grad(custom, leaves, cotangents)):
        assert torch.equal(a, b)


def test_empty_inputs_with_odd_strides():
    """A sliced empty tensor keeps odd strides (torch calls it contiguous and .contiguous() returns it as is): the
    core used to reject it as non-contiguous."""
    n, C = 3, 8
    x = torch.randn(0, n, 2 * C)[..., ::2]
    assert x.numel() == 0 and x.stride(-1) == 2
    fn, base, scale = site_params(n, C)
    _, h_pre, h_post, comb = ops.mhc_pre(x, fn, base, scale)
    assert ops.mhc_post(x, torch.randn(0, 2 * C)[:, ::2], h_post, comb).shape == (0, n, C)
    assert ops.sinkhorn(torch.randn(0, n, 2 * n)[..., ::2]).shape == (0, n, n)
    assert ops.expand_streams(torch.randn(0, 2 * C)[:, ::2], n).shape == (0, n, C)
    assert ops.mhc_head(x, *site_params(n, C, head=True)).shape == (0, C)
    assert ops.residual_add_agg(x, x, h_pre)[1].shape == (0, C)
