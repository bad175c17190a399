"""`manage.py simulate_raters`: simulated learners walk the real pages over HTTP, learning from stimuli."""

import io

import numpy as np
import pytest
from django.core.files.base import ContentFile
from django.core.management import CommandError, call_command
from PIL import Image as PILImage

from analysis.selectors import responses_tidy
from explain.models import Explanation, Image
from explain.stimuli.rendering import blur_outside
from studies.models import Condition, Rater, Response, Study
from tests.studies.builders import data_guards_off, drawn, live_study, region


def png_file(pixels: np.ndarray) -> ContentFile:
    out = io.BytesIO()
    PILImage.fromarray(np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)).save(out, format="PNG")
    return ContentFile(out.getvalue(), name="drawn.png")


# The semantic condition's stimuli show the patch that tells the classes apart; the random condition's show
# a corner where both classes look alike.
REGIONS = {
    Condition.Setup.CONSISTENT: region(slice(0, 12), slice(0, 12)),
    Condition.Setup.RANDOM: region(slice(16, 28), slice(16, 28)),
}


@pytest.fixture
def drawn_study(transactional_db) -> Study:
    study = live_study(n_pairs=1, n_images=6, n_learning=4, test_images_per_class=3, leaky_metadata=False)
    rng = np.random.default_rng(7)
    pair = study.pairs.get()
    sides = {pair.class_a_id: "A", pair.class_b_id: "B"}
    for image in Image.objects.filter(dataset=study.dataset, split=Image.Split.TEST):
        image.file.save("drawn.png", png_file(drawn(sides[image.class_label_id], rng)), save=True)
    for e in Explanation.objects.filter(study=study).select_related("condition"):
        mask = REGIONS[e.condition.setup]
        query, distractor = (blur_outside(drawn(side, rng), mask, sigma=4.0) for side in "AB")
        e.query_stimulus.save("q.png", png_file(query), save=False)
        e.distractor_stimulus.save("d.png", png_file(distractor), save=False)
        e.save(update_fields=["query_stimulus", "distractor_stimulus"])
    return study


@pytest.mark.slow
def test_simulated_learners_walk_the_site_and_learn_what_the_stimuli_show(drawn_study, live_server):
    call_command(
        "simulate_raters", str(drawn_study.pk), n=8, base_url=live_server.url, noise=0.0, think_ms=0, seed=3
    )

    raters = Rater.objects.filter(assignments__study=drawn_study)
    assert raters.count() == 8 and all(r.is_simulated for r in raters)
    # Every trial answered exactly once: 6 pre-learning, 4 learning and 6 test trials per rater.
    assert Response.objects.filter(trial__block__assignment__study=drawn_study).count() == 8 * 16
    rows = responses_tidy(study=drawn_study)
    assert {r["answer"] for r in rows if r["phase"] == "pre"} == {"D"}  # nothing learned yet
    test = [r for r in rows if r["phase"] == "test"]
    accuracy = {
        setup: np.mean([r["correct"] for r in test if r["setup"] == setup])
        for setup in (Condition.Setup.CONSISTENT, Condition.Setup.RANDOM)
    }
    assert accuracy[Condition.Setup.CONSISTENT] >= 0.9, accuracy
    assert accuracy[Condition.Setup.RANDOM] <= 0.75, accuracy


def test_a_study_that_is_not_live_is_refused_with_its_status(drawn_study):
    drawn_study.status = Study.Status.READY
    with data_guards_off():
        drawn_study.save(update_fields=["status"])
    with pytest.raises(CommandError, match=r"is ready; raters can only take a live study"):
        call_command("simulate_raters", str(drawn_study.pk), n=1, base_url="http://127.0.0.1:9")
    with pytest.raises(CommandError, match=r"No study with id or title 'nope'"):
        call_command("simulate_raters", "nope", n=1, base_url="http://127.0.0.1:9")
