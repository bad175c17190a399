"""No backbone drives a study before it passes its quality card, unless the study accepts it with a reason."""

import pytest
from django.core.exceptions import ValidationError

from explain.models import Backbone, WorkUnit
from explain.precompute import study_precompute, work_unit_run, worker
from explain.quality_gate import card_failures, quality_refusal
from studies.services import class_pair_add, study_create
from tests.explain.precompute_helpers import fashion_slice, trained_checkpoint

pytestmark = pytest.mark.django_db

FAILED = {
    "kind": "bridge",
    "figures": {"inpaint_l1_ratio": 1.31, "inpainted_accuracy": 0.42},
    "passed": False,
    "failures": ["inpaint_l1_ratio = 1.31, needs <= 0.9", "inpainted_accuracy = 0.42, needs >= 0.7"],
    "images": 40,
}


@pytest.fixture
def rcsb_study(tmp_path):
    worker.cache_clear()
    dataset, classifier, coat, pullover = fashion_slice(
        name="gate", per_class=12, checkpoint=trained_checkpoint(tmp_path)
    )
    study = study_create(
        title="gate", dataset=dataset, classifier=classifier, methods=["rcsb-28px"], n_learning=1
    )
    class_pair_add(study=study, class_a=coat, class_b=pullover)
    bridge = Backbone.objects.create(
        dataset=dataset, kind="bridge", name="weak bridge", path=str(tmp_path), provenance={"quality": FAILED}
    )
    return study, bridge


def test_the_planner_refuses_a_backbone_that_failed_its_card_naming_it_the_figure_and_the_bar(rcsb_study):
    study, _ = rcsb_study
    with pytest.raises(ValidationError) as refused:
        study_precompute(study=study, semantic_pool=1)
    message = refused.value.messages[0]
    assert "'rcsb-28px'" in message and "weak bridge: inpaint_l1_ratio = 1.31, needs <= 0.9" in message
    assert "quality_override" in message
    assert not WorkUnit.objects.exists()  # nothing planned


def test_a_study_may_accept_weak_backbones_with_a_reason(rcsb_study):
    study, _ = rcsb_study
    plan = study_precompute(study=study, semantic_pool=1, quality_override="pilot of the rating interface")
    assert plan.quality_override == {"reason": "pilot of the rating interface"}
    assert plan.units.filter(status=WorkUnit.Status.QUEUED).count() == 2  # random + semantic, one each


def test_the_worker_refuses_a_model_whose_card_failed_after_planning(rcsb_study):
    """A model the plan trained is judged once it exists: its explanation units fail with its figures."""
    study, bridge = rcsb_study
    bridge.provenance = {}  # no card when the study is planned
    bridge.save()
    plan = study_precompute(study=study, semantic_pool=1)
    bridge.provenance = {"quality": FAILED}  # the card, measured once the model was trained
    bridge.save()
    unit = plan.units.order_by("id").first()
    ran = work_unit_run(unit_id=unit.pk)
    assert ran.status == WorkUnit.Status.FAILED
    assert ran.error.startswith(
        "Method 'rcsb-28px' would run on backbones that fail their quality card (weak bridge:"
    )


def test_a_card_that_passed_or_is_missing_refuses_nothing():
    passed = Backbone(name="good", provenance={"quality": {**FAILED, "passed": True, "failures": []}})
    missing = Backbone(name="unjudged", provenance={"quality": {"missing": "no test images"}})
    assert card_failures(passed) == [] and card_failures(missing) == []
    assert quality_refusal(method="rcsb", backbones=[passed, missing], override=None) == ""
    weak = Backbone(name="weak", provenance={"quality": FAILED})
    assert quality_refusal(method="rcsb", backbones=[weak], override={"reason": "pilot"}) == ""
    assert "weak: inpaint_l1_ratio" in quality_refusal(method="rcsb", backbones=[weak], override={})
