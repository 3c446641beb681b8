"""A small decoder-only transformer (GPT) whose residual connections are one of three kinds.

- ``residual``: the plain pre-norm residual stream, ``x = x + F(norm(x))``.
- ``hc``: unconstrained hyper-connections (Zhu et al. 2024, dynamic variant, as restated in the mHC paper, Eq. 5),
  written here in plain PyTorch (:class:`HyperConnection`).
- ``mhc``: manifold-constrained hyper-connections from this library (``mhc.StreamExpand``, ``mhc.MHC``,
  ``mhc.MHCHead``), whose H_res is projected onto the doubly stochastic matrices by Sinkhorn.

Every sub-layer F (attention or MLP) is wrapped by one "site". For ``hc`` and ``mhc`` a site is used as
``layer_input, state = site.pre(x)``; ``y = F(layer_input)``; ``x = site.post(x, y, state)``, where ``x`` holds n
streams ``[B, S, n, C]`` and ``state.comb[..., i, o]`` is H_res[o, i].
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

RESIDUAL_KINDS = ("residual", "hc", "mhc")


@dataclass
class ModelConfig:
    vocab_size: int
    seq_len: int
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    residual: str = "mhc"  # one of RESIDUAL_KINDS
    n_streams: int = 4  # n, for hc and mhc
    sinkhorn_iters: int = 20
    alpha_init: float = 0.01  # gating factors of hc and mhc (mHC paper, Table 5)
    dropout: float = 0.0  # on attention weights and on every sub-layer's output (training only)
    recompute: bool = False  # mhc only: recompute the mHC intermediates in the backward (mhc.recompute)
    recompute_block: int | None = None  # sites per recomputation block; None: the paper's sqrt(n L / (n + 2))

    def to_dict(self) -> dict:
        return asdict(self)


class HCState(NamedTuple):
    h_pre: torch.Tensor  # [..., n]
    h_post: torch.Tensor  # [..., n]
    comb: torch.Tensor  # [..., n, n], comb[i, o] = H_res[o, i]


class HyperConnection(nn.Module):
    """One unconstrained, dynamic hyper-connection site (HC paper; mHC paper Eq. 5), plain PyTorch.

    For the n streams ``x [..., n, C]`` of one token, with ``x~ = RMSNorm(x)`` taken per stream:

    - ``H_pre[i]    = b_pre[i]    + alpha_pre  * tanh(theta_pre . x~[i])``
    - ``H_post[i]   = b_post[i]   + alpha_post * tanh(theta_post . x~[i])``
    - ``H_res[o, i] = b_res[o, i] + alpha_res  * tanh(theta_res[o] . x~[i])``

    Initialisation as in the HC paper: ``theta = 0``; ``b_pre`` one-hot on stream ``site_index mod n``; ``b_post``
    all ones; ``b_res`` the identity; ``alpha = alpha_init``. Nothing constrains H_res afterwards: its rows and
    columns may sum to anything, which is what the Amax gain of the composite product across layers measures.
    """

    def __init__(self, n: int, width: int, site_index: int, alpha_init: float = 0.01):
        super().__init__()
        self.n = n
        # Columns: [pre, post, res_0 .. res_{n-1}]; one projection for all three keeps it one matmul.
        self.theta = nn.Parameter(torch.zeros(width, 2 + n))
        b_pre = torch.zeros(n)
        b_pre[site_index % n] = 1.0
        self.b_pre = nn.Parameter(b_pre)
        self.b_post = nn.Parameter(torch.ones(n))
        self.b_res = nn.Parameter(torch.eye(n))
        self.alpha = nn.Parameter(torch.full((3,), float(alpha_init)))

    def coefficients(self, x: torch.Tensor) -> HCState:
        coef_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp32 coefficients, as mHC
        with torch.autocast(x.device.type, enabled=False):  # keep them fp32 under autocast too
            x_norm = F.rms_norm(x.to(coef_dtype), (x.shape[-1],), eps=1e-6)
            proj = torch.tanh(x_norm @ self.theta.to(coef_dtype))  # [..., n(stream i), 2 + n]
        h_pre = self.b_pre + self.alpha[0] * proj[..., 0]
        h_post = self.b_post + self.alpha[1] * proj[..., 1]
        # comb[i, o] = H_res[o, i] = b_res[o, i] + alpha_res * tanh(theta_res[o] . x~[i])
        comb = self.b_res.t() + self.alpha[2] * proj[..., 2:]
        return HCState(h_pre, h_post, comb)

    # Broadcast multiply-adds rather than einsum/matmul: on CPU, batched 4x4 matmuls over every token are
    # several times slower than these elementwise passes.
    def pre(self, x: torch.Tensor):
        state = self.coefficients(x)
        layer_input = (state.h_pre.to(x.dtype).unsqueeze(-1) * x).sum(dim=-2)
        return layer_input, state

    def post(self, x: torch.Tensor, y: torch.Tensor, state: HCState) -> torch.Tensor:
        comb = state.comb.to(x.dtype)
        out = state.h_post.to(x.dtype).unsqueeze(-1) * y.to(x.dtype).unsqueeze(-2)
        for i in range(self.n):  # x_next[o] += comb[i, o] * x[i]
            out = out + comb[..., i, :, None] * x[..., i, None, :]
        return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.width % cfg.heads != 0:
            raise ValueError(f"heads: width {cfg.width} is not divisible by heads {cfg.heads}")
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.norm = nn.RMSNorm(cfg.width, eps=1e-6)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The sub-layer after its pre-norm (the residual kinds with sites run the norm themselves)."""
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        return F.dropout(self.proj(out.transpose(1, 2).reshape(B, S, C)), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dropout = cfg.dropout
        self.norm = nn.RMSNorm(cfg.width, eps=1e-6)
        self.fc = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The sub-layer after its pre-norm."""
        return F.dropout(self.proj(F.gelu(self.fc(x))), self.dropout, self.training)


class GPT(nn.Module):
    """Character-level GPT: token + learned position embeddings, ``depth`` blocks of (attention, MLP), tied head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.residual not in RESIDUAL_KINDS:
            raise ValueError(f"residual: expected one of {RESIDUAL_KINDS}, got {cfg.residual!r}")
        if cfg.residual != "residual" and cfg.n_streams < 1:
            raise ValueError(f"n_streams: expected >= 1, got {cfg.n_streams}")
        if cfg.recompute and cfg.residual != "mhc":
            raise ValueError(f"recompute: only the mhc residual recomputes, got residual={cfg.residual!r}")
        if cfg.recompute_block is not None and not 1 <= cfg.recompute_block <= 2 * cfg.depth:
            raise ValueError(f"recompute_block: expected 1..{2 * cfg.depth} (the number of sites), "
                             f"got {cfg.recompute_block}")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.seq_len, cfg.width)
        self.sublayers = nn.ModuleList()
        for _ in range(cfg.depth):
            self.sublayers.append(Attention(cfg))
            self.sublayers.append(MLP(cfg))
        self.final_norm = nn.RMSNorm(cfg.width, eps=1e-6)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight
        self._init_weights()

        n, C = cfg.n_streams, cfg.width
        if cfg.residual == "mhc":
            import mhc  # the library under demonstration

            self.expand = mhc.StreamExpand(n)
            self.sites = nn.ModuleList(
                mhc.MHC(n, C, iters=cfg.sinkhorn_iters, alpha_init=cfg.alpha_init) for _ in self.sublayers
            )
            self.head = mhc.MHCHead(n, C)
        elif cfg.residual == "hc":
            self.sites = nn.ModuleList(
                HyperConnection(n, C, k, alpha_init=cfg.alpha_init) for k in range(len(self.sublayers))
            )

    def _init_weights(self):
        # GPT-2 style: N(0, 0.02), output projections scaled by 1/sqrt(number of residual additions).
        for name, p in self.named_parameters():
            if p.dim() < 2 or "norm" in name:
                continue
            std = 0.02 / math.sqrt(2 * self.cfg.depth) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)

    def hyper_connection_parameters(self):
        """Parameters of the sites, expand and head (kept out of weight decay)."""
        for name in ("sites", "expand", "head"):
            module = getattr(self, name, None)
            if module is not None:
                yield from module.parameters()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Returns (logits, loss or None, combs), combs being the per-site ``comb [B, S, n, n]`` (empty for
        ``residual``), detached, in site order: what the Amax gain diagnostic multiplies."""
        B, S = idx.shape
        if S > self.cfg.seq_len:
            raise ValueError(f"idx: sequence length {S} exceeds the model's seq_len {self.cfg.seq_len}")
        pos = torch.arange(S, device=idx.device)
        h = self.token_embedding(idx) + self.position_embedding(pos)
        combs: list[torch.Tensor] = []
        kind = self.cfg.residual
        if kind == "residual":
            for sublayer in self.sublayers:
                h = h + sublayer(h)
        else:
            from mhc.recompute import run_sites

            if kind == "mhc":
                x = self.expand(h)
            else:  # HC paper: the initial hyper hidden matrix is n copies of the embedding
                x = h.unsqueeze(-2).expand(B, S, self.cfg.n_streams, self.cfg.width)
            # Site by site: pre, norm, sub-layer, then post fused with the next site's pre (mHC) or post and pre
            # (HC). With recomputation the norms' outputs are recomputed too.
            states: list = []
            x = run_sites(x, self.sites, [s.body for s in self.sublayers], norms=[s.norm for s in self.sublayers],
                          recompute=self.cfg.recompute, block_size=self.cfg.recompute_block, states=states)
            combs = [state.comb.detach() for state in states]
            # mHC: the library's learned head. HC: the HC paper sums the streams; the mean differs only by the
            # factor n, which the final RMSNorm removes (up to its eps), and keeps HC at init exactly the residual net.
            h = self.head(x) if kind == "mhc" else x.mean(dim=-2)
        logits = self.lm_head(self.final_norm(h))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss, combs


def amax_gain(combs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Amax gain magnitude (mHC paper, section 3.1) of the composite residual mapping across all sites, from the
    library's ``mhc.diagnostics.amax_gain``.

    With ``H_l = comb_l^T`` the residual matrix of site l, the composite is ``P = H_L ... H_2 H_1`` for every token.
    Forward gain: the largest absolute row sum of P (how much a signal can be amplified from input to output);
    backward gain: the largest absolute column sum (the same for gradients). 1 for a plain residual network and,
    up to Sinkhorn's tolerance, for mHC (a product of doubly stochastic matrices is doubly stochastic).
    Returns 0-d float64 tensors: the worst token (``*_max``) and the token mean (``*_mean``), plus the worst single
    site's forward gain (``single_max``). Stays on the device (no host sync)."""
    from mhc.diagnostics import amax_gain as library_amax_gain

    if not combs:
        raise ValueError("combs: empty (the plain residual model has no H_res)")
    per_token = library_amax_gain(list(combs), reduce="none")
    single = torch.stack([library_amax_gain([comb], reduce="max").forward for comb in combs])
    return {
        "forward_max": per_token.forward.max(),
        "forward_mean": per_token.forward.mean(),
        "backward_max": per_token.backward.max(),
        "backward_mean": per_token.backward.mean(),
        "single_max": single.max(),
    }
