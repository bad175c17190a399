"""Precompute services in this process: the stored plan, deterministic keys, replacement, retry, selection."""

import io
import re

import numpy as np
import pytest
import torch
from django.core.exceptions import ValidationError
from django.core.files.storage import default_storage
from django.db.models import Q

from explain import precompute
from explain.methods.declaration import AUXILIARY, Variant
from explain.models import Explanation, PrecomputePlan, WorkUnit
from explain.precompute import study_precompute, work_unit_retry, work_unit_run, worker
from studies.models import Condition, Study
from studies.services import class_pair_add, condition_add, study_create
from tests.explain.precompute_helpers import fashion_slice, redeclare, trained_checkpoint

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory.mktemp("cnn"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One thread, as the workers run: on the shared 2-core machine two threads are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def study(checkpoint):
    worker.cache_clear()
    dataset, classifier, coat, pullover = fashion_slice(name="slice", per_class=12, checkpoint=checkpoint)
    study = study_create(
        title="coats", dataset=dataset, classifier=classifier, methods=["cve"], n_learning=2, seed=7
    )
    class_pair_add(study=study, class_a=coat, class_b=pullover)
    return study


def run_queued(plan: PrecomputePlan, limit: int = 200) -> int:
    """Run the queued units of the plan (and its models) here, as a worker would; returns how many."""
    ran = 0
    while ran < limit:
        unit = (
            WorkUnit.objects.filter(status=WorkUnit.Status.QUEUED)
            .filter(Q(plan=plan) | Q(plan__isnull=True))
            .order_by("id")
            .first()
        )
        if unit is None:
            return ran
        work_unit_run(unit_id=unit.pk)
        ran += 1
    raise AssertionError(f"more than {limit} units ran; the plan does not converge")


def test_plan_is_stored_with_a_unit_per_candidate_and_planning_twice_creates_nothing(study):
    plan = study_precompute(study=study, semantic_pool=2)

    random_c = study.conditions.get(setup="random")
    semantic_c = study.conditions.get(setup="consistent")
    units = WorkUnit.objects.filter(plan=plan)
    assert units.filter(condition=random_c).count() == 2  # n_learning
    assert units.filter(condition=semantic_c).count() == 4  # n_learning x pool
    assert set(units.values_list("status", flat=True)) == {WorkUnit.Status.QUEUED}  # cve needs no model
    # The random setup explains the same image pairs for every method: the stream's first candidates.
    stream = plan.candidates[str(study.pairs.get().pk)]
    first = units.filter(condition=random_c).order_by("candidate")
    assert [[u.query_image_id, u.distractor_image_id] for u in first] == stream[:2]
    assert all(re.fullmatch(r"explain:s\d+:p\d+:c\d+:k\d+", k) for k in units.values_list("key", flat=True))
    study.refresh_from_db()
    assert study.status == Study.Status.PRECOMPUTING

    keys = sorted(units.values_list("key", flat=True))
    again = study_precompute(study=study)
    assert again.pk == plan.pk
    assert sorted(WorkUnit.objects.filter(plan=plan).values_list("key", flat=True)) == keys
    assert again.candidates == plan.candidates


def test_candidate_stream_is_seeded_and_drawn_from_the_right_classes(study):
    pair = study.pairs.get()
    one = precompute.candidate_stream(study=study, pair=pair, length=8)
    assert one == precompute.candidate_stream(study=study, pair=pair, length=8)
    assert len(one) == 8 and len({q for q, _ in one}) == 8
    images = {i.pk: i for i in study.dataset.images.all()}
    assert all(images[q].class_label_id == pair.class_a_id for q, _ in one)
    assert all(images[d].class_label_id == pair.class_b_id for _, d in one)
    study.seed += 1
    assert precompute.candidate_stream(study=study, pair=pair, length=8) != one


def test_running_the_plan_gives_every_condition_its_stimuli_and_the_study_becomes_ready(study):
    plan = study_precompute(study=study, semantic_pool=2)
    run_queued(plan)

    study.refresh_from_db()
    assert study.status == Study.Status.READY
    plan.refresh_from_db()
    assert plan.finished_at is not None
    for condition in study.conditions.all():
        kept = Explanation.objects.filter(study=study, condition=condition)
        assert kept.count() == 2, condition
    assert not WorkUnit.objects.filter(plan=plan).exclude(status__in=WorkUnit.TERMINAL).exists()
    for unit in WorkUnit.objects.filter(plan=plan, status=WorkUnit.Status.DONE):
        explanation = unit.explanation
        assert explanation.key == unit.key and explanation.flipped
        assert explanation.config["device"] == "cpu" == unit.device
        assert explanation.config["seed"] == precompute.unit_seed(study, unit.key)
        assert explanation.config["method"] == "cve" and "max_edits" in explanation.config
        assert re.fullmatch(r"[0-9a-f]{40}|unknown", explanation.config["code_version"])
        assert explanation.metrics["n_edits"] == len(explanation.edits) >= 1
        assert explanation.distractor_links.get().image_id == unit.distractor_image_id
        for field in (explanation.query_stimulus, explanation.distractor_stimulus, explanation.masks):
            assert re.fullmatch(r"(stimuli|masks)/[0-9a-f]{32}\.(png|npz)", field.name), field.name
            assert default_storage.exists(field.name)
        with default_storage.open(explanation.masks.name) as fh:
            masks = np.load(io.BytesIO(fh.read()))
            assert masks["query_mask"].shape == (28, 28) and masks["query_mask"].max() == 1.0
        for name in ("Coat", "Pullover", "cve", "semantic"):
            assert name.lower() not in explanation.query_stimulus.name.lower()
        assert explanation.timings["total_s"] > 0


def test_semantic_setup_keeps_the_best_scoring_candidates_and_deletes_the_rest(study):
    plan = study_precompute(study=study, semantic_pool=3)
    run_queued(plan)

    semantic = study.conditions.get(setup="consistent")
    units = WorkUnit.objects.filter(plan=plan, condition=semantic)
    done = units.filter(status=WorkUnit.Status.DONE)
    discarded = units.filter(status=WorkUnit.Status.DISCARDED)
    assert done.count() == 2 and discarded.count() >= 1
    worst_kept = min(u.outcome["selection_score"] for u in done)
    assert all(u.outcome["selection_score"] <= worst_kept for u in discarded)
    assert all(u.explanation_id is None for u in discarded)
    assert Explanation.objects.filter(condition=semantic).count() == 2
    assert "proxy" in done.first().outcome["selection_score_source"]


def test_an_unexplainable_pair_is_replaced_by_the_next_candidate_and_the_study_says_how_often(
    study, monkeypatch
):
    no_edits = Variant("cve-no-edits", {"max_edits": 0}, "nothing can flip")
    redeclare(monkeypatch, "cve", variants=(no_edits,))
    study.conditions.update(method="cve-no-edits")
    study.conditions.filter(setup="consistent").delete()
    plan = study_precompute(study=study)
    run_queued(plan)

    units = WorkUnit.objects.filter(plan=plan).order_by("candidate")
    stream = plan.candidates[str(study.pairs.get().pk)]
    assert units.count() == len(stream)  # every candidate tried, one replacing the other
    assert set(units.values_list("status", flat=True)) == {WorkUnit.Status.UNEXPLAINABLE}
    first = units.first()
    assert first.replaced_by.candidate == 2  # candidates 0 and 1 were planned; 2 is the next
    reasons = [u.outcome["reason"] for u in units]
    assert any("did not flip" in r or "classified as" in r for r in reasons)
    assert "no candidate is left" in units.last().outcome["reason"]
    study.refresh_from_db()
    assert study.status == Study.Status.PRECOMPUTING  # never ready without its stimuli
    from explain.precompute import plan_progress

    progress = plan_progress(study=study)
    assert progress["replacements"] == {"cve-no-edits": len(stream)}


def test_a_failed_unit_keeps_its_error_and_can_be_retried(study, checkpoint):
    classifier = study.classifier
    classifier.checkpoint_path = "/nonexistent/cnn.pt"
    classifier.save()
    study.conditions.filter(setup="consistent").delete()
    plan = study_precompute(study=study)
    run_queued(plan)

    failed = WorkUnit.objects.filter(plan=plan, status=WorkUnit.Status.FAILED)
    assert failed.count() == 2
    assert "CheckpointError" in failed.first().error and "/nonexistent/cnn.pt" in failed.first().error

    classifier.checkpoint_path = str(checkpoint)
    classifier.save()
    for unit in failed:
        work_unit_retry(unit=unit)
    assert WorkUnit.objects.filter(plan=plan, status=WorkUnit.Status.QUEUED).count() == 2
    run_queued(plan)
    study.refresh_from_db()
    assert study.status == Study.Status.READY
    with pytest.raises(ValidationError, match="only failed units can be retried"):
        work_unit_retry(unit=WorkUnit.objects.filter(plan=plan).first())


def test_a_redelivered_unit_does_nothing_twice_and_a_unit_that_kills_its_worker_fails(study):
    study.conditions.filter(setup="consistent").delete()
    plan = study_precompute(study=study)
    unit = WorkUnit.objects.filter(plan=plan).first()
    # A worker died mid-task: the unit is left running; the redelivered task runs it again.
    WorkUnit.objects.filter(pk=unit.pk).update(status=WorkUnit.Status.RUNNING, attempts=1)
    unit = work_unit_run(unit_id=unit.pk)
    assert unit.status in {WorkUnit.Status.DONE, WorkUnit.Status.UNEXPLAINABLE} and unit.attempts == 2
    before = Explanation.objects.count()
    again = work_unit_run(unit_id=unit.pk)  # a duplicate delivery of a finished unit
    assert (again.status, again.attempts, again.explanation_id) == (unit.status, 2, unit.explanation_id)
    assert Explanation.objects.count() == before

    other = WorkUnit.objects.filter(plan=plan).exclude(pk=unit.pk).first()
    WorkUnit.objects.filter(pk=other.pk).update(
        status=WorkUnit.Status.RUNNING, attempts=precompute.MAX_ATTEMPTS
    )
    other = work_unit_run(unit_id=other.pk)
    assert other.status == WorkUnit.Status.FAILED and "never finished it" in other.error


def test_a_method_waits_for_its_auxiliary_model_trained_once_per_dataset(study, monkeypatch):
    redeclare(monkeypatch, "cve", aux=AUXILIARY)
    study.conditions.filter(setup="consistent").delete()
    plan = study_precompute(
        study=study, backbone_params={"auxiliary": {"epochs": 1, "batch_size": 8, "width": 4, "dim": 8}}
    )

    model_unit = WorkUnit.objects.get(kind=WorkUnit.Kind.BACKBONE)
    assert model_unit.status == WorkUnit.Status.QUEUED and model_unit.plan is None
    assert model_unit.key == f"backbone:d{study.dataset_id}:auxiliary"
    waiting = WorkUnit.objects.filter(plan=plan)
    assert set(waiting.values_list("status", flat=True)) == {WorkUnit.Status.PENDING}
    assert all(u.needs == [model_unit.key] for u in waiting)

    run_queued(plan)
    model_unit.refresh_from_db()
    backbone = model_unit.backbone
    assert model_unit.status == WorkUnit.Status.DONE and backbone.kind == "auxiliary"
    assert backbone.provenance["params"]["epochs"] == 1 and backbone.provenance["params"]["batch_size"] == 8
    study.refresh_from_db()
    assert study.status == Study.Status.READY
    explanation = Explanation.objects.filter(study=study).first()
    assert explanation.config["auxiliary"] == backbone.pk

    # A second study on the same data set reuses the model: no unit to train it again.
    second = study_create(
        title="again", dataset=study.dataset, classifier=study.classifier, methods=["cve"], n_learning=1
    )
    pair = study.pairs.get()
    class_pair_add(study=second, class_a=pair.class_a, class_b=pair.class_b)
    second_plan = study_precompute(study=second)
    assert WorkUnit.objects.filter(kind=WorkUnit.Kind.BACKBONE).count() == 1
    assert all(u.needs == [] for u in WorkUnit.objects.filter(plan=second_plan))


def test_units_start_as_soon_as_the_models_they_need_are_ready(study, monkeypatch):
    """The first explanations start when their own model is trained, not when every model of the plan is."""
    redeclare(monkeypatch, "cve", aux=AUXILIARY)
    study.conditions.filter(setup="consistent").delete()
    condition_add(study=study, method="c3lt", setup="random")  # waits for the autoencoder and the pair's maps
    plan = study_precompute(
        study=study, backbone_params={"auxiliary": {"epochs": 1, "batch_size": 8, "width": 4, "dim": 8}}
    )

    def statuses(method: str) -> set[str]:
        return set(plan.units.filter(condition__method=method).values_list("status", flat=True))

    assert statuses("cve") == statuses("c3lt") == {WorkUnit.Status.PENDING}
    auxiliary = WorkUnit.objects.get(kind=WorkUnit.Kind.BACKBONE, backbone_kind="auxiliary")
    autoencoder = WorkUnit.objects.get(kind=WorkUnit.Kind.BACKBONE, backbone_kind="autoencoder")

    assert work_unit_run(unit_id=auxiliary.pk).status == WorkUnit.Status.DONE
    assert statuses("cve") == {WorkUnit.Status.QUEUED}  # sent to the workers now
    assert statuses("c3lt") == {WorkUnit.Status.PENDING}  # still waiting for its models
    autoencoder.refresh_from_db()
    assert autoencoder.status == WorkUnit.Status.QUEUED  # not trained yet


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no_pairs", "has no class pairs"),
        ("no_conditions", "has no conditions"),
        ("live", "Copy it into a new study"),
        ("too_few_images", "candidate image pairs in the training split"),
        ("bad_config", "not a method of this study"),
        ("bad_pool", "semantic_pool is 0"),
        ("departs", r"depart from the paper's defaults: max_edits \(None -> 3\)\. Name a variant"),
        ("unknown_setting", "sets max_steps, which explain.methods.cve:CVE does not take"),
        ("variant_departs", r"depart from variant 'ldce-cls-cpu-tiny'.*: lambda_c \(2\.3 -> 5\.0\)"),
        (
            "cells_do_not_tile",
            r"'rcsb' cuts images into 16-pixel cells \(cell_size = 16\), which do not tile data set "
            r"'slice''s 28 x 28 images.*\(registered: rcsb-28px, rcsb-cpu-demo, rcsb-cpu-tiny\)",
        ),
    ],
)
def test_planning_refuses_what_it_cannot_do_and_names_the_problem(study, change, message):
    kwargs = {}
    if change == "no_pairs":
        study.pairs.all().delete()
    elif change == "no_conditions":
        study.conditions.all().delete()
    elif change == "live":
        Study.objects.filter(pk=study.pk).update(status=Study.Status.LIVE)
    elif change == "too_few_images":
        Study.objects.filter(pk=study.pk).update(n_learning=50)
    elif change == "bad_config":
        kwargs["method_config"] = {"scout": {}}
    elif change == "bad_pool":
        kwargs["semantic_pool"] = 0
    elif change == "departs":
        kwargs["method_config"] = {"cve": {"max_edits": 3, "chunk_size": 8}}  # chunk_size is no departure
    elif change == "unknown_setting":
        kwargs["method_config"] = {"cve": {"max_steps": 3}}
    elif change == "variant_departs":
        study.conditions.update(method="ldce-cls-cpu-tiny")
        kwargs["method_config"] = {"ldce-cls-cpu-tiny": {"lambda_c": 5.0, "consensus": False}}
    elif change == "cells_do_not_tile":
        study.conditions.update(method="rcsb")
    with pytest.raises(ValidationError, match=message):
        study_precompute(study=study, **kwargs)
    assert not WorkUnit.objects.exists()


