"""Activation recomputation (mhc.recompute): gradients bit-identical to the run without it, the block-internal
residuals and layer inputs really freed after the forward, checkpointed sub-layers, autocast, torch.compile, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import checkpoint

import mhc
from mhc import ops
from mhc.recompute import MHCStack, SiteChain, default_block_size, run_sites
from conftest import TARGETS

N, C, L = 4, 23, 6


def make_parts(num_sites=L, dtype=torch.float32, n=N, width=C, site_class=mhc.MHC, device="cpu", norms=False):
    """Sites with their symmetric initialisation broken (every coefficient matters) and MLP sub-layers, each with
    its RMSNorm inside or, with ``norms``, as a separate list (the third element)."""
    sites = [site_class(n, width).to(device) for _ in range(num_sites)]
    with torch.no_grad():
        for site in sites:
            site.fn.add_(0.5 * torch.randn_like(site.fn))
            site.scale.add_(0.5)
    norm_list = [nn.RMSNorm(width).to(device, dtype) for _ in range(num_sites)]
    with torch.no_grad():
        for norm in norm_list:
            norm.weight.add_(0.3 * torch.randn_like(norm.weight))
    bodies = [nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)).to(device, dtype)
              for _ in range(num_sites)]
    if norms:
        return sites, bodies, norm_list
    return sites, [nn.Sequential(norm, body) for norm, body in zip(norm_list, bodies)]


def step_grads(stack: nn.Module, x0: torch.Tensor, weight: torch.Tensor, *, forward=None) -> dict:
    """Gradients of sum(stack(x) * weight) w.r.t. x and every parameter."""
    x = x0.clone().requires_grad_()
    out = (stack if forward is None else forward)(x)
    (out.double() * weight).sum().backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad.clone() for name, p in stack.named_parameters()})
    stack.zero_grad(set_to_none=True)
    return grads


def assert_bitwise(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name}: max |diff| {(got[name] - want[name]).abs().max()}"


def inputs(dtype=torch.float32, n=N, width=C, device="cpu"):
    x0 = torch.randn(2, 5, n, width, dtype=dtype, device=device)
    return x0, torch.randn(x0.shape, dtype=torch.float64, device=device)


def test_default_block_size_is_the_papers():
    assert default_block_size(4, 8) == 2  # sqrt(32 / 6) = 2.31
    assert default_block_size(4, 24) == 4  # sqrt(96 / 6) = 4
    assert default_block_size(8, 100) == 9  # sqrt(800 / 10) = 8.94
    assert default_block_size(4, 2) == 1
    assert default_block_size(1, 1) == 1
    with pytest.raises(ValueError, match="num_sites"):
        default_block_size(4, 0)
    with pytest.raises(ValueError, match="n: expected"):
        default_block_size(0, 4)


def test_without_recompute_the_stack_is_the_plain_chain():
    sites, sublayers = make_parts()
    stack = MHCStack(sites, sublayers)
    x0, weight = inputs()

    def plain(x):
        layer_input, state = sites[0].pre(x)
        for index, sublayer in enumerate(sublayers):
            y = sublayer(layer_input)
            if index + 1 < len(sites):
                x, layer_input, state = sites[index].post_pre(x, y, state, sites[index + 1])
            else:
                x = sites[index].post(x, y, state)
        return x

    assert_bitwise(step_grads(stack, x0, weight), step_grads(stack, x0, weight, forward=plain))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [1, 2, 4, L, None], ids=lambda b: f"Lr{b}")
@pytest.mark.parametrize("device, backend", TARGETS)
@pytest.mark.parametrize("norms", [False, True], ids=["norm-inside", "norms-recomputed"])
def test_gradients_are_bit_identical(dtype, block_size, device, backend, norms):
    parts = make_parts(dtype=dtype, device=device, norms=norms)
    x0, weight = inputs(dtype, device=device)

    def stack(recompute):
        sites, sublayers, *norm_list = copy.deepcopy(parts)
        return MHCStack(sites, sublayers, norms=norm_list[0] if norm_list else None, recompute=recompute,
                        block_size=block_size)

    with ops.use_backend(backend):
        want = step_grads(stack(False), x0, weight)
        recomputing = stack(True)
        assert_bitwise(step_grads(recomputing, x0, weight), want)
        assert_bitwise(step_grads(recomputing, x0, weight), want)  # a second step: nothing left over from the first


def _spy_parts(log):
    """Sites and sub-layers that record the storage of every residual and layer input they produce or receive."""

    class SpySite(mhc.MHC):
        def post_pre(self, *args):
            out = super().post_pre(*args)
            log.setdefault("x", []).append(StorageWeakRef(out[0].untyped_storage()))
            return out

    class SpySublayer(nn.Module):
        def __init__(self, sublayer):
            super().__init__()
            self.sublayer = sublayer

        def forward(self, layer_input):
            log.setdefault("layer_input", []).append(StorageWeakRef(layer_input.untyped_storage()))
            return self.sublayer(layer_input)

    sites, sublayers = make_parts(site_class=SpySite)
    return sites, [SpySublayer(s) for s in sublayers]


def _alive(refs):
    return "".join("0" if ref.expired() else "1" for ref in refs)


@pytest.mark.parametrize("block_size, x_alive, layer_input_alive", [
    (None, "11111", "111111"),  # recompute off: x_1..x_5 and every layer input kept
    (1, "11111", "011111"),  # L_r = 1: only the first site's layer input (its block's own pre) goes
    (2, "01010", "001010"),  # blocks {0,1} {2,3} {4,5}: x_2, x_4 and the layer inputs crossing into them stay
    (3, "00100", "000100"),  # blocks {0,1,2} {3,4,5}
    (L, "00000", "000000"),  # one block: only x_0 (the caller's) is kept
])
def test_recompute_frees_block_internal_tensors(block_size, x_alive, layer_input_alive):
    log = {}
    sites, sublayers = _spy_parts(log)
    stack = MHCStack(sites, sublayers, recompute=block_size is not None, block_size=block_size)
    x = torch.randn(2, 5, N, C, requires_grad=True)
    out = stack(x)
    assert _alive(log["x"]) == x_alive
    assert _alive(log["layer_input"]) == layer_input_alive
    out.sum().backward()
    del out
    assert _alive(log["x"]) == "0" * len(log["x"])  # the replays' residuals too: freed with their last user


@pytest.mark.parametrize("recompute", [False, True], ids=["off", "on"])
def test_recomputed_norms_free_their_outputs(recompute):
    sites, bodies, norms = make_parts(norms=True)
    outputs = []

    class SpyNorm(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def forward(self, h):
            out = self.norm(h)
            outputs.append(StorageWeakRef(out.untyped_storage()))
            return out

    stack = MHCStack(sites, bodies, norms=[SpyNorm(n) for n in norms], recompute=recompute, block_size=L)
    x = torch.randn(2, 5, N, C, requires_grad=True)
    out = stack(x)
    assert _alive(outputs[:L]) == ("000000" if recompute else "111111")  # the first Linear of each body saved them
    out.sum().backward()


def test_each_block_is_replayed_once(monkeypatch):
    from mhc import recompute

    replays = []
    original = recompute._Block.replay
    monkeypatch.setattr(recompute._Block, "replay", lambda block: replays.append(block) or original(block))
    sites, sublayers = make_parts()
    x = torch.randn(2, 5, N, C, requires_grad=True)
    MHCStack(sites, sublayers, recompute=True, block_size=2)(x).sum().backward()
    assert len(replays) == 3 and len(set(map(id, replays))) == 3


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_sublayers(use_reentrant):
    """Recompute of the mHC ops together with torch.utils.checkpoint of every sub-layer: the same gradients as
    neither."""
    sites, sublayers = make_parts()
    x0, weight = inputs()
    want = step_grads(MHCStack(copy.deepcopy(sites), copy.deepcopy(sublayers)), x0, weight)
    stack = MHCStack(sites, sublayers)
    checkpointed = [lambda h, f=f: checkpoint(f, h, use_reentrant=use_reentrant) for f in sublayers]
    got = step_grads(stack, x0, weight,
                     forward=lambda x: run_sites(x, sites, checkpointed, recompute=True, block_size=3))
    assert_bitwise(got, want)


def test_autocast_bf16_sublayers_on_an_fp32_residual():
    sites, sublayers = make_parts()
    x0, weight = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = step_grads(MHCStack(copy.deepcopy(sites), copy.deepcopy(sublayers)), x0, weight)
        got = step_grads(MHCStack(sites, sublayers, recompute=True, block_size=3), x0, weight)
    assert_bitwise(got, want)


def test_identity_sublayer_and_retained_graph():
    """y is the layer input itself (recomputed, not kept); backward twice through a retained graph."""
    sites, _ = make_parts(num_sites=4)
    identities = [nn.Identity() for _ in sites]
    x0, weight = inputs()
    results = []
    for recompute in (False, True):
        stack = MHCStack(copy.deepcopy(sites), identities, recompute=recompute, block_size=4)
        x = x0.clone().requires_grad_()
        loss = (stack(x).double() * weight).sum()
        loss.backward(retain_graph=True)
        loss.backward()
        results.append([x.grad] + [p.grad for p in stack.parameters()])
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_sites_without_post_pre():
    """Any site with pre / post (here the demo's plain-PyTorch hyper-connection) runs through the chain."""
    from mhc.demo.model import HyperConnection

    sites = [HyperConnection(N, C, k, alpha_init=0.5) for k in range(4)]
    with torch.no_grad():
        for site in sites:
            site.theta.normal_()
    _, sublayers = make_parts(num_sites=4)
    x0, weight = inputs()
    want = step_grads(MHCStack(copy.deepcopy(sites), copy.deepcopy(sublayers)), x0, weight)
    assert_bitwise(step_grads(MHCStack(sites, sublayers, recompute=True, block_size=2), x0, weight), want)


def test_a_chain_entered_once_per_layer():
    """A model whose loop calls one layer (two sites) at a time shares one chain and enters it per call; the layers
    join with post then pre (as the converted Hugging Face layers do)."""
    sites, sublayers = make_parts()
    x0, weight = inputs()

    def layered(x):
        for layer in range(L // 2):
            a, b = 2 * layer, 2 * layer + 1
            layer_input, state = sites[a].pre(x)
            x, layer_input, state = sites[a].post_pre(x, sublayers[a](layer_input), state, sites[b])
            x = sites[b].post(x, sublayers[b](layer_input), state)
        return x

    def layered_recomputed(x):
        chain = SiteChain(L, block_size=4)
        for layer in range(L // 2):
            a, b = 2 * layer, 2 * layer + 1
            with chain:
                layer_input, state = chain.pre(sites[a], x)
                x, layer_input, state = chain.post_pre(sites[a], x, sublayers[a](layer_input), state, sites[b])
                x = chain.post(sites[b], x, sublayers[b](layer_input), state)
        return x

    stack = MHCStack(sites, sublayers)
    want = step_grads(stack, x0, weight, forward=layered)
    assert_bitwise(step_grads(stack, x0, weight, forward=layered_recomputed), want)


def test_no_grad_runs_the_sites_directly():
    sites, sublayers = make_parts()
    x0, _ = inputs()
    with torch.no_grad():
        want = MHCStack(sites, sublayers)(x0)
        assert torch.equal(MHCStack(sites, sublayers, recompute=True, block_size=2)(x0), want)


@pytest.mark.parametrize("changed", ["site", "sublayer"])
def test_a_tensor_changed_before_the_backward_raises(changed):
    """Autograd does not check the versions of tensors that saved-tensor hooks packed; the chain does."""
    sites, sublayers = make_parts()
    x = torch.randn(2, 5, N, C, requires_grad=True)
    out = MHCStack(sites, sublayers, recompute=True, block_size=3)(x)
    with torch.no_grad():
        (sites[4].base if changed == "site" else sublayers[1][1][0].weight).add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an in-place operation"):
        out.sum().backward()


def test_bad_arguments():
    sites, sublayers = make_parts()
    with pytest.raises(ValueError, match="block_size: expected at most"):
        MHCStack(sites, sublayers, recompute=True, block_size=L + 1)
    with pytest.raises(ValueError, match="block_size: expected an int >= 1"):
        MHCStack(sites, sublayers, recompute=True, block_size=0)
    with pytest.raises(ValueError, match="as many sub-layers as sites"):
        MHCStack(sites, sublayers[:-1])
    with pytest.raises(ValueError, match="sublayers: expected one per site"):
        run_sites(torch.randn(2, N, C), sites, sublayers[:-1], recompute=True)
    with pytest.raises(ValueError, match="start"):
        SiteChain(L, start=L)
    x = torch.randn(2, N, C, requires_grad=True)
    chain = SiteChain(2)
    with pytest.raises(RuntimeError, match="inside `with chain:`"):
        chain.pre(sites[0], x)
    with chain:
        layer_input, state = chain.pre(sites[0], x)
        x1, layer_input, state = chain.post_pre(sites[0], x, layer_input, state, sites[1])
        with pytest.raises(RuntimeError, match="this is the last one"):
            chain.post_pre(sites[1], x1, layer_input, state, sites[0])
        chain.post(sites[1], x1, layer_input, state)
        with pytest.raises(RuntimeError, match="more sites than num_sites"):
            chain.post(sites[1], x1, layer_input, state)


def _backward_graph_recording_backend(graphs: dict):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                        partition_fn=min_cut_rematerialization_partition)


def _count(gm, op) -> int:
    return sum(1 for node in gm.graph.nodes if node.target is op)


@pytest.mark.parametrize("recompute", [False, True], ids=["off", "on"])
@pytest.mark.parametrize("norms", [False, True], ids=["norm-inside", "norms-recomputed"])
def test_compiled_fullgraph_recomputes_in_the_backward_graph(recompute, norms, monkeypatch):
    """Under torch.compile the block-internal ops run in checkpoints: the partitioner moves them into the backward
    graph (2 blocks of 3 sites: the first pre and 2 x 2 internal post_pre), and the gradients are the eager ones
    (eager without the pre / post pairing of the first site, which compiled code does not use)."""
    monkeypatch.setattr(ops, "_pair_sites", False)
    torch._dynamo.reset()
    parts = make_parts(norms=norms)
    x0, weight = inputs()

    def stack(recompute):
        sites, sublayers, *norm_list = copy.deepcopy(parts)
        return MHCStack(sites, sublayers, norms=norm_list[0] if norm_list else None, recompute=recompute,
                        block_size=3)

    want = step_grads(stack(False), x0, weight)
    graphs = {}
    compiled_stack = stack(recompute)
    compiled = torch.compile(compiled_stack, backend=_backward_graph_recording_backend(graphs), fullgraph=True)
    assert_bitwise(step_grads(compiled_stack, x0, weight, forward=compiled), want)
    backward = graphs["backward"]
    assert _count(backward, torch.ops.mhc.post_pre.default) == (4 if recompute else 0)
    assert _count(backward, torch.ops.mhc.pre.default) == (1 if recompute else 0)
    assert _count(graphs["forward"], torch.ops.mhc.post_pre.default) == L - 1


@pytest.mark.slow
def test_compiled_inductor_matches_itself_without_recompute():
    torch._dynamo.reset()
    sites, sublayers = make_parts(num_sites=4)
    x0, weight = inputs()
    results = []
    for recompute in (False, True):
        stack = MHCStack(copy.deepcopy(sites), copy.deepcopy(sublayers), recompute=recompute, block_size=2)
        results.append(step_grads(stack, x0, weight, forward=torch.compile(stack, fullgraph=True)))
    for name, want in results[0].items():
        torch.testing.assert_close(results[1][name], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
