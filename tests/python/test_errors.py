"""Bad inputs raise ValueError / TypeError / RuntimeError whose message names the argument; nothing crashes."""

from __future__ import annotations

import pytest
import torch

import mhc
from mhc import _C, ops
from conftest import coefficients, requires_cuda, site_params

n, C, T = 4, 8, 3
m = n * n + 2 * n


def good_pre():
    return [torch.randn(T, n, C), *site_params(n, C)]


def good_post():
    _, h_post, comb = coefficients((T,), n)
    return [torch.randn(T, n, C), torch.randn(T, C), h_post, comb]


def replace(args, i, value):
    args = list(args)
    args[i] = value
    return args


PRE_CASES = [
    # (index of the argument, bad value, exception, text the message must contain)
    (0, torch.randn(C), ValueError, "x"),                                  # rank 1
    (0, torch.randint(0, 3, (T, n, C)), TypeError, "x"),                   # integer stream
    (0, [[1.0]], TypeError, "x"),                                          # not a tensor
    (0, torch.randn(T, 65, C), ValueError, "n"),                           # too many streams
    (0, torch.randn(T, n, 0), ValueError, "C"),                            # zero width
    (1, torch.randn(m, n * C + 1), ValueError, "fn"),                      # wrong shape
    (1, torch.randn(m + 1, n * C), ValueError, "fn"),
    (2, torch.randn(m - 1), ValueError, "base"),
    (2, torch.randn(1, m), ValueError, "base"),
    (3, torch.randn(2), ValueError, "scale"),
    (3, None, ValueError, "scale"),                                        # fn given without scale
    (2, torch.ones(m, dtype=torch.int32), TypeError, "base"),
]


@pytest.mark.parametrize("index, value, error, name", PRE_CASES)
def test_pre_bad_arguments(index, value, error, name):
    with pytest.raises(error, match=name):
        ops.mhc_pre(*replace(good_pre(), index, value))


POST_CASES = [
    (1, torch.randn(T, C + 1), ValueError, "y"),
    (1, torch.randn(T + 1, C), ValueError, "y"),
    (1, torch.randn(1, T, C), ValueError, "y"),   # same numel, different leading dims
    (2, torch.randn(T, n + 1), ValueError, "h_post"),
    (3, torch.randn(T, n, n + 1), ValueError, "comb"),
    (3, torch.randn(T, n * n), ValueError, "comb"),
    (1, torch.ones(T, C, dtype=torch.int64), TypeError, "y"),
]


@pytest.mark.parametrize("index, value, error, name", POST_CASES)
def test_post_bad_arguments(index, value, error, name):
    with pytest.raises(error, match=name):
        ops.mhc_post(*replace(good_post(), index, value))
    fn, base, scale = site_params(n, C)
    with pytest.raises(error, match=name):
        ops.mhc_post_pre(*replace(good_post(), index, value), fn, base, scale)


@pytest.mark.parametrize("kwargs, name", [(dict(iters=0), "iters"), (dict(eps=-1.0), "eps"),
                                          (dict(norm_eps=float("nan")), "norm_eps"),
                                          (dict(post_mult=float("inf")), "post_mult")])
def test_bad_hyper_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ops.mhc_pre(*good_pre(), **kwargs)


def test_other_ops_bad_arguments():
    with pytest.raises(ValueError, match="logits"):
        ops.sinkhorn(torch.randn(T, 3, 4))
    with pytest.raises(ValueError, match="logits"):
        ops.sinkhorn(torch.randn(5))
    with pytest.raises(ValueError, match="n"):
        ops.expand_streams(torch.randn(T, C), 0)
    with pytest.raises(ValueError, match="fn"):
        ops.mhc_head(torch.randn(T, n, C), torch.randn(m, n * C), torch.randn(n), torch.randn(1))
    with pytest.raises(ValueError, match="scale"):
        ops.mhc_head(torch.randn(T, n, C), torch.randn(n, n * C), torch.randn(n), torch.randn(3))
    with pytest.raises(ValueError, match="res"):
        ops.residual_add_agg(torch.randn(T, n, C), torch.randn(T, n, C + 1), torch.rand(T, n))
    with pytest.raises(ValueError, match="h_pre"):
        ops.residual_add_agg(torch.randn(T, n, C), torch.randn(T, n, C), torch.rand(T, n + 1))


