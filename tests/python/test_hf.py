"""mhc.hf.convert_decoder on Hugging Face decoders built from tiny configs (no download): the wiring of one
converted layer against a hand-written composition of mhc.reference ops, logits at initialisation against the
original plain-residual model, fused vs plain-PyTorch sites, forward + backward, the KV cache and generate,
bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mhc
from mhc import reference
from mhc.hf import MHCDecoderLayer, convert_decoder

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

VOCAB, HIDDEN = 61, 48


def _families():
    families = [("llama", "LlamaConfig", "LlamaForCausalLM"), ("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
                ("mistral", "MistralConfig", "MistralForCausalLM"), ("qwen3", "Qwen3Config", "Qwen3ForCausalLM")]
    return [pytest.param(config, model, id=name) for name, config, model in families
            if hasattr(transformers, config) and hasattr(transformers, model)]


def _tiny(config_name: str, model_name: str, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=80, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, head_dim=HIDDEN // 4)
    return getattr(transformers, model_name)(config).eval()


def _randomise(site: mhc.MHC, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        site.base.copy_(torch.randn(site.base.shape, generator=g))
        site.fn.copy_(torch.randn(site.fn.shape, generator=g) / site.fn.shape[1] ** 0.5)
        site.scale.copy_(torch.rand(3, generator=g) + 0.5)


class _FakeAttention(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.proj = nn.Linear(C, C)

    def forward(self, hidden_states, **kwargs):
        return torch.tanh(self.proj(hidden_states)), None


class _FakeDecoderLayer(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(C)
        self.self_attn = _FakeAttention(C)
        self.post_attention_layernorm = nn.RMSNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))


@pytest.mark.parametrize("expand, with_head", [(True, False), (False, False), (False, True), (True, True)])
def test_layer_wiring_matches_reference_composition(expand, with_head):
    torch.manual_seed(1)
    n, C, B, S = 3, 10, 2, 5
    layer = _FakeDecoderLayer(C).double()
    head = mhc.MHCHead(n, C) if with_head else None
    converted = MHCDecoderLayer(layer, n, C, expand=expand, head=head)
    _randomise(converted.attn_site, 2)
    _randomise(converted.mlp_site, 3)
    hidden = torch.randn(B, S, C if expand else n * C, dtype=torch.float64)
    got = converted(hidden)

    x = hidden.unsqueeze(-2).expand(B, S, n, C) if expand else hidden.unflatten(-1, (n, C))
    for site, branch in ((converted.attn_site, lambda h: layer.self_attn(layer.input_layernorm(h))[0]),
                         (converted.mlp_site, lambda h: layer.mlp(layer.post_attention_layernorm(h)))):
        layer_input, _, h_post, comb = reference.mhc_pre(x, site.fn, site.base, site.scale, **site._hyper())
        x = reference.mhc_post(x, branch(layer_input), h_post, comb)
    want = reference.mhc_head(x, head.fn, head.base, head.scale, eps=head.eps) if with_head else x.flatten(-2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config_name, model_name", _families())
def test_converted_model_starts_near_the_plain_model(config_name, model_name):
    model = _tiny(config_name, model_name)
    plain = copy.deepcopy(model)
    originals = [layer for layer in model.model.layers]
    n = 4
    assert convert_decoder(model, n=n) is model
    layers = model.model.layers
    assert all(isinstance(layer, MHCDecoderLayer) for layer in layers)
    assert [layer.layer for layer in layers] == originals  # original weights kept, same objects
    assert layers[0].expand and not layers[1].expand and layers[-1].head is not None and layers[0].head is None
    carried = []
    layers[0].register_forward_hook(lambda module, args, out: carried.append(out.shape))
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
        want = plain(ids, use_cache=False).logits
    assert carried == [torch.Size([2, 7, n * HIDDEN])]  # streams between layers
    assert ((got - want).norm() / want.norm()).item() < 0.01


@pytest.mark.parametrize("config_name, model_name", _families()[:2])
def test_fused_sites_match_plain_pytorch_sites(config_name, model_name):
    model = convert_decoder(_tiny(config_name, model_name), n=3)
    for index, module in enumerate(m for m in model.modules() if isinstance(m, mhc.MHC)):
        _randomise(module, 10 + index)
    torch_sites = copy.deepcopy(model)
    for module in torch_sites.modules():
        if isinstance(module, (mhc.MHC, mhc.MHCHead)):
            module.impl = "torch"
    ids = torch.randint(0, VOCAB, (2, 6))
    fused = model(ids, labels=ids, use_cache=False)
    plain = torch_sites(ids, labels=ids, use_cache=False)
    torch.testing.assert_close(fused.logits, plain.logits, rtol=1e-4, atol=1e-5)
    fused.loss.backward()
    plain.loss.backward()
    for (name, p), q in zip(model.named_parameters(), torch_sites.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_training_step_reaches_every_new_parameter():
    model = convert_decoder(_tiny("LlamaConfig", "LlamaForCausalLM"), n=4, head="learned").train()
    ids = torch.randint(0, VOCAB, (3, 8))
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    new = [(name, p) for name, p in model.named_parameters() if "_site." in name or ".head." in name]
    assert len(new) == 2 * 2 * 3 + 3  # 2 layers x 2 sites x (fn, base, scale) + head (fn, base, scale)
    for name, p in new:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("config_name, model_name", _families()[:3])
def test_kv_cache_and_generate(config_name, model_name):
    model = convert_decoder(_tiny(config_name, model_name, layers=3), n=2)
    for index, module in enumerate(m for m in model.modules() if isinstance(m, mhc.MHC)):
        _randomise(module, 20 + index)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        prefix = model(ids[:, :6], use_cache=True)
        cache = prefix.past_key_values
        steps = [model(ids[:, k:k + 1], past_key_values=cache, use_cache=True).logits for k in range(6, 9)]
    torch.testing.assert_close(torch.cat([prefix.logits] + steps, dim=1), full, rtol=1e-4, atol=1e-5)
    prompt = ids[:, :4]
    attention_mask = torch.ones_like(prompt)
    cached = model.generate(prompt, attention_mask=attention_mask, max_new_tokens=5, do_sample=False,
                            pad_token_id=0)
    uncached = model.generate(prompt, attention_mask=attention_mask, max_new_tokens=5, do_sample=False,
                              use_cache=False, pad_token_id=0)
    assert cached.shape == (1, 9) and torch.equal(cached, uncached)


def test_single_layer_and_mean_head():
    model = _tiny("LlamaConfig", "LlamaForCausalLM", layers=1)
    plain = copy.deepcopy(model)
    convert_decoder(model, n=4, head="mean", static=True)
    only = model.model.layers[0]
    assert only.expand and only.head.mode == "mean" and only.attn_site.static
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        got, want = model(ids).logits, plain(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 0.01


def test_bad_input():
    with pytest.raises(TypeError, match="model"):
        convert_decoder("llama")
    with pytest.raises(TypeError, match="model"):
        convert_decoder(nn.Linear(4, 4))
    model = _tiny("LlamaConfig", "LlamaForCausalLM")
    with pytest.raises(ValueError, match="n"):
        convert_decoder(model, n=0)
    with pytest.raises(ValueError, match="head"):
        convert_decoder(model, head="max")
    broken = _tiny("LlamaConfig", "LlamaForCausalLM")
    del broken.model.layers[1].mlp
    with pytest.raises(TypeError, match="mlp"):
        convert_decoder(broken)
    assert not any(isinstance(layer, MHCDecoderLayer) for layer in broken.model.layers)  # checked before changing
    convert_decoder(model, n=2)
    with pytest.raises(ValueError, match="already converted"):
        convert_decoder(model)
    with pytest.raises(ValueError, match="hidden_states"):
        model.model.layers[1](torch.randn(1, 3, HIDDEN))


def test_amax_gain_of_a_converted_model():
    model = convert_decoder(_tiny("LlamaConfig", "LlamaForCausalLM", layers=3), n=4)
    ids = torch.randint(0, VOCAB, (2, 6))
    with mhc.diagnostics.CombRecorder(model) as recorder, torch.no_grad():
        model(ids, use_cache=False)
    assert recorder.site_names == [f"model.layers.{i}.{site}" for i in range(3) for site in ("attn_site", "mlp_site")]
    gain = recorder.amax_gain(cumulative=True)
    assert gain.forward.shape == (6,)
    # Sinkhorn makes every comb doubly stochastic up to eps: the composite neither amplifies nor damps
    assert (gain.forward - 1).abs().max() < 1e-3 and (gain.backward - 1).abs().max() < 1e-3


# Replays per step: one per block (each recomputes at least its sites' norm outputs).
@pytest.mark.parametrize("block, replays_per_step", [(None, 3), (1, 6), (3, 2), (6, 1)])
def test_recompute_gives_the_same_gradients(block, replays_per_step, monkeypatch):
    """One recomputation chain through the model's own layer loop (3 layers, 6 sites; the default block is 2):
    bit-identical gradients, every block replayed once per step."""
    from mhc import recompute as rc

    replays = []
    replay = rc._Block.replay
    monkeypatch.setattr(rc._Block, "replay", lambda b: replays.append(b) or replay(b))
    results = []
    for recompute in (False, True):
        model = convert_decoder(_tiny("LlamaConfig", "LlamaForCausalLM", layers=3), n=4, recompute=recompute,
                                recompute_block=block if recompute else None).train()
        for index, layer in enumerate(mhc.hf.decoder_layers(model)):
            _randomise(layer.attn_site, 2 * index)
            _randomise(layer.mlp_site, 2 * index + 1)
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
        for _ in range(2):  # a second step starts a new chain
            model.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids).loss
            loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (want_loss, want), (got_loss, got) = results
    assert len(replays) == 2 * replays_per_step
    assert torch.equal(got_loss, want_loss) and got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_recompute_bad_block_and_layers_out_of_order():
    with pytest.raises(ValueError, match="recompute_block"):
        convert_decoder(_tiny("LlamaConfig", "LlamaForCausalLM"), recompute=True, recompute_block=5)
    model = convert_decoder(_tiny("LlamaConfig", "LlamaForCausalLM", layers=2), n=2, recompute=True)
    second = mhc.hf.decoder_layers(model)[1]
    with pytest.raises(RuntimeError, match="out of order"):
        second(torch.randn(1, 4, 2 * HIDDEN, requires_grad=True),
               position_embeddings=model.model.rotary_emb(torch.randn(1, 4, HIDDEN), torch.arange(4)[None]))
    with torch.no_grad():  # inference does not use the chain
        assert model(torch.randint(0, VOCAB, (1, 4))).logits.shape == (1, 4, VOCAB)


def test_recompute_under_torch_compile(monkeypatch):
    """The converted model with recomputation compiles as one graph (aot_eager) with the eager model's gradients
    (eager without the pre / post pairing, which compiled code does not use)."""
    from mhc import ops

    monkeypatch.setattr(ops, "_pair_sites", False)
    torch._dynamo.reset()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    grads = []
    for recompute, compiled in ((False, False), (True, True)):
        model = convert_decoder(_tiny("LlamaConfig", "LlamaForCausalLM", layers=3), n=4, recompute=recompute,
                                recompute_block=3).train()
        forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        forward(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
