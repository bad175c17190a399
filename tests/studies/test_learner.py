"""The simulated learner learns from the sharp region of a stimulus, and only from it."""

import io

import numpy as np
import pytest
from PIL import Image

from explain.stimuli.rendering import blur_outside
from studies.learner import SimulatedLearner, decode_grey, sharp_region
from tests.studies.builders import drawn, region


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


DISCRIMINATIVE = region(slice(0, 12), slice(0, 12))
IRRELEVANT = region(slice(16, 28), slice(16, 28))


def accuracy_after_learning(mask: np.ndarray, seed: int) -> float:
    rng = np.random.default_rng(seed)
    learner = SimulatedLearner(noise=0.0, rng=np.random.default_rng(seed))
    for _ in range(5):
        learner.learn(png(blur_outside(drawn("A", rng), mask, sigma=4.0)), "A")
        learner.learn(png(blur_outside(drawn("B", rng), mask, sigma=4.0)), "B")
    labels = ["A", "B"] * 20
    answers = [learner.classify(png(drawn(label, rng)), allow_dont_know=False) for label in labels]
    return float(np.mean([a == t for a, t in zip(answers, labels, strict=True)]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_region_on_the_difference_teaches_and_one_elsewhere_does_not(seed):
    assert accuracy_after_learning(DISCRIMINATIVE, seed) >= 0.9
    assert accuracy_after_learning(IRRELEVANT, seed) <= 0.75


def test_the_sharp_region_is_found_where_the_stimulus_was_not_blurred():
    rng = np.random.default_rng(3)
    stimulus = blur_outside(drawn("A", rng), DISCRIMINATIVE, sigma=4.0)
    found = sharp_region(decode_grey(png(stimulus)))
    truth = DISCRIMINATIVE.astype(bool)
    iou = (found & truth).sum() / (found | truth).sum()
    assert iou >= 0.6, f"intersection over union {iou:.2f}"


def test_before_learning_it_does_not_know_and_in_the_test_phase_it_guesses():
    rng = np.random.default_rng(4)
    learner = SimulatedLearner(rng=rng)
    image = png(drawn("A", rng))
    assert learner.classify(image, allow_dont_know=True) == "D"
    assert {learner.classify(image, allow_dont_know=False) for _ in range(50)} == {"A", "B"}


def test_full_noise_answers_at_random_whatever_it_learned():
    rng = np.random.default_rng(5)
    learner = SimulatedLearner(noise=1.0, rng=rng)
    learner.learn(png(blur_outside(drawn("A", rng), DISCRIMINATIVE, sigma=4.0)), "A")
    answers = [learner.classify(png(drawn("A", rng)), allow_dont_know=False) for _ in range(200)]
    assert 0.35 < answers.count("A") / len(answers) < 0.65


def test_bad_input_is_refused_with_the_value():
    with pytest.raises(ValueError, match="noise .* got 1.5"):
        SimulatedLearner(noise=1.5)
    with pytest.raises(ValueError, match="not 'C'"):
        SimulatedLearner().learn(png(np.zeros((28, 28))), "C")
    with pytest.raises(ValueError, match="could not read an image of 9 bytes"):
        decode_grey(b"not a png")


def taught(mask: np.ndarray, rng: np.random.Generator, n: int = 5) -> SimulatedLearner:
    learner = SimulatedLearner(noise=0.0, rng=np.random.default_rng(0))
    learner.enter("learning")
    for _ in range(n):
        learner.learn(png(blur_outside(drawn("A", rng), mask, sigma=4.0)), "A")
        learner.learn(png(blur_outside(drawn("B", rng), mask, sigma=4.0)), "B")
    return learner


def test_pre_learning_of_a_new_pair_is_dont_know_like_a_person():
    # Taught one pair, the learner answers its test; at the next pair's pre-learning it knows nothing of the
    # new classes and says so, for every image (not only for the first pair, as the old learner did).
    rng = np.random.default_rng(6)
    learner = taught(DISCRIMINATIVE, rng)
    learner.enter("test")
    assert learner.classify(png(drawn("A", rng)), allow_dont_know=False) == "A"
    learner.enter("pre")
    answers = {learner.classify(png(drawn(label, rng)), allow_dont_know=True) for label in "AB" * 10}
    assert answers == {"D"} and learner.memories == []


def test_it_says_dont_know_only_when_unsure():
    rng = np.random.default_rng(7)
    learner = taught(DISCRIMINATIVE, rng)
    clear = [learner.classify(png(drawn(label, rng)), allow_dont_know=True) for label in "AB" * 10]
    assert clear.count("D") <= 2 and sum(a == t for a, t in zip(clear, "AB" * 10, strict=True)) >= 16
    halfway = png((drawn("A", rng) + drawn("B", rng)) / 2)  # as near to A as to B: unsure
    unsure = SimulatedLearner(noise=0.0, sure_margin=0.5, rng=np.random.default_rng(1))
    unsure.memories = learner.memories
    assert unsure.classify(halfway, allow_dont_know=True) == "D"
    assert unsure.classify(halfway, allow_dont_know=False) in ("A", "B")
    only_a = SimulatedLearner(noise=0.0)
    only_a.learn(png(drawn("A", rng)), "A")
    assert only_a.classify(png(drawn("A", rng)), allow_dont_know=True) == "D"  # never saw class B


@pytest.mark.parametrize("seed", [0, 1])
def test_it_learns_more_from_informative_stimuli_over_a_whole_block(seed):
    # One block as a rater meets it: pre-learning (don't know offered), learning, test on the same images.
    def block(mask: np.ndarray) -> tuple[float, float]:
        rng = np.random.default_rng(seed)
        images = [(label, png(drawn(label, rng))) for label in "AB" * 10]
        learner = SimulatedLearner(noise=0.05, rng=np.random.default_rng(seed))
        learner.enter("pre")
        pre = [learner.classify(image, allow_dont_know=True) for _, image in images]
        learner.enter("learning")
        for _ in range(5):
            learner.learn(png(blur_outside(drawn("A", rng), mask, sigma=4.0)), "A")
            learner.learn(png(blur_outside(drawn("B", rng), mask, sigma=4.0)), "B")
        learner.enter("test")
        test = [learner.classify(image, allow_dont_know=False) == label for label, image in images]
        return pre.count("D") / len(pre), float(np.mean(test))

    dk_informative, informative = block(DISCRIMINATIVE)
    dk_uninformative, uninformative = block(IRRELEVANT)
    assert dk_informative == dk_uninformative == 1.0  # before learning it knows nothing either way
    assert informative >= uninformative + 0.15
