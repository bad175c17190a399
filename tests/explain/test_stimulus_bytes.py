"""The same study and seed give the same stimulus bytes: a precompute's files match recorded digests
(tests/explain/fixtures/stimulus_digests.json), so moving or speeding up code changes no stimulus. The digests
are regenerated only when a method or the rendering changes on purpose, in its own commit.

The classifier is a committed checkpoint (fixtures/stimulus_bytes_cnn.pt, the test CNN trained once by
``train_small_cnn``): training it anew gives other weights on another CPU (the order of float sums differs),
and the digests would then measure the machine, not the code. CVE and SCOUT are deterministic (no generator
draws), so a unit's bytes depend only on the images, the classifier and the rendering.
"""

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from django.core.files.storage import default_storage
from django.db.models import Q

from explain.models import Explanation, WorkUnit
from studies.services import class_pair_add, study_create
from tests.explain.precompute_helpers import fashion_slice

pytestmark = pytest.mark.django_db(transaction=True, reset_sequences=True)  # pks seed the draws

FIXTURE = Path(__file__).parent / "fixtures" / "stimulus_digests.json"
CHECKPOINT = Path(__file__).parent / "fixtures" / "stimulus_bytes_cnn.pt"


def _sha(name: str) -> str:
    with default_storage.open(name) as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _masks_sha(name: str) -> str:
    """The mask arrays' bytes (the .npz archive itself carries zip timestamps)."""
    with default_storage.open(name) as fh:
        masks = np.load(io.BytesIO(fh.read()))
        return hashlib.sha256(b"".join(masks[k].tobytes() for k in sorted(masks.files))).hexdigest()


def precomputed_digests(checkpoint: Path) -> dict[str, dict[str, str]]:
    """Precompute a tiny CVE + SCOUT study in this process; the digests of every kept stimulus's files."""
    from explain.precompute import study_precompute, work_unit_run
    from explain.precompute.worker import cache_clear

    cache_clear()
    dataset, classifier, coat, pullover = fashion_slice(name="bytes", per_class=12, checkpoint=checkpoint)
    study = study_create(
        title="bytes", dataset=dataset, classifier=classifier, methods=["cve", "scout"], n_learning=2, seed=3
    )
    class_pair_add(study=study, class_a=coat, class_b=pullover)
    plan = study_precompute(study=study, semantic_pool=2)
    while True:
        unit = (
            WorkUnit.objects.filter(status=WorkUnit.Status.QUEUED)
            .filter(Q(plan=plan) | Q(plan__isnull=True))
            .order_by("id")
            .first()
        )
        if unit is None:
            break
        work_unit_run(unit_id=unit.pk)
    digests = {}
    for e in Explanation.objects.filter(study=study).select_related("condition"):
        unit = WorkUnit.objects.get(key=e.key)
        label = f"{e.condition.method}/{e.condition.setup}/k{unit.candidate}"
        digests[label] = {
            "query": _sha(e.query_stimulus.name),
            "distractor": _sha(e.distractor_stimulus.name),
            "masks": _masks_sha(e.masks.name),
            "edits_images": hashlib.sha256(
                json.dumps([e.edits, e.query_image.source_id, unit.distractor_image.source_id]).encode()
            ).hexdigest(),
        }
    return dict(sorted(digests.items()))


def test_precomputed_stimuli_have_the_same_bytes_as_before_the_refactor(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        digests = precomputed_digests(CHECKPOINT)
    finally:
        torch.set_num_threads(threads)
    if os.environ.get("FOIL_REGENERATE_DIGESTS") == "1":  # after a change on purpose, in its own commit
        FIXTURE.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    expected = json.loads(FIXTURE.read_text())
    assert len(digests) == 8  # 2 methods x 2 setups x n_learning 2
    assert digests == expected
