"""Training loop of the demo: the same GPT trained with plain residuals, HC and mHC, with stability diagnostics."""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .corpus import Corpus, load_corpus
from .model import GPT, RESIDUAL_KINDS, ModelConfig, amax_gain

LABELS = {"residual": "residual", "hc": "HC (unconstrained)", "mhc": "mHC"}


@dataclass
class DemoConfig:
    # CPU defaults: about 2.5 epochs of the corpus. Short sequences and many steps learn faster here than long
    # sequences and few steps for the same compute (measured: val loss 2.04 vs 2.35 at 600 x 16 x 64 vs 600 x 8 x 128).
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 64
    width: int = 128
    depth: int = 4
    heads: int = 4
    n_streams: int = 4
    lr: float = 3e-3
    min_lr_fraction: float = 0.1  # cosine decay ends at lr * min_lr_fraction
    warmup_steps: int = 30
    weight_decay: float = 0.1
    dropout: float = 0.0
    grad_clip: float = 1.0  # the logged gradient norm is the one before clipping
    eval_interval: int = 100
    eval_batches: int = 8
    log_interval: int = 10
    seed: int = 1234
    device: str = "cpu"
    dtype: str = "float32"  # "bfloat16": autocast for the matmuls (CUDA default)
    variants: tuple = RESIDUAL_KINDS
    corpus: str | None = None  # None: the shipped Shakespeare
    out: str = "mhc_demo_out"
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    recompute: bool = False  # the mHC variant recomputes its intermediates in the backward (mhc.recompute)
    recompute_block: int | None = None  # sites per recomputation block; None: the paper's default
    preset: str | None = None  # the named size it started from (PRESETS), for the record

    def validate(self):
        for name in ("steps", "batch_size", "seq_len", "width", "depth", "heads", "n_streams", "eval_interval",
                     "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.width % self.heads != 0:
            raise ValueError(f"heads: width {self.width} is not divisible by heads {self.heads}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype: expected 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.recompute_block is not None and not 1 <= self.recompute_block <= 2 * self.depth:
            raise ValueError(f"recompute_block: expected 1..{2 * self.depth} (the number of sites), "
                             f"got {self.recompute_block}")
        bad = [v for v in self.variants if v not in RESIDUAL_KINDS]
        if bad or not self.variants:
            raise ValueError(f"variants: expected a non-empty subset of {RESIDUAL_KINDS}, got {self.variants}")


# Named sizes for `mhc demo --preset`. gpt2-small: GPT-2 small's width, depth and heads (85M parameters besides the
# embeddings; 24 sites), long enough on a GPU to compare the variants' validation loss (about 10 passes over the text,
# hence dropout 0.2).
PRESETS = {
    "gpt2-small": dict(steps=1200, batch_size=32, seq_len=256, width=768, depth=12, heads=12, lr=6e-4,
                       warmup_steps=100, dropout=0.2, eval_interval=200, eval_batches=16, dtype="bfloat16"),
}


def default_config(device: str, preset: str | None = None) -> DemoConfig:
    """Sizes for the device: on a 2-core CPU the three runs take about 5 minutes; on a GPU a larger, deeper model
    (16 sites) that sees the corpus about 30 times, hence dropout. ``preset``: one of :data:`PRESETS` instead."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
        return DemoConfig(**PRESETS[preset], device=device, preset=preset)
    if device.startswith("cuda"):
        return DemoConfig(steps=2000, batch_size=32, seq_len=128, width=384, depth=8, heads=6, lr=1e-3,
                          warmup_steps=100, dropout=0.2, eval_interval=200, eval_batches=16, device=device,
                          dtype="bfloat16")
    return DemoConfig(device=device)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device: {name!r} requested but torch sees no CUDA device")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda[:i]', got {name!r}")
    return name


def _lr_at(step: int, cfg: DemoConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    floor = cfg.lr * cfg.min_lr_fraction
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _optimizer(model: GPT, cfg: DemoConfig) -> torch.optim.Optimizer:
    hyper = {id(p) for p in model.hyper_connection_parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in hyper else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.device.startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def _autocast(cfg: DemoConfig):
    device_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")


@torch.no_grad()
def _evaluate(model: GPT, val_batches, cfg: DemoConfig) -> dict[str, float]:
    model.eval()
    losses, gains = [], []
    for xb, yb in val_batches:
        with _autocast(cfg):
            _, loss, combs = model(xb, yb)
        losses.append(loss.float())
        if combs:
            gains.append(amax_gain(combs))
    model.train()
    result = {"val_loss": torch.stack(losses).mean().item()}
    if gains:
        result["val_amax_forward_max"] = max(g["forward_max"].item() for g in gains)
        result["val_amax_backward_max"] = max(g["backward_max"].item() for g in gains)
    return result


def train_variant(kind: str, corpus: Corpus, cfg: DemoConfig, progress: bool = True) -> dict:
    """Trains one model and returns its history: per-step loss, gradient norm, Amax gain, tokens/s; evaluations."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)  # same initial weights for the parts the variants share, same data order
    mcfg = ModelConfig(vocab_size=corpus.vocab_size, seq_len=cfg.seq_len, width=cfg.width, depth=cfg.depth,
                       heads=cfg.heads, residual=kind, n_streams=cfg.n_streams, dropout=cfg.dropout,
                       recompute=cfg.recompute and kind == "mhc", recompute_block=cfg.recompute_block)
    model = GPT(mcfg).to(device)
    optimizer = _optimizer(model, cfg)
    # The whole schedule of windows is drawn up front (the same for every variant) and lives on the device,
    # so a step needs no host-to-device copy.
    train_data, val_data = corpus.train.to(device), corpus.val.to(device)
    train_starts = corpus.random_starts("train", cfg.steps, cfg.batch_size, cfg.seq_len,
                                        torch.Generator().manual_seed(cfg.seed)).to(device)
    val_starts = corpus.random_starts("val", cfg.eval_batches, cfg.batch_size, cfg.seq_len,
                                      torch.Generator().manual_seed(cfg.seed + 1)).to(device)
    val_batches = [corpus.windows(val_data, s, cfg.seq_len) for s in val_starts]

    history = {"step": [], "train_loss": [], "grad_norm": [], "lr": [], "tokens_per_s": [],
               "amax_forward_max": [], "amax_backward_max": [], "amax_forward_mean": [], "amax_backward_mean": [],
               "amax_single_max": []}
    evals: list[dict] = []
    pending: list[tuple] = []  # per-step device tensors, fetched every log_interval steps (one sync per flush)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    diverged_at = None

    def flush(elapsed: float, steps_done: int):
        nonlocal diverged_at
        if not pending:
            return
        rows = torch.stack([torch.stack(t) for _, _, t in pending]).tolist()
        tok_s = steps_done * tokens_per_step / max(elapsed, 1e-9)
        for (step, lr, _), row in zip(pending, rows):
            loss, gnorm = row[0], row[1]
            history["step"].append(step)
            history["train_loss"].append(loss)
            history["grad_norm"].append(gnorm)
            history["lr"].append(lr)
            history["tokens_per_s"].append(tok_s)
            if len(row) > 2:
                for key, value in zip(("amax_forward_max", "amax_backward_max", "amax_forward_mean",
                                       "amax_backward_mean", "amax_single_max"), row[2:]):
                    history[key].append(value)
            if diverged_at is None and not math.isfinite(loss):
                diverged_at = step
        pending.clear()

    bar = tqdm(total=cfg.steps, desc=f"{LABELS[kind]:>18}", unit="step", dynamic_ncols=True, disable=not progress)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    window_start, window_steps = start, 0
    for step in range(cfg.steps):
        lr = _lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        xb, yb = corpus.windows(train_data, train_starts[step], cfg.seq_len)
        with _autocast(cfg):
            _, loss, combs = model(xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()

        values = [loss.detach().float(), grad_norm.float()]
        if combs:
            g = amax_gain(combs)
            values += [g[k].float() for k in ("forward_max", "backward_max", "forward_mean", "backward_mean",
                                              "single_max")]
        pending.append((step, lr, values))
        window_steps += 1

        last = step == cfg.steps - 1
        evaluate = (step + 1) % cfg.eval_interval == 0 or last
        if (step + 1) % cfg.log_interval == 0 or evaluate:
            flush(time.perf_counter() - window_start, window_steps)
            if evaluate:  # evaluation time is kept out of tokens/s
                evals.append({"step": step, **_evaluate(model, val_batches, cfg)})
            window_start, window_steps = time.perf_counter(), 0
            postfix = {"loss": f"{history['train_loss'][-1]:.3f}"}
            if evals:
                postfix["val"] = f"{evals[-1]['val_loss']:.3f}"
            postfix["tok/s"] = f"{history['tokens_per_s'][-1]:,.0f}"
            bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if diverged_at is not None:
            break
    bar.close()
    wall = time.perf_counter() - start

    n_params = sum(p.numel() for p in model.parameters())
    n_hyper = sum(p.numel() for p in model.hyper_connection_parameters())
    return {
        "kind": kind,
        "label": LABELS[kind],
        "model": mcfg.to_dict(),
        "parameters": n_params,
        "hyper_connection_parameters": n_hyper,
        "wall_s": wall,
        "tokens_per_s": cfg.steps * tokens_per_step / wall if diverged_at is None else None,
        # what recomputation saves shows here (CUDA only: torch's CPU allocator keeps no statistics)
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "diverged_at_step": diverged_at,
        "history": history,
        "evals": evals,
    }


def summarize(runs: dict[str, dict]) -> dict[str, dict]:
    """Per variant: final losses and the stability figures the plot shows."""
    out = {}
    for kind, run in runs.items():
        h = run["history"]
        s = {
            "final_train_loss": _mean_tail(h["train_loss"], 10),
            "final_val_loss": run["evals"][-1]["val_loss"] if run["evals"] else None,
            "best_val_loss": min(e["val_loss"] for e in run["evals"]) if run["evals"] else None,
            "max_grad_norm": max(h["grad_norm"]),
            "median_grad_norm": _median(h["grad_norm"]),
            "final_grad_norm": _mean_tail(h["grad_norm"], 10),
            "diverged_at_step": run["diverged_at_step"],
            "wall_s": run["wall_s"],
            "tokens_per_s": run["tokens_per_s"],
            "peak_memory_bytes": run["peak_memory_bytes"],
        }
        if h["amax_forward_max"]:
            s["max_amax_forward"] = max(h["amax_forward_max"])
            s["max_amax_backward"] = max(h["amax_backward_max"])
            s["final_amax_forward"] = h["amax_forward_max"][-1]
            s["final_amax_backward"] = h["amax_backward_max"][-1]
        out[kind] = s
    return out


def _mean_tail(values, k):
    tail = values[-k:]
    return sum(tail) / len(tail)


def _median(values):
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def summary_paragraph(cfg: DemoConfig, summary: dict[str, dict], png: Path, js: Path) -> str:
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    parts = [f"{cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} characters ({tokens:,} tokens) on {cfg.device}, "
             f"width {cfg.width}, depth {cfg.depth}, n = {cfg.n_streams} streams"
             + (", mHC with recomputation." if cfg.recompute else ".")]
    losses = []
    for kind, s in summary.items():
        if s["diverged_at_step"] is not None:
            losses.append(f"{LABELS[kind]} diverged at step {s['diverged_at_step']}")
        else:
            losses.append(f"{LABELS[kind]} {s['final_val_loss']:.3f}")
    parts.append("Final validation loss (nats/char): " + ", ".join(losses) + ".")
    stab = [f"{LABELS[kind]} reached {s['max_amax_forward']:.3g} forward / {s['max_amax_backward']:.3g} backward "
            f"({s['final_amax_forward']:.3g} / {s['final_amax_backward']:.3g} at the end)"
            for kind, s in summary.items() if "max_amax_forward" in s]
    if stab:
        parts.append(f"Stability, as the Amax gain of the composite H_res over all {2 * cfg.depth} sites (worst token; "
                     "1 = a signal neither amplified nor damped): " + "; ".join(stab) + ".")
    parts.append("Largest gradient norm (median): " + ", ".join(
        f"{LABELS[k]} {s['max_grad_norm']:.3g} ({s['median_grad_norm']:.3g})" for k, s in summary.items()) + ".")
    parts.append("Wall time: " + ", ".join(f"{LABELS[k]} {s['wall_s']:.0f} s" for k, s in summary.items()) + ".")
    if all(s["peak_memory_bytes"] is not None for s in summary.values()):
        parts.append("Peak memory: " + ", ".join(f"{LABELS[k]} {s['peak_memory_bytes'] / 2**30:.2f} GiB"
                                                 for k, s in summary.items()) + ".")
    parts.append(f"Plot: {png}; numbers: {js}.")
    return " ".join(parts)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def environment() -> dict:
    import mhc

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        from mhc import _C

        info["mhc_version"] = _C.version()
        info["mhc_built_with_cuda"] = bool(_C.built_with_cuda())
    except ImportError as e:  # the demo's plain residual and HC runs do not need the extension
        info["mhc_extension_error"] = str(e)
    info["mhc_path"] = os.path.dirname(mhc.__file__)
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def run_demo(cfg: DemoConfig, quiet: bool = False) -> dict:
    """Trains every variant in cfg.variants, writes <out>/demo.png and <out>/demo.json, returns the results."""
    cfg.device = resolve_device(cfg.device)
    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    corpus = load_corpus(cfg.corpus)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"mhc demo: {len(corpus.train):,} training / {len(corpus.val):,} validation characters from "
              f"{corpus.source} (vocabulary {corpus.vocab_size}); device {cfg.device}, dtype {cfg.dtype}, "
              f"{torch.get_num_threads()} CPU threads", flush=True)

    start = time.perf_counter()
    runs = {}
    for kind in cfg.variants:
        runs[kind] = train_variant(kind, corpus, cfg, progress=not quiet)
    total_wall = time.perf_counter() - start

    summary = summarize(runs)
    png, js = out / "demo.png", out / "demo.json"
    results = {
        "config": asdict(cfg),
        "corpus": {"source": corpus.source, "train_chars": len(corpus.train), "val_chars": len(corpus.val),
                   "vocab_size": corpus.vocab_size},
        "environment": environment(),
        "total_wall_s": total_wall,
        "summary": summary,
        "runs": runs,
    }
    from .plots import plot_results

    plot_results(results, png)
    results["summary_text"] = summary_paragraph(cfg, summary, png, js)
    with open(js, "w") as f:
        json.dump(_json_safe(results), f, indent=1, allow_nan=False)
    if not quiet:
        print(f"\n{results['summary_text']}\nTotal wall time {total_wall:.1f} s.", flush=True)
    return results
