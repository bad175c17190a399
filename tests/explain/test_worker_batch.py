"""A task's generative units explained in one ``explain_batch`` (``worker.explain_arrays_batch``) give each
pair the result ``explain_arrays`` gives it alone with the same seed; misclassified pairs are refused
alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explain.precompute.worker import PairArrays, explain_arrays, explain_arrays_batch

from .gen_fixtures import one_thread, tiny_classifier  # noqa: F401 (one_thread: an autouse fixture)
from .test_gen_methods import BATCHED_ATOL, METHODS, build


def to_input(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)[None, None]


def pairs_of(model, count: int) -> list[PairArrays]:
    """``count`` pairs of images the classifier puts in classes 0 and 1 (noise of eight brightnesses; the
    tiny classifier of seed 2 splits them), then one pair with its classes swapped, which is refused."""
    generator = np.random.default_rng(4)
    pixels = [(generator.random((16, 16)) * 255 * (k % 8) / 7).astype(np.uint8) for k in range(40)]
    with torch.no_grad():
        predicted = [int(model.g(model.f(to_input(p))).argmax()) for p in pixels]
    zeros = [p for p, c in zip(pixels, predicted, strict=True) if c == 0]
    ones = [p for p, c in zip(pixels, predicted, strict=True) if c == 1]
    assert len(zeros) >= count and len(ones) >= count, "the test needs images of classes 0 and 1"
    pairs = [PairArrays(zeros[k], ones[k], 0, 1, seed=1000 + k) for k in range(count)]
    return [*pairs, PairArrays(ones[0], zeros[0], 0, 1, seed=7)]


@pytest.mark.parametrize("name", METHODS)
def test_a_batch_of_pairs_gives_each_pair_its_result_alone(name):
    model, method = tiny_classifier(2), build(name)  # C3LT's maps translate class 0 to 1
    pairs = pairs_of(model, 3)
    batched = explain_arrays_batch(
        model=model, method=method, pairs=pairs, to_input=to_input, blur_sigma=2.0, requires_flip=False
    )
    assert len(batched) == len(pairs)
    for pair, together in zip(pairs, batched, strict=True):
        alone = explain_arrays(
            model=model,
            method=method,
            query=pair.query,
            distractor=pair.distractor,
            to_input=to_input,
            class_a=pair.class_a,
            class_b=pair.class_b,
            seed=pair.seed,
            blur_sigma=2.0,
            requires_flip=False,
        )
        assert together.unexplainable == alone.unexplainable
        if alone.unexplainable:
            continue
        np.testing.assert_allclose(
            together.counterfactual.image,
            alone.counterfactual.image,
            atol=BATCHED_ATOL.get(name, 1e-4),
            rtol=0,
        )
        assert together.metrics["flipped"] == alone.metrics["flipped"]
        assert together.metrics["cout"] == pytest.approx(alone.metrics["cout"], abs=1e-3)
        assert together.metrics["nfe"] == alone.metrics["nfe"]
    assert batched[-1].unexplainable.startswith("the query image is classified as")