def test_cells_that_tile_the_images_are_planned(study):
    """The refusal above is about the cell size, not the method: rcsb-28px's 4-pixel cells tile 28 px."""
    study.conditions.update(method="rcsb-28px")
    plan = study_precompute(study=study, semantic_pool=1)
    assert WorkUnit.objects.filter(plan=plan).count() == 2 * 2  # two setups, n_learning 2


def test_a_variant_is_planned_and_its_results_say_how_it_departs_from_the_paper(study, monkeypatch):
    few = Variant("cve-few-edits", {"max_edits": 4}, "at most four edits, to test")
    redeclare(monkeypatch, "cve", variants=(few,))
    study.conditions.filter(setup="consistent").delete()
    study.conditions.update(method="cve-few-edits")
    plan = study_precompute(study=study, method_config={"cve-few-edits": {"max_edits": 4, "chunk_size": 64}})
    run_queued(plan)

    explanation = Explanation.objects.filter(study=study).first()
    assert (
        explanation.config["method"] == "cve-few-edits" and explanation.config["variant"] == "cve-few-edits"
    )
    assert explanation.config["declared_method"] == "cve" and explanation.config["max_edits"] == 4
    assert explanation.config["chunk_size"] == 64
    assert explanation.config["departures"] == {"max_edits": {"default": None, "value": 4}}
    from explain.precompute import plan_progress

    row = plan_progress(study=study)["conditions"][0]
    assert row["variant"] == few and row["departures"] == explanation.config["departures"]


