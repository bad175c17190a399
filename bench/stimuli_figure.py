"""One learning stimulus per method of the demo study, as one figure (the README shows it).

Reads the study that `make demo` built (the random setup's first explanation of each method) and writes a
PNG: per method the query (class A) and distractor (class B) stimuli as raters see them, captioned as the
gallery captions them (``explain.precompute.selectors.stimulus_caption``).

    .venv/bin/python bench/stimuli_figure.py [--study "Fashion-MNIST demo (full)"] [--out docs/stimuli.png]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

import django

django.setup()

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from explain.models import Explanation  # noqa: E402
from explain.precompute.selectors import method_is_generative, stimulus_caption  # noqa: E402
from studies.models import Condition, Study  # noqa: E402


def caption(explanation: Explanation) -> str:
    """As the gallery captions it (a variant as the method it varies)."""
    generative = method_is_generative(explanation.condition.method)
    flip = "flips" if explanation.flipped else "no flip"
    return f"{flip}, {stimulus_caption(explanation, generative=generative)}"


def read(field) -> np.ndarray:
    with field.open("rb") as fh:
        return np.asarray(PILImage.open(io.BytesIO(fh.read())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="Fashion-MNIST demo (full)")
    parser.add_argument("--out", type=Path, default=Path("docs/stimuli.png"))
    args = parser.parse_args()
    study = Study.objects.filter(title=args.study).order_by("-pk").first()
    if study is None:
        sys.exit(f"no study titled {args.study!r}; run `make demo` first (or pass --study)")
    rows = []
    for condition in study.conditions.filter(setup=Condition.Setup.RANDOM).order_by("method"):
        e = (
            Explanation.objects.filter(condition=condition)
            .select_related("condition", "pair")
            .order_by("pk")
            .first()
        )
        if e is not None:
            rows.append(e)
    if not rows:
        sys.exit(f"study {args.study!r} has no explanations yet; let its precompute finish")
    fig, axes = plt.subplots(len(rows), 2, figsize=(4.4, 2.45 * len(rows)), squeeze=False)
    for e, (left, right) in zip(rows, axes, strict=True):
        for ax, field, side in (
            (left, e.query_stimulus, "query"),
            (right, e.distractor_stimulus, "distractor"),
        ):
            image = read(field)
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
            ax.set_axis_off()
            title = f"{e.condition.method}:\n{side}" if side == "query" else textwrap.fill(caption(e), 30)
            ax.set_title(title, fontsize=8)
    fig.suptitle(f"{study.title}:\none learning stimulus per method\n({e.pair})", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the three-line title
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    sys.stdout.write(f"wrote {args.out} ({len(rows)} methods)\n")


if __name__ == "__main__":
    main()