def test_extension_checks_raw_arguments():
    """The C++ front end rejects what the Python layer normally prevents: strides, dtypes, missing outputs."""
    x = torch.randn(T, C, n).transpose(1, 2)  # non-contiguous
    comb = torch.empty(T, n, n)
    cfg = _C.Config(n=n)
    with pytest.raises(ValueError, match="logits.*contiguous"):
        _C.sinkhorn_forward(logits=x[:, :, :n], comb=comb, config=cfg)
    with pytest.raises(TypeError, match="logits"):
        _C.sinkhorn_forward(logits=torch.randn(T, n, n).half(), comb=comb, config=cfg)
    with pytest.raises(TypeError, match="comb"):
        _C.sinkhorn_forward(logits=torch.randn(T, n, n), comb=comb.double(), config=cfg)
    with pytest.raises(ValueError, match="n"):
        _C.sinkhorn_forward(logits=torch.randn(T, n, n), comb=comb, config=_C.Config(n=3))
    with pytest.raises(TypeError, match="x"):
        _C.expand_forward(x=torch.ones(T, C, dtype=torch.int32), out=torch.empty(T, n, C), config=cfg)
    with pytest.raises(ValueError, match="backend"):
        _C.sinkhorn_forward(logits=torch.randn(T, n, n), comb=comb, config=cfg, backend="tpu")
    with pytest.raises(RuntimeError, match="cuda"):
        _C.sinkhorn_forward(logits=torch.randn(T, n, n), comb=comb, config=cfg, backend="cuda")
    with pytest.raises(ValueError, match="workspace|grad_fn"):
        x = torch.randn(T, n, C)
        fn, base, scale = site_params(n, C)
        _C.pre_backward(x=x, fn=fn, base=base, scale=scale, mixes=torch.randn(T, m), rstd=torch.rand(T),
                        grad_layer_input=None, grad_h_pre=None, grad_h_post=None, grad_comb=None,
                        grad_x_accum=None, grad_x=torch.empty_like(x), grad_fn=None, grad_base=torch.empty(m),
                        grad_scale=torch.empty(3), workspace=None, config=cfg)


def test_modules_bad_arguments():
    with pytest.raises(ValueError, match="n"):
        mhc.MHC(0, 8)
    with pytest.raises(ValueError, match="C"):
        mhc.MHC(4, 0)
    with pytest.raises(ValueError, match="impl"):
        mhc.MHC(4, 8, impl="numpy")
    with pytest.raises(ValueError, match="mode"):
        mhc.MHCHead(4, 8, mode="max")
    layer = mhc.MHCLayer(4, 8)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(8))


@requires_cuda
def test_mixed_devices():
    x = torch.randn(T, n, C, device="cuda")
    fn, base, scale = site_params(n, C)  # on the CPU
    with pytest.raises(RuntimeError, match="fn"):
        ops.mhc_pre(x, fn, base, scale)
    with pytest.raises(RuntimeError, match="CPU backend|cpu"):
        with ops.use_backend("fast"):
            ops.sinkhorn(torch.randn(T, n, n, device="cuda"))


# ---- tensors on different devices (meta included) ----------------------------------------------------------


def _public_calls():
    """Every public op with valid CPU arguments: (name, function, positional tensors by name, keyword tensors)."""
    x, y = torch.randn(T, n, C), torch.randn(T, C)
    h_pre, h_post, comb = coefficients((T,), n)
    fn, base, scale = site_params(n, C)
    head_fn, head_base, head_scale = site_params(n, C, head=True)
    states = [torch.randn(2, 5) for _ in range(3)]
    return [
        ("mhc_pre", ops.mhc_pre, dict(x=x, fn=fn, base=base, scale=scale), {}),
        ("mhc_post", ops.mhc_post, dict(x=x, y=y, h_post=h_post, comb=comb), {}),
        ("mhc_post_pre", ops.mhc_post_pre, dict(x=x, y=y, h_post=h_post, comb=comb, fn=fn, base=base, scale=scale),
         {}),
        ("mhc_head", ops.mhc_head, dict(x=x, fn=head_fn, base=head_base, scale=head_scale), {}),
        ("residual_add_agg", ops.residual_add_agg, dict(x=x, res=torch.randn(T, n, C), h_pre=h_pre), {}),
        ("sinkhorn", ops.sinkhorn, dict(logits=torch.randn(T, n, n)), {}),
        ("expand_streams", lambda x: ops.expand_streams(x, n), dict(x=y), {}),
        ("project_logits", ops.project_logits, dict(logits=torch.randn(2, 3)), {}),
        ("history_mix", ops.history_mix, dict(x=torch.randn(2, 5), states=states, weights=torch.rand(3)),
         dict(gate=torch.ones(1))),
        ("history_skip", ops.history_skip, dict(x=torch.randn(2, 5), states=states, logits=torch.randn(3)),
         dict(gate=torch.ones(1))),
    ]


