"""The demo's figure: training and validation loss, gradient norm and Amax gain for every variant."""
from __future__ import annotations

from pathlib import Path

# A bare Figure renders with Agg and never touches pyplot's global backend: works without a display and
# leaves the backend of a notebook that imports this alone.
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

COLORS = {"residual": "#555555", "hc": "#d62728", "mhc": "#1f77b4"}


def _smooth(values):
    """Centred moving average over about 1/40 of the run, so that the trend shows through per-batch noise
    without lagging behind it; the window shrinks at the ends."""
    half = max(len(values) // 80, 1)
    out = []
    for i in range(len(values)):
        window = values[max(i - half, 0):i + half + 1]
        out.append(sum(window) / len(window))
    return out


class _PlainLogFormatter(LogFormatter):
    """Labels the ticks LogFormatter would label, written as plain numbers (0.6, 2, 50) rather than 6e-01."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def _plain_log_axis(ax):
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PlainLogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


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
            ax_amax.annotate(f"{h['amax_forward_max'][-1]:.3g}", (h["step"][-1], h["amax_forward_max"][-1]),
                             xytext=(4, 0), textcoords="offset points", color=color, fontsize=9, va="center")
        if run["diverged_at_step"] is not None:
            for ax in (ax_train, ax_grad):
                ax.axvline(run["diverged_at_step"], color=color, linestyle=":", linewidth=1)

    ax_train.set_title("Training loss (per batch; line = moving average)")
    ax_train.set_ylabel("cross-entropy (nats / character)")
    ax_val.set_title("Validation loss (held-out text)")
    ax_val.set_ylabel("cross-entropy (nats / character)")
    ax_grad.set_title("Gradient norm before clipping")
    _plain_log_axis(ax_grad)
    ax_amax.set_title("Amax gain of the composite H_res over all layers (worst token)")
    ax_amax.axhline(1.0, color="black", linewidth=0.8, alpha=0.5)
    _plain_log_axis(ax_amax)
    ax_amax.margins(x=0.08)  # room for the final values written at the right end
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
