"""A simulated learner that learns only from what the learning stimuli show.

A real rater in the learning phase sees the query (class A) and the distractor (class B) with everything
outside the counterfactual region blurred. The simulated learner does the same with the PNGs the site sends:

1. ``learn(png, label)`` finds the part of the stimulus that is still sharp (where blurring it again changes
   it: a blurred area is already smooth) and stores the pixels of that region with the label.
2. ``classify(png)`` compares a test image with every stored region at the same place (mean squared difference
   over the region) and answers the label of the nearest one; with probability ``noise`` it answers at random
   instead.
3. Like a person in the pre-learning phase, it knows only what it has been shown of *this* class pair so far:
   ``enter(phase)`` forgets the previous pair's memories when a new pair's pre-learning starts (the classes
   are new; their names are hidden behind "class A" / "class B"). Where "don't know" is offered it answers it
   only when unsure: when it has no memory of one of the two classes, or when the nearest memory of one class
   is not clearly nearer than the nearest of the other (relative margin below ``sure_margin``). Where it is
   not offered (the test phase) it answers its best guess. So its don't-know rate measures what it knew before
   learning (nothing, at the first sight of a pair: as in the paper, where every rater chose "don't know"),
   and its learning gain is what the stimuli taught.

So a method whose regions hold what tells the classes apart teaches the learner more than one whose regions do
not, and the difference shows in the analysis for a reason. No Django here; numpy, scipy and PIL only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

ANSWERS_WITH_DONT_KNOW = ("A", "B", "D")
ANSWERS = ("A", "B")


def decode_grey(png: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """PNG (or any PIL-readable) bytes as a float64 grey image in [0, 1], box-resized to ``size`` (W, H)."""
    try:
        with Image.open(io.BytesIO(png)) as pil:
            grey = pil.convert("L")
            if size is not None and grey.size != tuple(size):
                grey = grey.resize(tuple(size), Image.Resampling.BOX)
            return np.asarray(grey, dtype=np.float64) / 255.0
    except OSError as exc:
        raise ValueError(f"the simulated learner could not read an image of {len(png)} bytes: {exc}") from exc


def sharp_region(image: np.ndarray, *, min_fraction: float = 0.02) -> np.ndarray:
    """A boolean mask of the part of ``image`` that was not blurred.

    Blurring an already blurred area changes it little; blurring a sharp one changes it a lot. The change is
    smoothed, thresholded relative to its maximum, and closed so the flat inside of a region is kept. An image
    with no sharp part (all blurred or all flat) gives the whole image: the learner remembers all it saw.
    """
    detail = np.abs(image - ndimage.gaussian_filter(image, 1.0, mode="reflect"))
    energy = ndimage.gaussian_filter(detail, 1.0, mode="reflect")
    peak = float(energy.max())
    if peak <= 1e-6:
        return np.ones_like(image, dtype=bool)
    mask = energy > 0.25 * peak
    side = max(1, round(min(image.shape) / 14))
    mask = ndimage.binary_closing(mask, structure=np.ones((side, side)), border_value=0)
    if mask.mean() < min_fraction:
        return np.ones_like(image, dtype=bool)
    return mask


@dataclass
class SimulatedLearner:
    """Learns (region, label) memories from stimuli; classifies by the nearest memory, with noise."""

    noise: float = 0.1
    sure_margin: float = 0.05  # (d_other - d_best) / (d_other + d_best) below this: unsure
    size: tuple[int, int] = (28, 28)  # (W, H) every image is box-resized to before comparing
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    memories: list[tuple[np.ndarray, np.ndarray, str]] = field(default_factory=list)
    phase: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise is the probability of a random answer, in [0, 1]; got {self.noise}")
        if not 0.0 <= self.sure_margin < 1.0:
            raise ValueError(f"sure_margin is a relative distance margin in [0, 1); got {self.sure_margin}")

    def enter(self, phase: str) -> None:
        """Note the phase of the page shown; a pre-learning page after learning or test starts a new class
        pair, whose classes the learner has never been taught: it forgets the previous pair's memories."""
        if phase == "pre" and self.phase in ("learning", "test"):
            self.memories.clear()
        self.phase = phase

    def learn(self, stimulus_png: bytes, label: str) -> None:
        """Remember the sharp region of a learning stimulus shown as ``label`` ("A" or "B")."""
        if label not in ANSWERS:
            raise ValueError(f"a learning stimulus is labelled 'A' or 'B', not {label!r}")
        image = decode_grey(stimulus_png, self.size)
        self.memories.append((image, sharp_region(image), label))

    def classify(self, image_png: bytes, *, allow_dont_know: bool) -> str:
        """'A', 'B', or (when allowed and the learner is unsure) 'D'."""
        labels = {label for _, _, label in self.memories}
        if labels != set(ANSWERS):
            if allow_dont_know:
                return "D"
            if not labels:
                return str(self.rng.choice(ANSWERS))
        if self.rng.random() < self.noise:
            return str(self.rng.choice(ANSWERS))
        image = decode_grey(image_png, self.size)
        nearest: dict[str, float] = {}
        for pixels, mask, label in self.memories:
            d = float(((image - pixels)[mask] ** 2).mean())
            nearest[label] = min(d, nearest.get(label, np.inf))
        best = min(nearest, key=nearest.__getitem__)
        if allow_dont_know:
            other = nearest["B" if best == "A" else "A"]
            margin = (other - nearest[best]) / (other + nearest[best]) if other + nearest[best] > 0 else 0.0
            if margin < self.sure_margin:
                return "D"
        return best