def test_a_condition_added_later_is_planned_on_the_next_run(study):
    study.conditions.filter(setup="consistent").delete()
    plan = study_precompute(study=study)
    assert WorkUnit.objects.filter(plan=plan).count() == 2
    condition_add(study=study, method="cve", setup=Condition.Setup.CONSISTENT)
    study_precompute(study=study, semantic_pool=2)
    assert WorkUnit.objects.filter(plan=plan).count() == 2 + 4


def test_each_task_sent_holds_one_conditions_units_up_to_the_methods_batch(
    study, monkeypatch, django_capture_on_commit_callbacks
):
    """The worker batches a task's units by condition: a task that mixed conditions ran as several small
    batches. Units are sent in tasks of at most the method's batch, each of one condition."""
    import explain.precompute.units as units_module

    redeclare(monkeypatch, "cve", batch=3)
    sent: list[list[int]] = []
    monkeypatch.setattr(units_module.current_app, "send_task", lambda name, args, queue: sent.append(args[0]))
    with django_capture_on_commit_callbacks(execute=True):
        plan = study_precompute(study=study, semantic_pool=2)  # 2 random units, 4 consistent ones

    by_id = dict(WorkUnit.objects.filter(plan=plan).values_list("pk", "condition_id"))
    assert sorted(i for task in sent for i in task) == sorted(by_id)  # each unit sent once
    assert all(len({by_id[i] for i in task}) == 1 for task in sent), sent
    assert sorted(len(task) for task in sent) == [1, 2, 3]  # random: 2; consistent: 3 + 1