def _to(value, device):
    return [v.to(device) for v in value] if isinstance(value, list) else value.to(device)


def _device_cases():
    for op, call, args, kwargs in _public_calls():
        for name in [*args, *kwargs]:
            if len(args) + len(kwargs) > 1:
                yield pytest.param(op, name, id=f"{op}-{name}")


@pytest.mark.parametrize("op, moved", list(_device_cases()))
def test_mixed_cpu_and_meta_raise_naming_the_argument(op, moved):
    """A meta tensor among CPU ones used to reach the fake implementation: uninitialised memory came back."""
    _, call, args, kwargs = next(c for c in _public_calls() if c[0] == op)
    args, kwargs = dict(args), dict(kwargs)
    target = args if moved in args else kwargs
    target[moved] = _to(target[moved], "meta")
    expected = f"{moved}(\\[0\\])?: expected a tensor on" if moved != "x" else "on x's device|states\\[0\\]"
    with pytest.raises(RuntimeError, match=expected):
        call(*args.values(), **kwargs)


@pytest.mark.parametrize("op", [c[0] for c in _public_calls()])
def test_all_meta_returns_meta_tensors(op):
    _, call, args, kwargs = next(c for c in _public_calls() if c[0] == op)
    real = call(*args.values(), **kwargs)
    meta = call(*(_to(v, "meta") for v in args.values()), **{k: _to(v, "meta") for k, v in kwargs.items()})
    for got, want in zip(*(r if isinstance(r, tuple) else (r,) for r in (meta, real))):
        assert got.is_meta and got.shape == want.shape and got.dtype == want.dtype


def test_meta_site_module_raises_like_a_linear():
    with torch.device("meta"):
        site, linear = mhc.MHC(n, C), torch.nn.Linear(C, C)
    with pytest.raises(RuntimeError):
        linear(torch.randn(2, C))
    with pytest.raises(RuntimeError, match="fn: expected a tensor on x's device"):
        site.pre(torch.randn(2, n, C))


