"""A model unit's training reports its steps while it runs: written through a connection of its own (so the
progress page sees them before the trainer's transaction commits), with the time left from the pace so far."""

import re
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from explain.models import WorkUnit
from explain.precompute.training_progress import training_time_left, unit_training_progress
from tests.factories import ClassLabelFactory, DatasetFactory, ImageFactory

pytestmark = pytest.mark.django_db(transaction=True)  # the writer's own connection sees committed rows only


def model_unit(**fields) -> WorkUnit:
    fields.setdefault("dataset", DatasetFactory())
    fields.setdefault("backbone_kind", "autoencoder")
    key = f"backbone:d{fields['dataset'].pk}:{fields['backbone_kind']}"
    return WorkUnit.objects.create(key=key, kind=WorkUnit.Kind.BACKBONE, **fields)


def test_steps_are_visible_while_the_trainer_still_holds_its_transaction():
    unit = model_unit(status=WorkUnit.Status.RUNNING, started_at=timezone.now(), timings={"queued_s": 1})
    progress, close = unit_training_progress(unit_id=unit.pk, every_s=3600)
    try:
        with transaction.atomic():  # as a trainer does: its own writes are invisible until it commits
            progress(0, 200)
            seen = WorkUnit.objects.using("default").get(pk=unit.pk).timings
            assert (seen["steps_done"], seen["steps_total"], seen["queued_s"]) == (0, 200, 1)
            progress(50, 200)  # throttled: within every_s of the last write
            assert WorkUnit.objects.get(pk=unit.pk).timings["steps_done"] == 0
            progress(200, 200)  # the last step is always written
            assert WorkUnit.objects.get(pk=unit.pk).timings["steps_done"] == 200
    finally:
        close()


def test_time_left_follows_the_pace_so_far():
    now = timezone.now()
    unit = model_unit(
        status=WorkUnit.Status.RUNNING,
        started_at=now - timedelta(seconds=40),
        timings={"steps_done": 100, "steps_total": 300},
    )
    left = training_time_left(unit, now)
    assert left == {"done": 100, "total": 300, "percent": 33, "eta_s": pytest.approx(80.0)}
    unit.status = WorkUnit.Status.DONE
    assert training_time_left(unit, now) is None
    unit.status, unit.timings = WorkUnit.Status.RUNNING, {}
    assert training_time_left(unit, now) is None  # nothing reported yet


def test_the_terminal_bar_and_the_progress_page_name_the_models_training(researcher_client):
    from django.urls import reverse

    from explain.precompute import training_summary
    from studies.models import Study
    from tests.factories import ClassPairFactory, ConditionFactory, ImageFactory

    study = ClassPairFactory(study__status=Study.Status.PRECOMPUTING).study
    ConditionFactory(study=study, method="cve")
    unit = model_unit(
        dataset=study.dataset,
        status=WorkUnit.Status.RUNNING,
        started_at=timezone.now() - timedelta(seconds=10),
        timings={"steps_done": 50, "steps_total": 200},
    )
    from explain.models import PrecomputePlan

    plan = PrecomputePlan.objects.create(study=study)
    WorkUnit.objects.create(
        key="explanation:waiting", kind=WorkUnit.Kind.EXPLANATION, dataset=study.dataset, plan=plan,
        condition=study.conditions.get(), pair=study.pairs.get(), needs=[unit.key], candidate=0,
        query_image=ImageFactory(dataset=study.dataset), distractor_image=ImageFactory(dataset=study.dataset),
    )  # fmt: skip
    from explain.precompute import plan_progress

    summary = training_summary(plan_progress(study=study))
    assert summary.startswith("training autoencoder 50/200 steps, ") and summary.endswith(" s left")
    page = researcher_client.get(reverse("explain:precompute_progress", args=[study.pk])).content.decode()
    left = re.search(r"step 50 / 200, about (\d+) s left", page)
    assert left and 30 <= int(left.group(1)) <= 3 * 60  # 10 s (and the test's own time) for 50 steps


def test_a_model_unit_run_as_the_worker_runs_it_records_its_trainers_steps():
    """The worker hands the trainer the unit's progress callback: the steps land on the unit as it trains."""
    import torch

    from explain.precompute import work_unit_run

    dataset = DatasetFactory()
    for index in range(2):
        label = ClassLabelFactory(dataset=dataset, index=index)
        ImageFactory.create_batch(8, class_label=label, split="train")
    unit = model_unit(
        dataset=dataset, status=WorkUnit.Status.QUEUED, backbone_kind="auxiliary",
        params={"epochs": 1, "batch_size": 8, "width": 4, "dim": 8},
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unit = work_unit_run(unit_id=unit.pk)
    finally:
        torch.set_num_threads(threads)
    assert unit.status == WorkUnit.Status.DONE, unit.error
    assert unit.timings["steps_total"] >= 1 and unit.timings["steps_done"] == unit.timings["steps_total"]
    assert unit.timings["total_s"] > 0
