"""Turn a Hugging Face decoder (Llama / Qwen2 / Qwen3 / Mistral families of ``transformers``) into an mHC model.

:func:`convert_decoder` replaces every decoder layer, in place, by an :class:`MHCDecoderLayer` that keeps the
original layer (its weights and their names under ``.layer``) and adds two mHC sites, one around attention and one
around the MLP (docs/MATH.md section 1). Between decoder layers the residual travels as ``n`` streams, flattened to
``[B, S, n*C]`` so the model's own loop passes it on unchanged:

- the first layer copies the embedding ``[B, S, C]`` into ``n`` streams;
- inside a layer: ``pre`` of the attention site -> ``input_layernorm`` -> ``self_attn`` -> ``post`` of the attention
  site fused with ``pre`` of the MLP site (``MHC.post_pre``, one pass over the residual) -> ``post_attention_layernorm``
  -> ``mlp`` -> ``post`` of the MLP site;
- the last layer collapses the streams with :class:`mhc.MHCHead` to ``[B, S, C]``, before the model's final norm.

At initialisation every site computes ``x + F(x)`` on identical streams and the head takes their mean (see
:mod:`mhc.modules`), so the converted model's logits are close to the original's (within about 1% per site):
pretrained weights stay useful. ``generate`` with the KV cache works (the attention modules are the original ones).

``recompute=True`` recomputes the mHC intermediates in the backward (:mod:`mhc.recompute`): one chain of
``2 * num_layers`` sites runs through the model's own layer loop, each converted layer running its two sites in it.

Limits: ``output_hidden_states`` does not see the converted layers (transformers records the original layer
class); ``save_pretrained`` saves the weights but ``from_pretrained`` builds the plain model: rebuild it, call
``convert_decoder`` with the same arguments, then ``load_state_dict``. Transformers' gradient checkpointing does not
wrap the converted layers.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from .modules import MHC, MHCHead
from .recompute import SiteChain

__all__ = ["MHCDecoderLayer", "convert_decoder", "decoder_layers"]

_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class _RecomputePlan:
    """Shared by the converted layers of one model: the recomputation chain of the forward pass running now."""

    def __init__(self, num_sites: int, block_size: Optional[int]):
        self.num_sites, self.block_size = num_sites, block_size
        self.chain: Optional[SiteChain] = None

    def chain_for(self, first_site: int) -> SiteChain:
        if torch.compiler.is_compiling():  # stateless there: each layer's ops only need their site index
            return SiteChain(self.num_sites, block_size=self.block_size, start=first_site)
        if first_site == 0:
            self.chain = SiteChain(self.num_sites, block_size=self.block_size)
        elif self.chain is None or self.chain.next_site != first_site:
            raise RuntimeError(f"mhc.hf.MHCDecoderLayer: recompute: the layer of site {first_site} ran out of order "
                               "(the converted layers must run in sequence, from the first, in one forward pass)")
        chain = self.chain
        if first_site + 2 == self.num_sites:  # the last layer: the next forward pass starts a new chain
            self.chain = None
        return chain


class MHCDecoderLayer(nn.Module):
    """A pre-norm decoder layer (attention + MLP) with an mHC site around each residual branch.

    Input: ``[B, S, C]`` when ``expand`` (the first layer), else ``[B, S, n*C]``. Output: ``[B, S, C]`` when it has a
    head (the last layer), else ``[B, S, n*C]``. Other arguments are passed to the original attention module.
    """

    def __init__(self, layer: nn.Module, n: int, hidden_size: int, *, expand: bool, head: Optional[MHCHead],
                 returns_tuple: bool = False, recompute: Optional[_RecomputePlan] = None, layer_index: int = 0,
                 **mhc_kwargs):
        super().__init__()
        self.layer = layer
        self.n, self.hidden_size, self.expand, self.returns_tuple = n, hidden_size, expand, returns_tuple
        self.attn_site = MHC(n, hidden_size, **mhc_kwargs)
        self.mlp_site = MHC(n, hidden_size, **mhc_kwargs)
        self.head = head
        self._recompute, self.layer_index = recompute, layer_index
        if hasattr(layer, "attention_type"):  # read by some models' loops (sliding-window masks)
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: Tensor, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool = False, position_embeddings=None, **kwargs):
        n, C = self.n, self.hidden_size
        if self.expand:
            if hidden_states.shape[-1] != C:
                raise ValueError(f"mhc.hf.MHCDecoderLayer: hidden_states: expected [..., {C}] (the embedding), "
                                 f"got {list(hidden_states.shape)}")
            x = self.attn_site._ops.expand_streams(hidden_states, n)
        else:
            if hidden_states.shape[-1] != n * C:
                raise ValueError(f"mhc.hf.MHCDecoderLayer: hidden_states: expected [..., n*C] = [..., {n * C}] "
                                 f"(streams of the previous layer), got {list(hidden_states.shape)}")
            x = hidden_states.unflatten(-1, (n, C))
        layer = self.layer
        chain = None
        if self._recompute is not None and torch.is_grad_enabled():
            chain = self._recompute.chain_for(2 * self.layer_index)
        with chain if chain is not None else contextlib.nullcontext():
            # With recomputation the norms' outputs are recomputed too (SiteChain.run), not kept.
            norm = chain.run if chain is not None else (lambda f, h: f(h))
            layer_input, state = chain.pre(self.attn_site, x) if chain is not None else self.attn_site.pre(x)
            attn_out = _first_output(layer.self_attn(
                hidden_states=norm(layer.input_layernorm, layer_input), attention_mask=attention_mask,
                position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                position_embeddings=position_embeddings, **kwargs))
            if chain is not None:
                x, layer_input, state = chain.post_pre(self.attn_site, x, attn_out, state, self.mlp_site)
            else:
                x, layer_input, state = self.attn_site.post_pre(x, attn_out, state, self.mlp_site)
            mlp_out = layer.mlp(norm(layer.post_attention_layernorm, layer_input))
            if chain is not None:
                x = chain.post(self.mlp_site, x, mlp_out, state)
            else:
                x = self.mlp_site.post(x, mlp_out, state)
        out = self.head(x) if self.head is not None else x.flatten(-2)
        return (out,) if self.returns_tuple else out

    def extra_repr(self) -> str:
        return f"n={self.n}, hidden_size={self.hidden_size}, expand={self.expand}, head={self.head is not None}"


def _decoder_stack(model: nn.Module):
    """The module holding ``layers`` (ModuleList) and ``norm``: ``model.model`` of a *ForCausalLM, or the model."""
    for candidate in (getattr(model, "model", None), model):
        if isinstance(candidate, nn.Module) and isinstance(getattr(candidate, "layers", None), nn.ModuleList) \
                and isinstance(getattr(candidate, "norm", None), nn.Module):
            return candidate
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM or base model (``model.model.layers`` or ``model.layers``)."""
    stack = _decoder_stack(model)
    if stack is None:
        raise TypeError(f"mhc.hf: model: expected a Llama/Qwen2/Qwen3/Mistral-style decoder with .layers and .norm "
                        f"(or .model.layers), got {type(model).__name__}")
    return stack.layers