def test_mixed_devices_under_fake_tensors_and_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, y = torch.randn(T, n, C), torch.randn(T, C)
    _, h_post, comb = coefficients((T,), n)
    y_meta = y.to("meta")
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (x, y_meta, h_post, comb)]
        with pytest.raises(RuntimeError, match="y: expected a tensor on"):
            ops.mhc_post(*fake)
    compiled = torch.compile(ops.mhc_post, backend="eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="comb: expected a tensor on"):
        compiled(x, y, h_post, comb.to("meta"))


def test_invalid_arguments_that_used_to_pass_or_fail_unclearly():
    x = torch.randn(T, n, C)
    head_fn, head_base, head_scale = site_params(n, C, head=True)
    cases = [
        (ValueError, "eps", lambda: ops.mhc_head(x, head_fn, head_base, head_scale, eps=-1.0)),
        (ValueError, "pre_eps", lambda: ops.mhc_pre(*good_pre(), pre_eps=-1.0)),
        (TypeError, "iters", lambda: ops.mhc_pre(*good_pre(), iters=2.5)),
        (TypeError, "n", lambda: ops.expand_streams(torch.randn(T, C), 4.0)),
        (TypeError, "eps", lambda: ops.sinkhorn(torch.randn(T, n, n), eps="small")),
        (TypeError, "n", lambda: mhc.MHC(4.0, 8)),
        (TypeError, "C", lambda: mhc.MHC(4, "8")),
        (ValueError, "n", lambda: mhc.MHCHead(0, 8)),
        (ValueError, "n", lambda: mhc.StreamExpand(65)),
        (ValueError, "x", lambda: mhc.MHCHead(n, C, mode="mean")(torch.randn(T, n + 1, C))),
        (ValueError, "x", lambda: mhc.MHCHead(n, C)(torch.randn(T, n, C + 1))),
        (TypeError, "x", lambda: mhc.MHCHead(n, C, mode="mean")(torch.ones(T, n, C, dtype=torch.int64))),
    ]
    for error, name, call in cases:
        with pytest.raises(error, match=name):
            call()


def test_registered_ops_called_directly_name_the_bad_argument():
    # torch.ops.mhc.* skip the public functions' Python checks: the C++ kernels and the core check for themselves.
    x = torch.randn(T, n, C)
    y, h_post, comb = torch.randn(T, C), torch.rand(T, n), torch.rand(T, n, n)
    logits = torch.randn(T, n, n)
    cases = [
        ("x: unsupported dtype", lambda: torch.ops.mhc.post(x.int(), y, h_post, comb, "auto")),
        ("y: expected shape", lambda: torch.ops.mhc.post(x, torch.randn(T + 1, C), h_post, comb, "auto")),
        ("comb: expected shape", lambda: torch.ops.mhc.post(x, y, h_post, torch.rand(T, n, n + 1), "auto")),
        ("backend: expected", lambda: torch.ops.mhc.post(x, y, h_post, comb, "tpu")),
        ("logits: unsupported dtype", lambda: torch.ops.mhc.sinkhorn(logits.to(torch.int32), 20, 1e-6, "auto")),
        ("iters", lambda: torch.ops.mhc.sinkhorn(logits, 0, 1e-6, "auto")),
    ]
    for name, call in cases:
        with pytest.raises(RuntimeError, match=name):
            call()
    # A strided input is copied, not refused, and gives the contiguous input's result.
    xt = torch.randn(C, n, T).permute(2, 1, 0)
    assert torch.equal(torch.ops.mhc.post(xt, y, h_post, comb, "auto"),
                       torch.ops.mhc.post(xt.contiguous(), y, h_post, comb, "auto"))


def test_forward_mode_ad_is_refused_not_silently_zero():
    # The ops have no forward derivative; a custom op would give its outputs no tangent (a jvp of 0) without a word.
    import torch.autograd.forward_ad as forward_ad

    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    fn, base, scale = (p.double() for p in site_params(2, 4))
    weights = torch.rand(2, dtype=torch.float64)
    cases = {
        "pre": lambda x: ops.mhc_pre(x, fn, base, scale)[0],
        "post": lambda x: ops.mhc_post(x, x[:, 0], weights.expand(3, 2), torch.rand(3, 2, 2, dtype=torch.float64)),
        "sinkhorn": lambda x: ops.sinkhorn(x[:, :, :2]),
        "history_mix": lambda x: ops.history_mix(x[:, 0], [x[:, 1], x[:, 0]], weights),
        "history_skip": lambda x: ops.history_skip(x[:, 0], [x[:, 1], x[:, 0]], weights)[0],
    }
    for name, f in cases.items():
        with pytest.raises(RuntimeError, match=f"mhc.{name}: forward-mode AD"):
            torch.func.jvp(f, (x,), (torch.randn_like(x),))
        with forward_ad.dual_level():
            with pytest.raises(RuntimeError, match=f"mhc.{name}: forward-mode AD"):
                f(forward_ad.make_dual(x, torch.randn_like(x)))
            assert f(x).shape[0] == 3  # inputs without a tangent still run inside a dual level


def test_scale_without_fn_is_refused():
    # Static mode (fn None) has no projection for scale to scale: a given scale would be ignored without a word.
    fn, base, scale = site_params(n, C)
    x = torch.randn(T, n, C)
    for impl in (ops, mhc.reference):
        with pytest.raises(ValueError, match="scale: expected None when fn is None"):
            impl.mhc_pre(x, None, base, scale)
    with pytest.raises(ValueError, match="scale: expected None when fn is None"):
        ops.mhc_head(x, None, base[:n], scale[:1])


def test_double_backward_is_refused_not_silently_wrong():
    # The backward ops have no derivative of their own: differentiating a gradient through them (create_graph=True,
    # a gradient penalty) must raise, on every route (paired site, eager Functions, the dispatcher), not give zeros.
    from torch import nn

    torch.manual_seed(0)
    lin, site = nn.Linear(4, 4).double(), mhc.MHC(2, 4).double()
    h = lin(torch.randn(3, 2, 4, dtype=torch.float64))
    layer_input, state = site.pre(h)
    out = site.post(h, torch.tanh(layer_input), state) + 0.1 * h ** 2
    penalty, = torch.autograd.grad(out.square().sum(), lin.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        penalty.square().sum().backward()

    states = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    for skip in (lambda: ops.history_skip(2 * states[0], states, logits)[0],
                 lambda: ops.history_mix(2 * states[0], states, torch.softmax(logits, 0)),
                 lambda: torch.ops.mhc.history_skip(2 * states[0], states, logits, None, "simplex", 1.0, 0.1,
                                                    "auto")[0]):
        grad, = torch.autograd.grad(skip().square().sum(), states[1], create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            grad.square().sum().backward()
    # A loss linear in the op's output: the incoming gradient carries no graph, the op's gradient still depends on x.
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    fn, base, scale = (t.double().requires_grad_() for t in site_params(2, 4))
    layer_input = ops.mhc_pre(x, fn, base, scale)[0]
    grad, = torch.autograd.grad(layer_input.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (layer_input.sum() + grad.square().sum()).backward()
    logits_nn = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    grad, = torch.autograd.grad(torch.ops.mhc.sinkhorn(logits_nn, 20, 1e-6, "auto").square().sum(), logits_nn,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()
