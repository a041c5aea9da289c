"""Loss and learning-rate curves as one PNG, drawn with matplotlib's Agg canvas directly (no pyplot:
no global backend state, safe inside a training process or a server thread)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

LOSS_COLOR, SMOOTH_COLOR, LR_COLOR, SKIP_COLOR = "#9db4d6", "#1f4e96", "#2a8a5c", "#c62828"


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving mean; near the ends it averages the points that exist (no lag, no edge dip)."""
    if window <= 1 or len(values) < 3:
        return values
    kernel = np.ones(window)
    sums = np.convolve(values, kernel, mode="same")
    counts = np.convolve(np.ones_like(values), kernel, mode="same")
    return sums / counts


def curves_png(records: list[dict[str, Any]], checkpoint_steps: list[int] = (), *, dpi: int = 150) -> bytes:
    """Loss per step (raw, smoothed, skipped steps marked) beside the learning rate per step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(1, 2, width_ratios=(3, 2))

    trained = [r for r in records if not r.get("skipped") and r.get("loss") is not None]
    steps = np.array([r["step"] for r in trained], dtype=float)
    losses = np.array([r["loss"] for r in trained], dtype=float)
    window = min(101, len(trained) // 20) | 1  # odd, ~5% of the run; 1 (none) below 40 steps
    if window > 1:
        loss_ax.plot(steps, losses, color=LOSS_COLOR, linewidth=0.8, label="loss")
        loss_ax.plot(steps, smooth(losses, window), color=SMOOTH_COLOR, linewidth=1.8, label=f"{window}-step mean")
    elif len(trained):  # too few points to smooth: each one shown
        loss_ax.plot(steps, losses, "o-", color=SMOOTH_COLOR, linewidth=1.2, markersize=3, label="loss")
    skipped = [r["step"] for r in records if r.get("skipped") or r.get("loss") is None]
    if skipped:  # at the foot of the axis: a skipped step's loss may be inf or missing
        loss_ax.plot(skipped, [0.03] * len(skipped), "x", color=SKIP_COLOR, markersize=7, mew=1.6,
                     transform=loss_ax.get_xaxis_transform(), label=f"skipped ({len(skipped)}, not finite)")

    lr_points = [(r["step"], r["lr"]) for r in records if r.get("lr") is not None]
    if lr_points:
        lr_ax.plot(*zip(*lr_points), color=LR_COLOR, linewidth=1.6)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_ax.set_ylim(bottom=0)

    for ax, title in ((loss_ax, "training loss"), (lr_ax, "learning rate")):
        for index, step in enumerate(checkpoint_steps):
            ax.axvline(step, color="#888888", linestyle=":", linewidth=1,
                       label="checkpoint" if index == 0 and ax is loss_ax else None)
        ax.set_title(title, loc="left", fontsize=11)
        ax.set_xlabel("step")
        ax.grid(True, color="#e6e6e6", linewidth=0.6)
        ax.spines[["top", "right"]].set_visible(False)
        if records:
            ax.set_xlim(0, max(r["step"] for r in records) * 1.01 + 0.5)
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend(loc="upper right", fontsize=8, frameon=False)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