def convert_decoder(model: nn.Module, n: int = 4, *, head: str = "learned", recompute: bool = False,
                    recompute_block: Optional[int] = None, **mhc_kwargs) -> nn.Module:
    """Convert ``model`` in place (and return it): every decoder layer becomes an :class:`MHCDecoderLayer` with ``n``
    streams. ``head``: ``"learned"`` or ``"mean"`` (:class:`mhc.MHCHead`). ``recompute``: recompute the mHC
    intermediates in the backward, in blocks of ``recompute_block`` sites (two per layer; default the paper's
    :func:`mhc.recompute.default_block_size`). ``mhc_kwargs`` go to every :class:`mhc.MHC` site (``iters``,
    ``alpha_init``, ``static``, ``impl``, ...; the head takes ``impl`` and ``alpha_init``). The new parameters are
    float32 on the model's device. A model already converted raises ``ValueError``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"mhc.hf.convert_decoder: model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
        raise ValueError(f"mhc.hf.convert_decoder: n: expected an int in 1..64, got {n!r}")
    if head not in ("learned", "mean"):
        raise ValueError(f"mhc.hf.convert_decoder: head: expected 'learned' or 'mean', got {head!r}")
    stack = _decoder_stack(model)
    if stack is None:
        raise TypeError(f"mhc.hf.convert_decoder: model: expected a Llama/Qwen2/Qwen3/Mistral-style decoder with "
                        f".layers and .norm (or .model.layers), got {type(model).__name__}")
    layers = stack.layers
    if len(layers) == 0:
        raise ValueError("mhc.hf.convert_decoder: model: it has no decoder layers")
    if any(isinstance(layer, MHCDecoderLayer) for layer in layers):
        raise ValueError("mhc.hf.convert_decoder: model: already converted")
    for index, layer in enumerate(layers):
        missing = [part for part in _LAYER_PARTS if not isinstance(getattr(layer, part, None), nn.Module)]
        if missing:
            raise TypeError(f"mhc.hf.convert_decoder: model: decoder layer {index} ({type(layer).__name__}) lacks "
                            f"{missing}; only pre-norm attention + MLP layers (Llama/Qwen2/Qwen3/Mistral) convert")
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden_size, int):
        raise TypeError("mhc.hf.convert_decoder: model: expected model.config.hidden_size (an int)")
    # transformers < 4.54-style loops index the layer's output tuple (layer_outputs[0]); newer ones take a tensor.
    try:
        returns_tuple = "layer_outputs[0]" in inspect.getsource(type(stack).forward)
    except (OSError, TypeError):
        returns_tuple = False
    num_sites = 2 * len(layers)
    if recompute_block is not None and (isinstance(recompute_block, bool) or not isinstance(recompute_block, int)
                                        or not 1 <= recompute_block <= num_sites):
        raise ValueError(f"mhc.hf.convert_decoder: recompute_block: expected an int in 1..{num_sites} (two sites per "
                         f"layer), got {recompute_block!r}")
    plan = _RecomputePlan(num_sites, recompute_block) if recompute else None
    device = next(stack.parameters()).device
    last = len(layers) - 1
    for index in range(len(layers)):
        head_kwargs = {key: mhc_kwargs[key] for key in ("impl", "alpha_init") if key in mhc_kwargs}
        mhc_head = MHCHead(n, hidden_size, mode=head, **head_kwargs) if index == last else None
        converted = MHCDecoderLayer(layers[index], n, hidden_size, expand=index == 0, head=mhc_head,
                                    returns_tuple=returns_tuple, recompute=plan, layer_index=index, **mhc_kwargs)
        converted.attn_site.to(device)
        converted.mlp_site.to(device)
        if mhc_head is not None:
            mhc_head.to(device)
        layers[index] = converted
    return model
