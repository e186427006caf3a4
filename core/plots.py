"""The evaluation report's figures, each drawn from plain arrays and returned as PNG bytes.

Figures are built with `matplotlib.figure.Figure` on an Agg canvas, never through pyplot:
no global backend state, no display needed, safe in a server thread or a Ray worker.
"""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

DPI = 100
_MAX_LABEL = 28


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _short(name: str) -> str:
    return name if len(name) <= _MAX_LABEL else name[: _MAX_LABEL - 1] + "…"


def per_class_accuracy_png(accuracy: np.ndarray, counts: np.ndarray, names: Sequence[str]) -> bytes:
    """Horizontal bars, worst breed at the top; classes without samples are left out."""
    keep = np.flatnonzero(counts > 0)
    order = keep[np.argsort(accuracy[keep], kind="stable")]
    fig = _new_figure(7.5, max(2.5, 0.19 * len(order) + 1.0))
    ax = fig.add_subplot()
    y = np.arange(len(order))[::-1]
    colours = ["#c0392b" if a < 0.5 else "#e67e22" if a < 0.8 else "#27ae60" for a in accuracy[order]]
    ax.barh(y, accuracy[order], color=colours, height=0.8)
    for yy, a in zip(y, accuracy[order]):
        ax.text(min(a, 0.9) + 0.01, yy, f"{a:.0%}", va="center", fontsize=6)
    ax.set_yticks(y, [f"{_short(names[i])} ({counts[i]})" for i in order], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.set_xlabel("top-1 accuracy (validation images per breed in brackets)")
    ax.axvline(float(np.average(accuracy[keep], weights=counts[keep])), color="k", ls="--", lw=1, label="overall")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Per-breed accuracy, worst first")
    return _png(fig)


def confusion_png(matrix: np.ndarray, names: Sequence[str]) -> bytes:
    """Row-normalised confusion matrix of a subset of classes (rows = true, columns = predicted)."""
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    n = len(names)
    fig = _new_figure(max(4.0, 0.42 * n + 2.5), max(3.5, 0.42 * n + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    labels = [_short(x) for x in names]
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            ax.text(j, i, str(int(value)), ha="center", va="center", fontsize=6,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion among the worst classes (colour = share of the true class)")
    fig.colorbar(image, ax=ax, fraction=0.04)
    return _png(fig)


def topk_png(accuracy_at_k: np.ndarray) -> bytes:
    """Top-k accuracy for k = 1..len(accuracy_at_k)."""
    ks = np.arange(1, len(accuracy_at_k) + 1)
    fig = _new_figure(5.5, 3.5)
    ax = fig.add_subplot()
    ax.plot(ks, accuracy_at_k, marker="o")
    for k, a in zip(ks, accuracy_at_k):
        if k in (1, 3, 5, len(ks)):
            ax.annotate(f"{a:.1%}", (k, a), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(ks)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("k")
    ax.set_ylabel("accuracy (true breed in the top k)")
    ax.grid(alpha=0.3)
    ax.set_title("Top-k accuracy")
    return _png(fig)


def reliability_png(confidence: np.ndarray, accuracy: np.ndarray, counts: np.ndarray,
                    edges: np.ndarray, ece: float) -> bytes:
    """Reliability diagram (accuracy per confidence bin vs the diagonal) over a count histogram."""
    fig = _new_figure(5.5, 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    filled = counts > 0
    top.bar(centres[filled], accuracy[filled], width=width * 0.95, color="#3498db",
            edgecolor="k", lw=0.5, label="accuracy")
    top.plot(centres[filled], confidence[filled], "o", color="#c0392b", ms=5, label="mean top-1 probability in the bin")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"Calibration of the top-1 probability (ECE {ece:.3f})")
    bottom.bar(centres, counts, width=width * 0.95, color="grey")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("top-1 probability")
    bottom.set_ylabel("images")
    return _png(fig)


def confused_pairs_png(pairs: Sequence[tuple[str, str, int, int]],
                       thumbs: Sequence[Sequence[tuple[np.ndarray | None, str]]]) -> bytes:
    """One row per pair: its counts, then thumbnails of misclassified images with captions."""
    cols = max([len(t) for t in thumbs] + [1])
    fig = _new_figure(2.6 + 1.5 * cols, 1.6 * len(pairs) + 0.4)
    grid = fig.add_gridspec(len(pairs), cols + 1, width_ratios=[1.7] + [1] * cols)
    for row, ((a, b, ab, ba), images) in enumerate(zip(pairs, thumbs)):
        ax = fig.add_subplot(grid[row, 0])
        ax.axis("off")
        ax.text(0, 0.5, f"A: {_short(a)}\nB: {_short(b)}\nA→B {ab}, B→A {ba}", va="center", fontsize=8)
        for col in range(cols):
            ax = fig.add_subplot(grid[row, col + 1])
            ax.axis("off")
            if col >= len(images):
                continue
            array, caption = images[col]
            if array is None:
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=7)
            else:
                ax.imshow(array)
            ax.set_title(caption, fontsize=6)
    fig.suptitle("Most-confused breed pairs: misclassified examples (true → predicted)")
    return _png(fig)


def history_png(series: Mapping[str, Sequence[float]], boundaries: Sequence[int] = ()) -> bytes:
    """Loss curves on the left, every other metric on the right; dotted lines between phases."""
    from matplotlib.ticker import MaxNLocator

    losses = {k: v for k, v in series.items() if "loss" in k}
    others = {k: v for k, v in series.items() if "loss" not in k and k not in ("epoch", "lr")}
    panels = [(title, group) for title, group in (("loss", losses), ("metrics", others)) if group]
    fig = _new_figure(5.0 * max(1, len(panels)), 3.6)
    for index, (title, group) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), index + 1)
        for name, values in sorted(group.items()):
            epochs = np.arange(1, len(values) + 1)
            ax.plot(epochs, values, marker=".", ls="--" if name.startswith("val") else "-", label=name)
        for boundary in boundaries:
            ax.axvline(boundary + 0.5, color="grey", ls=":", lw=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Training curves")
    return _png(fig)


def score_histogram_png(groups: Sequence[tuple[str, np.ndarray]], threshold: float) -> bytes:
    """Overlaid histograms of the dog score per group (dogs, each non-dog folder), the threshold marked."""
    fig = _new_figure(6.5, 3.8)
    ax = fig.subplots()
    bins = np.linspace(0.0, 1.0, 41)
    for name, scores in groups:
        ax.hist(np.asarray(scores), bins=bins, alpha=0.5, density=True, label=f"{name} ({len(scores)})")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.2f}")
    ax.set_xlabel("dog score")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title("Dog score by group")
    return _png(fig)
