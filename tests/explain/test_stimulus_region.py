"""What raters are shown: the pixels of stored stimuli from a real precompute are sharp exactly inside the
paper's region, the first edit's (Vandenhende et al. 2022, sec. 4.4), and blurred outside it, on both sides;
for a generative method, inside its region on the query and on the synthesised counterfactual.

The region is checked against one worked out here from the stored edits (cell = 28 / 7 = 4 pixels), and the
blur against ``scipy.ndimage.gaussian_filter`` of the original pixels, so neither side repeats the pipeline.
"""

import io

import numpy as np
import pytest
import torch
from django.core.files.storage import default_storage
from django.db.models import Q
from PIL import Image as PILImage
from scipy import ndimage

from explain.models import Explanation, WorkUnit
from explain.precompute import study_precompute, work_unit_run
from explain.precompute import worker as runtime
from studies.models import Study
from studies.services import class_pair_add, study_create
from tests.explain.precompute_helpers import fashion_slice, trained_checkpoint

pytestmark = pytest.mark.django_db(transaction=True, reset_sequences=True)  # pks seed the draws

CELL = 4  # pixels per cell of the small CNN's 7 x 7 grid on 28-pixel images
BACKBONE_PARAMS = {
    "autoencoder": {"steps": 60, "batch_size": 8, "limit_per_class": 12, "block_out_channels": [8, 16]},
    "c3lt_maps": {"steps": 40, "batch_size": 8, "limit_per_class": 12, "width": 16},
}


def stored_png(field) -> np.ndarray:
    with default_storage.open(field.name, "rb") as fh:
        return np.asarray(PILImage.open(io.BytesIO(fh.read())))


def stored_masks(explanation: Explanation) -> dict[str, np.ndarray]:
    with default_storage.open(explanation.masks.name, "rb") as fh:
        masks = np.load(io.BytesIO(fh.read()))
        return {k: masks[k] for k in masks.files}


def cell_mask(cell: int, size: int = 28, w: int = 7) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    r, c = divmod(cell, w)
    mask[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = True
    return mask


def check_sharp_inside_blurred_outside(stimulus: np.ndarray, original: np.ndarray, region: np.ndarray, sigma):
    """``stimulus`` (224 px) equals the upscaled ``original`` (28 px) inside ``region`` and its Gaussian blur
    outside; the blur really changes pixels outside."""
    scale = stimulus.shape[0] // original.shape[0]
    up = lambda a: np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)  # noqa: E731
    blurred = np.rint(
        ndimage.gaussian_filter(original.astype(np.float64) / 255.0, sigma, mode="reflect") * 255
    )
    inside = up(region)
    np.testing.assert_array_equal(stimulus[inside], up(original)[inside])
    np.testing.assert_allclose(stimulus[~inside], up(blurred)[~inside], atol=1)
    assert (stimulus[~inside].astype(int) != up(original)[~inside]).mean() > 0.2


def precompute(slice_, methods: list[str], **study_fields) -> Study:
    dataset, classifier, coat, pullover = slice_
    study = study_create(
        title="region", dataset=dataset, classifier=classifier, methods=methods, n_learning=2, seed=5
    )
    for field, value in study_fields.items():
        setattr(study, field, value)
    study.save()
    class_pair_add(study=study, class_a=coat, class_b=pullover)
    plan = study_precompute(study=study, backbone_params=BACKBONE_PARAMS, semantic_pool=2)
    for _ in range(200):
        unit = (
            WorkUnit.objects.filter(status=WorkUnit.Status.QUEUED)
            .filter(Q(plan=plan) | Q(plan__isnull=True))
            .order_by("id")
            .first()
        )
        if unit is None:
            break
        work_unit_run(unit_id=unit.pk)
    return study


@pytest.fixture
def slice_(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runtime.cache_clear()
    yield fashion_slice(name="region", per_class=12, checkpoint=trained_checkpoint(tmp_path))
    torch.set_num_threads(threads)


def test_stored_stimuli_show_the_first_edit_sharp_and_blur_the_rest(slice_):
    study = precompute(slice_, ["cve", "c3lt"])
    classifier = study.classifier
    cell_explanations = Explanation.objects.filter(study=study, condition__method="cve")
    generative = Explanation.objects.filter(study=study, condition__method="c3lt")
    assert cell_explanations.exists() and generative.exists()
    several = 0
    for e in cell_explanations:
        unit = WorkUnit.objects.get(key=e.key)
        sigma = study.blur_sigma / runtime.display_scale(28)
        query = runtime.image_array(e.query_image, classifier)
        distractor = runtime.image_array(unit.distractor_image, classifier)
        first_query, _, first_distractor = e.edits[0]
        check_sharp_inside_blurred_outside(stored_png(e.query_stimulus), query, cell_mask(first_query), sigma)
        check_sharp_inside_blurred_outside(
            stored_png(e.distractor_stimulus), distractor, cell_mask(first_distractor), sigma
        )
        masks = stored_masks(e)
        np.testing.assert_array_equal(masks["shown_query_mask"] > 0, cell_mask(first_query))
        several += len({q for q, _, _ in e.edits}) > 1
        assert e.config["stimulus_region"] == "first-edit"
    assert several >= 1  # some stimuli had more edits than they show: the first-edit rule is exercised
    for e in generative:
        sigma = study.blur_sigma / runtime.display_scale(28)
        region = stored_masks(e)["query_mask"] > 0
        assert 0 < region.mean() < 1
        query = runtime.image_array(e.query_image, classifier)
        counterfactual = stored_png(e.counterfactual_image)[
            :: runtime.display_scale(28), :: runtime.display_scale(28)
        ]
        check_sharp_inside_blurred_outside(stored_png(e.query_stimulus), query, region, sigma)
        check_sharp_inside_blurred_outside(stored_png(e.distractor_stimulus), counterfactual, region, sigma)


def test_a_study_may_show_every_edit_named_as_such(slice_):
    study = precompute(slice_, ["cve"], stimulus_region=Study.StimulusRegion.ALL_EDITS)
    for e in Explanation.objects.filter(study=study):
        region = np.zeros((28, 28), dtype=bool)
        for query_cell, _, _ in e.edits:
            region |= cell_mask(query_cell)
        sigma = study.blur_sigma / runtime.display_scale(28)
        query = runtime.image_array(e.query_image, study.classifier)
        check_sharp_inside_blurred_outside(stored_png(e.query_stimulus), query, region, sigma)
        assert e.config["stimulus_region"] == "all-edits"
