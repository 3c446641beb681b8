"""The demo's figure: training and validation loss, gradient norm and Amax gain for every variant."""
from __future__ import annotations

from pathlib import Path

# A bare Figure renders with Agg and never touches pyplot's global backend: works without a display and
# leaves the backend of a notebook that imports this alone.
from matplotlib.figure import Figure

COLORS = {"residual": "#555555", "hc": "#d62728", "mhc": "#1f77b4"}


def _smooth(values, alpha=0.1):
    """Exponential moving average, so that the trend shows through per-batch noise."""
    out, avg = [], None
    for v in values:
        avg = v if avg is None else (1 - alpha) * avg + alpha * v
        out.append(avg)
    return out


def plot_results(results: dict, path: str | Path) -> Path:
    cfg = results["config"]
    runs = results["runs"]
    fig = Figure(figsize=(12, 8.5))
    axes = fig.subplots(2, 2)
    ax_train, ax_val, ax_grad, ax_amax = axes.ravel()

    for kind, run in runs.items():
        h, color, label = run["history"], COLORS[kind], run["label"]
        ax_train.plot(h["step"], h["train_loss"], color=color, alpha=0.18, linewidth=0.8)
        ax_train.plot(h["step"], _smooth(h["train_loss"]), color=color, label=label, linewidth=1.6)
        if run["evals"]:
            ax_val.plot([e["step"] for e in run["evals"]], [e["val_loss"] for e in run["evals"]], "o-",
                        color=color, label=label, markersize=4)
        ax_grad.plot(h["step"], h["grad_norm"], color=color, alpha=0.25, linewidth=0.8)
        ax_grad.plot(h["step"], _smooth(h["grad_norm"]), color=color, label=label, linewidth=1.6)
        if h["amax_forward_max"]:
            ax_amax.plot(h["step"], h["amax_forward_max"], color=color, label=f"{label}: forward (row sums)",
                         linewidth=1.6)
            ax_amax.plot(h["step"], h["amax_backward_max"], color=color, linestyle="--",
                         label=f"{label}: backward (column sums)", linewidth=1.6)
        if run["diverged_at_step"] is not None:
            for ax in (ax_train, ax_grad):
                ax.axvline(run["diverged_at_step"], color=color, linestyle=":", linewidth=1)

    ax_train.set_title("Training loss (per batch; line = moving average)")
    ax_train.set_ylabel("cross-entropy (nats / character)")
    ax_val.set_title("Validation loss (held-out text)")
    ax_val.set_ylabel("cross-entropy (nats / character)")
    ax_grad.set_title("Gradient norm before clipping")
    ax_grad.set_yscale("log")
    ax_amax.set_title("Amax gain of the composite H_res over all layers (worst token)")
    ax_amax.axhline(1.0, color="black", linewidth=0.8, alpha=0.5)
    ax_amax.set_yscale("log")
    for ax in axes.ravel():
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    # Loss panels: start the y range below the initial loss so that the differences late in training are visible.
    for ax in (ax_train, ax_val):
        lo, hi = ax.get_ylim()
        finals = [r["history"]["train_loss"][-1] for r in runs.values() if r["history"]["train_loss"]]
        if finals:
            ax.set_ylim(lo, min(hi, max(finals) + 1.5))

    fig.suptitle(f"mhc demo: residual vs HC vs mHC (n = {cfg['n_streams']}), character-level GPT, "
                 f"width {cfg['width']}, depth {cfg['depth']}, {cfg['steps']} steps on {cfg['device']}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
