"""Adding a method is one new file with its declaration: a toy method, registered only by a file written into
explain/methods/, is planned, precomputed by a real Celery worker and shown in the researcher's gallery."""

import time
import uuid
from pathlib import Path

import pytest
from django.urls import reverse

from explain.methods import PACKAGE_DIR, method_names, registered, registry
from explain.models import Explanation
from explain.precompute import study_precompute
from studies.models import Study
from studies.services import class_pair_add, study_create
from tests.explain.precompute_helpers import Worker, fashion_slice, trained_checkpoint

pytestmark = pytest.mark.slow

TOY = '''"""A toy method for a test: the query's centre cell takes the distractor's centre cell."""

import torch

from explain.methods.base import Counterfactual, CounterfactualMethod, Edit, SplitClassifier, cells_to_mask
from explain.methods.declaration import MethodDeclaration

DECLARATION = MethodDeclaration(
    name="{name}",
    target="explain.methods.{stem}:Centre",
    paper="none: a test of the registry",
    kind="cell",
    requires_flip=False,
)


class Centre(CounterfactualMethod):
    name = "{name}"

    def __init__(self, *, offset: int = 0):
        self.offset = offset

    def explain(self, model: SplitClassifier, query, target, distractors, aux=None, generator=None):
        with torch.no_grad():
            fq, fd = model.f(query), model.f(distractors[:1])
            h, w = fq.shape[-2:]
            cell = (h // 2) * w + w // 2 + self.offset
            edited = fq.flatten(2).clone()
            edited[..., cell] = fd.flatten(2)[..., cell]
            flipped = int(model.g(edited.view_as(fq)).argmax()) == target
        size = tuple(query.shape[-2:])
        mask = cells_to_mask([cell], (h, w), size)
        return Counterfactual(
            method=self.name, target=target, flipped=flipped, edits=[Edit(cell, 0, cell)], scores=[],
            query_mask=mask, distractor_masks=[mask], config=self.config(), grid=(h, w),
        )
'''


@pytest.fixture
def toy_method():
    """The toy method's file in explain/methods/ for the length of the test (and the worker it starts)."""
    stem = f"toy_{uuid.uuid4().hex[:8]}"
    name = stem.replace("_", "-")
    path = PACKAGE_DIR / f"{stem}.py"
    path.write_text(TOY.replace("{name}", name).replace("{stem}", stem))
    registry.cache_clear()
    try:
        yield name
    finally:
        path.unlink()
        registry.cache_clear()


def test_a_method_added_as_one_file_is_planned_precomputed_by_a_worker_and_shown(
    transactional_db, researcher_client, toy_method, tmp_path
):
    assert toy_method in method_names() and not registered(toy_method).declaration.requires_flip
    checkpoint = trained_checkpoint(tmp_path)
    dataset, classifier, coat, pullover = fashion_slice(name="toy", per_class=12, checkpoint=checkpoint)
    study = study_create(
        title="toy", dataset=dataset, classifier=classifier, methods=[toy_method], setups=("random",),
        n_learning=2,
    )  # fmt: skip
    class_pair_add(study=study, class_a=coat, class_b=pullover)
    queue = f"test-explain-{uuid.uuid4().hex[:8]}"
    worker = Worker(queue, tmp_path / "worker.log")
    worker.start()
    try:
        study_precompute(study=study, queue=queue)
        deadline = time.monotonic() + 180
        while Study.objects.get(pk=study.pk).status != Study.Status.READY:
            assert time.monotonic() < deadline, Path(worker.log_path).read_text()[-3000:]
            time.sleep(0.5)
    finally:
        worker.stop()

    explanations = list(Explanation.objects.filter(study=study))
    assert len(explanations) == 2
    assert all(e.config["method"] == toy_method and e.config["offset"] == 0 for e in explanations)
    condition = study.conditions.get()
    html = researcher_client.get(
        reverse("explain:gallery", args=[study.pk]), {"condition": condition.pk}
    ).content.decode()
    assert all(f'id="explanation-{e.pk}"' in html for e in explanations)
    image = researcher_client.get(reverse("explain:explanation_file", args=[explanations[0].pk, "query"]))
    with explanations[0].query_stimulus.open("rb") as fh:
        assert b"".join(image.streaming_content) == fh.read()
