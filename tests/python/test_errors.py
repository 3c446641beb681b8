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
