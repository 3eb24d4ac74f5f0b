"""The report's figures as PNG bytes, drawn with matplotlib's object-oriented API (Figure + Agg canvas:
no pyplot state, no global backend switched in the user's process)."""
from __future__ import annotations

import io
import math

import torch


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _finite(v):
    return v if v is not None and math.isfinite(v) else math.nan


def sqnr_plot(runs: list[dict]) -> bytes | None:
    """Per-layer weight SQNR (solid) and output SQNR (dashed) of every checkpoint, one colour each,
    markers labelled with the layer's weight bits; None when no SQNR was measured."""
    if not any(r["weight_sqnr_db"] is not None for run in runs for r in run["layers"]):
        return None
    names = list(dict.fromkeys(r["name"] for run in runs for r in run["layers"]))
    fig = _figure(max(6.0, 0.45 * len(names) + 2.5) + 3.0, 4.2)  # + the legend beside the axes
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        at = {r["name"]: r for r in run["layers"]}
        xs = [j for j, n in enumerate(names) if n in at]
        for key, style, what in (("weight_sqnr_db", "-o", "weights"), ("output_sqnr_db", "--s", "outputs")):
            ys = [_finite(at[names[j]][key]) for j in xs]
            if all(math.isnan(y) for y in ys):
                continue
            ax.plot(xs, ys, style, color=color, label=f"{run['name']} ({run['scheme']}): {what}", markersize=5)
        for j in xs:
            y = _finite(at[names[j]]["weight_sqnr_db"])
            if not math.isnan(y):
                ax.annotate(f"w{at[names[j]]['weight_bits']}", (j, y), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=7, color=color)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("Per-layer quantization error (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def range_plot(run: dict) -> bytes | None:
    """One bar per static activation quantizer from its lowest to its highest representable value, and
    the range the probe images reached at the layer's input (markers); None when all are dynamic."""
    rows = [r for r in run["activation_ranges"] if r["low"] is not None]
    if not rows:
        return None
    fig = _figure(7.5, max(2.5, 0.32 * len(rows) + 1.4))
    ax = fig.add_subplot()
    ys = range(len(rows))
    ax.barh(ys, [r["high"] - r["low"] for r in rows], left=[r["low"] for r in rows], color="C0", alpha=0.45,
            label="quantizer range (scale, zero point)")
    seen = [(y, r) for y, r in zip(ys, rows) if r.get("seen_low") is not None]
    if seen:
        ax.plot([r["seen_low"] for _, r in seen], [y for y, _ in seen], "k|", markersize=12, label="input reached")
        ax.plot([r["seen_high"] for _, r in seen], [y for y, _ in seen], "k|", markersize=12)
    ax.set_yticks(list(ys), [f"{r['name']} (a{r['bits']})" for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("activation value")
    ax.set_title(f"Activation ranges: {run['name']} ({run['scheme']})")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def sample_grid(images: torch.Tensor, samples: list[dict], columns: int = 8) -> bytes | None:
    """The synthetic images in a grid, each titled with its label (mixup: every class and weight)."""
    n = len(samples)
    if n == 0:
        return None
    cols = min(columns, n)
    rows = -(-n // cols)
    fig = _figure(1.6 * cols, 1.9 * rows)
    for i, (img, sample) in enumerate(zip(images, samples)):
        ax = fig.add_subplot(rows, cols, i + 1)
        arr = img.permute(1, 2, 0).numpy()
        if arr.shape[2] == 1:
            ax.imshow(arr[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(arr.clip(0, 1), interpolation="nearest")
        title = "\n".join(f"{name} {w:.2f}" for name, w in sample["labels"][:3]) or "(no label)"
        ax.set_title(title, fontsize=7)
        ax.set_axis_off()
    return _png(fig)
