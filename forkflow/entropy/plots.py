"""The report's PNG figures, drawn with matplotlib's object API (no pyplot state, no display needed):
a log-x entropy histogram, a word cloud, and the entropy change per percentile bucket."""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from forkflow.entropy.lexicon import TokenCount
from forkflow.entropy.overlap import BucketChange

HISTOGRAM_FLOOR = 1e-5  # log axis: smaller entropies (and exact zeros) are counted in the first bin


def _save(fig: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(fig)
    with _missing_glyphs_allowed():
        fig.savefig(path)


@contextlib.contextmanager
def _missing_glyphs_allowed():
    """Tokens from any script reach the figures; a glyph the font lacks is drawn as a box, silently."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        yield


def entropy_histogram(entropies: np.ndarray, percentiles: dict[str, float], path: str | os.PathLike) -> None:
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    top = max(float(entropies.max()), HISTOGRAM_FLOOR * 10)
    bins = np.logspace(math.log10(HISTOGRAM_FLOOR), math.log10(top), 60)
    ax.hist(np.clip(entropies, HISTOGRAM_FLOOR, None), bins=bins, color="#4c72b0")
    ax.set_xscale("log")
    for name, style in (("50", ":"), ("80", "--"), ("95", "-.")):
        if name in percentiles and percentiles[name] > 0:
            ax.axvline(
                percentiles[name],
                color="#c44e52",
                linestyle=style,
                label=f"p{name} = {percentiles[name]:.3g}",
            )
    ax.set_xlabel(f"token entropy (nats; values below {HISTOGRAM_FLOOR:g} in the first bin)")
    ax.set_ylabel("tokens")
    ax.set_title(f"Token entropy, {len(entropies)} tokens")
    ax.legend()
    _save(fig, path)


def word_cloud(
    words: list[TokenCount], path: str | os.PathLike, title: str, color: str, seed: int = 0
) -> None:
    """Words sized by sqrt(count), each placed at the first free spot along a spiral from the centre."""
    width, height, dpi = 800, 450, 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    renderer = FigureCanvasAgg(fig).get_renderer()
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_axis_off()
    ax.text(8, height - 8, title, fontsize=10, ha="left", va="top", color="#555555", parse_math=False)
    placed: list[tuple[float, float, float, float]] = [(0, height - 26, 8 + 7 * len(title), height)]
    largest = max((w.count for w in words), default=1)
    start = np.random.default_rng(seed).uniform(0, 2 * math.pi)
    for rank, word in enumerate(words):
        size = 10 + 38 * math.sqrt(word.count / largest)
        text = ax.text(
            0,
            0,
            word.token,
            fontsize=size,
            ha="center",
            va="center",
            color=color,
            alpha=1.0 - 0.5 * rank / max(len(words), 1),
            parse_math=False,
        )
        with _missing_glyphs_allowed():
            box = text.get_window_extent(renderer)
        half_w, half_h = box.width / 2 + 2, box.height / 2 + 1
        for step in range(3000):  # an Archimedean spiral, stretched to the canvas' aspect
            radius, angle = 0.5 * step, start + 0.3 * step
            x = width / 2 + 1.8 * radius * math.cos(angle)
            y = height / 2 + radius * math.sin(angle)
            candidate = (x - half_w, y - half_h, x + half_w, y + half_h)
            inside = (
                candidate[0] >= 0 and candidate[1] >= 0 and candidate[2] <= width and candidate[3] <= height
            )
            if inside and not any(_overlaps(candidate, other) for other in placed):
                text.set_position((x, y))
                placed.append(candidate)
                break
        else:
            text.remove()  # no room left for this word
    _save(fig, path)


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def entropy_change_bars(
    changes: list[BucketChange], path: str | os.PathLike, label_a: str, label_b: str
) -> None:
    fig = Figure(figsize=(9, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    centers = [(c.low_percentile + c.high_percentile) / 2 for c in changes]
    values = [c.mean_change for c in changes]
    colors = ["#c44e52" if v > 0 else "#4c72b0" for v in values]
    ax.bar(
        centers, values, width=0.85 * (changes[0].high_percentile - changes[0].low_percentile), color=colors
    )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"percentile bucket of {label_a}'s token entropy")
    ax.set_ylabel(f"mean entropy change ({label_b} − {label_a})")
    ax.set_title("Entropy change per 5 % entropy-percentile bucket")
    ax.set_xticks([c.high_percentile for c in changes[1::2]])
    _save(fig, path)
