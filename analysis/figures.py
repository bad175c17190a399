"""Report figures (matplotlib, Agg backend) from the analysis tables; no Django, no torch.

Each function takes tables (pandas) or image arrays and returns a matplotlib Figure; ``png_bytes`` renders one
with no time stamp or software string, so the same data gives the same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

SETUP_STYLE = {"random": ("#1f77b4", "o"), "consistent": ("#d62728", "s")}
PNG_METADATA = {"Software": None}
ACCURACY_TOP = 1.04  # accuracy axes end a little above 1.0 so a marker there is not cut in half


def _style(setup: str, i: int) -> tuple[str, str]:
    return SETUP_STYLE.get(setup, (f"C{i + 2}", "D"))


def _empty(fig: Figure, message: str) -> Figure:
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, color="0.4")
    return fig


def accuracy_figure(accuracy: pd.DataFrame, *, subtitle: str = "") -> Figure:
    """Test accuracy per method (x) and setup (colour) with 95% Wilson intervals on the effective number of
    answers (the design effect of the raters' ICC); the legend sits beside the axes, off the data."""
    fig, ax = plt.subplots(figsize=(7.2, 3.9))
    fig.subplots_adjust(left=0.1, right=0.78, bottom=0.12, top=0.82)
    title = "Test accuracy per method and pair-selection setup"
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    if accuracy.empty:
        ax.set_axis_off()
        return _empty(fig, "no test responses yet")
    methods = sorted(accuracy["method"].unique())
    setups = sorted(accuracy["setup"].unique())
    width = 0.6 / max(len(setups), 1)
    for i, setup in enumerate(setups):
        colour, marker = _style(setup, i)
        part = accuracy[accuracy["setup"] == setup].set_index("method").reindex(methods)
        x = np.arange(len(methods)) + (i - (len(setups) - 1) / 2) * width
        y = part["accuracy"].to_numpy(float)
        low, high = part["effective_low"].to_numpy(float), part["effective_high"].to_numpy(float)
        ax.errorbar(x, y, yerr=[y - low, high - y], fmt=marker, color=colour, elinewidth=1.6, capsize=3,
                    label=setup)  # fmt: skip
    ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
    rotated = len(methods) > 5  # long names then slant, each ending under its own tick
    ax.set_xticks(np.arange(len(methods)), methods, rotation=30 if rotated else 0, fontsize=8,
                  ha="right" if rotated else "center", rotation_mode="anchor")  # fmt: skip
    if rotated:  # room below the axes for the longest slanted name (8 pt: about 0.055 in a character)
        drop = 0.5 * 0.055 * max(len(m) for m in methods) / fig.get_figheight()
        fig.subplots_adjust(bottom=min(0.4, 0.11 + drop))
    ax.set_ylim(0, ACCURACY_TOP)  # a marker at accuracy 1.0 is drawn whole, not cut by the frame
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("test accuracy")
    ax.legend(title="setup", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.text(0.8, 0.2, "bars: 95% Wilson\ninterval on the\neffective n\n(design effect)\nline: chance",
             fontsize=7, color="0.3", va="bottom")  # fmt: skip
    return fig


def pair_figure(by_pair: pd.DataFrame) -> Figure:
    """Dot plot: accuracy per class pair (rows) for each method x setup; legend below the axes."""
    pairs = list(dict.fromkeys(by_pair["pair_label"])) if not by_pair.empty else []
    cells = sorted({(m, s) for m, s in zip(by_pair["method"], by_pair["setup"], strict=True)})
    legend_rows = math.ceil(max(len(cells), 1) / 3)
    height = 1.6 + 0.35 * max(len(pairs), 1) + 0.22 * legend_rows
    fig, ax = plt.subplots(figsize=(7.2, height))
    fig.subplots_adjust(left=0.3, right=0.97, bottom=(0.75 + 0.22 * legend_rows) / height,
                        top=1 - 0.4 / height)  # fmt: skip
    ax.set_title("Test accuracy per class pair (points, no intervals)", fontsize=10)
    if by_pair.empty:
        ax.set_axis_off()
        return _empty(fig, "no test responses yet")
    markers = "osD^vP*X"
    setups = sorted({s for _, s in cells})
    methods = sorted({m for m, _ in cells})
    # Each setup on its own line within a pair's row, so the setups' markers do not hide each other.
    offset = {s: (i - (len(setups) - 1) / 2) * 0.5 / max(len(setups), 1) for i, s in enumerate(setups)}
    for m, s in cells:
        part = by_pair[(by_pair["method"] == m) & (by_pair["setup"] == s)]
        y = [pairs.index(p) + offset[s] for p in part["pair_label"]]
        colour, _ = _style(s, setups.index(s))
        ax.scatter(part["accuracy"], y, marker=markers[methods.index(m) % len(markers)], color=colour,
                   label=f"{m} / {s}", alpha=0.8, s=28)  # fmt: skip
    ax.set_yticks(range(len(pairs)), pairs, fontsize=8)
    ax.set_ylim(len(pairs) - 0.5, -0.5)  # first pair on top; every row inside the frame
    ax.set_xlim(-0.03, ACCURACY_TOP)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.axvline(0.5, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("test accuracy")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncols=3, fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 0.0))  # fmt: skip
    return fig


def gain_figure(gain: pd.DataFrame) -> Figure:
    """Pre-learning -> test accuracy per method (one line per method x setup); legend beside the axes."""
    fig, ax = plt.subplots(figsize=(7.2, 3.9))
    fig.subplots_adjust(left=0.1, right=0.7, bottom=0.08, top=0.9)
    ax.set_title("Pre-learning to test accuracy (means; don't know counts as wrong)", fontsize=10)
    if gain.empty:
        ax.set_axis_off()
        return _empty(fig, "no pre-learning and test responses yet")
    setups = sorted(gain["setup"].unique())
    methods = sorted(gain["method"].unique())
    styles = ["-", "--", "-.", ":"]
    for row in gain.itertuples():
        colour, marker = _style(row.setup, setups.index(row.setup))
        ls = styles[methods.index(row.method) % len(styles)]
        ax.plot([0, 1], [row.pre_accuracy, row.test_accuracy], ls=ls, marker=marker, color=colour,
                label=f"{row.method} / {row.setup}")  # fmt: skip
    ax.set_xticks([0, 1], ["pre-learning", "test"])
    ax.set_xlim(-0.2, 1.2)
    ax.set_ylim(-0.03, ACCURACY_TOP)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def stimuli_figure(
    examples: Sequence[tuple[str, np.ndarray | None, np.ndarray | None]], *, per_row: int = 3
) -> Figure:
    """One example learning stimulus per condition: the query (shown as class A) and distractor (class B),
    ``per_row`` conditions to a row so that many conditions still fit a page at a readable size."""
    n = max(len(examples), 1)
    columns = min(per_row, n)
    rows = math.ceil(n / columns)
    height = 0.8 + 1.55 * rows
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2.4 * columns, height), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.8 / height, hspace=0.45, wspace=0.08)
    fig.suptitle("Example learning stimuli per condition (query | distractor)", fontsize=10,
                 y=1 - 0.1 / height, va="top")  # fmt: skip
    for ax in axes.ravel():
        ax.set_axis_off()
    if not examples:
        return _empty(fig, "no explanations stored")
    for index, (title, query, distractor) in enumerate(examples):
        row, column = divmod(index, columns)
        left, right = axes[row, 2 * column], axes[row, 2 * column + 1]
        for ax, image, side in ((left, query, "query"), (right, distractor, "distractor")):
            if image is None:
                ax.text(0.5, 0.5, "file missing", ha="center", va="center", fontsize=8, color="0.4")
            else:
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
            ax.set_title(side, fontsize=7, color="0.3")
        # The condition's name centred over its two images.
        box = Bbox.union([left.get_position(), right.get_position()])
        fig.text((box.x0 + box.x1) / 2, box.y1 + 0.28 / height, title, ha="center", va="bottom", fontsize=8.5,
                 weight="bold")  # fmt: skip
    return fig


def text_page(lines: Sequence[str], *, title: str) -> Figure:
    """A PDF page of monospace text (the report's header and tables)."""
    fig = plt.figure(figsize=(8.27, 11.69))
    fig.text(0.06, 0.96, title, fontsize=13, weight="bold", va="top")
    fig.text(0.06, 0.93, "\n".join(lines), fontsize=6.5, family="monospace", va="top")
    return fig


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata=PNG_METADATA)
    plt.close(fig)
    return buffer.getvalue()
