"""torch.compile(fullgraph=True) of a tiny 4-layer mHC transformer, forward and backward, matches eager.

fullgraph=True turns any graph break (an untraceable op, a .item(), a data-dependent branch) into an error,
so these tests also check that the custom ops and their autograd trace end to end."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mhc
from conftest import assert_close, requires_cuda


class Attention(nn.Module):
    def __init__(self, C, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.proj = nn.Linear(C, C, bias=False)

    def forward(self, h):
        B, S, C = h.shape
        q, k, v = self.qkv(h).view(B, S, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(B, S, C))


class TinyMHCTransformer(nn.Module):
    """Embedding -> n streams -> layers of (attention site, MLP site) -> head -> logits.

    Consecutive sites are joined with the fused post_pre op, as a production model would."""

    def __init__(self, vocab=64, C=32, n=4, layers=4, heads=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, C)
        self.expand = mhc.StreamExpand(n)
        self.sites = nn.ModuleList(mhc.MHC(n, C) for _ in range(2 * layers))
        self.norms = nn.ModuleList(nn.RMSNorm(C) for _ in range(2 * layers))
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(Attention(C, heads))
            self.blocks.append(nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C)))
        self.head = mhc.MHCHead(n, C)
        self.out_norm = nn.RMSNorm(C)
        self.lm_head = nn.Linear(C, vocab, bias=False)

    def forward(self, tokens):
        x = self.expand(self.embed(tokens))
        layer_input, state = self.sites[0].pre(x)
        for i, (site, norm, block) in enumerate(zip(self.sites, self.norms, self.blocks)):
            y = block(norm(layer_input))
            if i + 1 < len(self.sites):
                x, layer_input, state = site.post_pre(x, y, state, self.sites[i + 1])
            else:
                x = site.post(x, y, state)
        return self.lm_head(self.out_norm(self.head(x)))


def loss_and_grads(forward, model, tokens, targets):
    """Loss of forward(tokens) and the gradients of model's parameters (forward may be model compiled)."""
    logits = forward(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("device, backend", [
    pytest.param("cpu", "aot_eager", id="cpu-aot_eager"),
    # inductor's C++ code generation for this model takes about 100 s on 2 cores
    pytest.param("cpu", "inductor", id="cpu-inductor", marks=pytest.mark.slow),
    pytest.param("cuda", "aot_eager", id="cuda-aot_eager", marks=requires_cuda),
    pytest.param("cuda", "inductor", id="cuda-inductor", marks=requires_cuda),
])
def test_compiled_transformer_matches_eager(device, backend):
    torch._dynamo.reset()
    model = TinyMHCTransformer().to(device)
    with torch.no_grad():  # leave the symmetric initialisation so every coefficient matters
        for name, p in model.named_parameters():
            if ".fn" in name or ".scale" in name:
                p.add_(0.3 * torch.randn_like(p))
    clone = copy.deepcopy(model)
    compiled = torch.compile(clone, backend=backend, fullgraph=True)
    tokens = torch.randint(0, 64, (2, 16), device=device)
    targets = torch.randint(0, 64, (2, 16), device=device)
    want_loss, want_grads = loss_and_grads(model, model, tokens, targets)
    for _ in range(2):  # the second call reuses the compiled graphs
        loss, grads = loss_and_grads(compiled, clone, tokens, targets)
        assert_close(loss, want_loss, name="loss")
        for name, want in want_grads.items():
            s = max(1e-3, want.abs().max().item())
            # inductor reorders the float32 arithmetic of the surrounding torch layers
            torch.testing.assert_close(grads[name] / s, want / s, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_compiled_ops_trace_without_graph_breaks():
    """Every public op inside one fullgraph region, with leading dims and dynamic shapes."""
    n, C = 3, 8
    site = mhc.MHC(n, C)
    head = mhc.MHCHead(n, C)

    def f(e, res):
        x = mhc.expand_streams(e, n)
        layer_input, state = site.pre(x)
        x2, agg = mhc.residual_add_agg(x, res, state.h_pre)
        x3 = site.post(x2, layer_input + agg, state)
        comb = mhc.sinkhorn(state.comb.log())
        return head(x3).sum() + comb.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (5, 9):
        e = torch.randn(2, T, C, requires_grad=True)
        res = torch.randn(2, T, n, C)
        got = compiled(e, res)
        (grad,) = torch.autograd.grad(got, e)
        e2 = e.detach().requires_grad_()
        want = f(e2, res)
        (want_grad,) = torch.autograd.grad(want, e2)
        assert_close(got.detach(), want.detach())
        assert_close(grad, want_grad)
