"""Pictures of a run: ``curves.png`` (loss, learning rate, validation accuracy against steps),
drawn from metrics.jsonl with matplotlib's file-only backend."""

from __future__ import annotations

from pathlib import Path

from tinymath.base.runs import CURVES, read_metrics


def plot_curves(run: Path) -> Path | None:
    """Draw RUN/curves.png from RUN/metrics.jsonl; returns its path (None if there is nothing yet)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run)
    if not rows:
        return None
    panels = [("loss", "train loss"), ("lr", "learning rate")]
    if any("val_accuracy" in r for r in rows):
        panels.append(("val_accuracy", "validation accuracy"))
    if any("reward" in r for r in rows):
        panels.append(("reward", "mean reward of the samples"))
    if any("retention_kl" in r for r in rows):
        panels.append(("retention_kl", "drift from base: KL (nats/token)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None)
        if key == "loss" and any("val_loss" in r for r in rows):
            val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
            ax.plot([p[0] for p in val], [p[1] for p in val], marker="s", label="validation")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    target = Path(run) / CURVES
    tmp = target.with_name(".curves.png.tmp")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    tmp.replace(target)
    return target
