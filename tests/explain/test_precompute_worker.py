"""Precompute through real Celery worker processes on Redis: end to end, and a worker SIGKILLed mid-run."""

import io
import re
import time
import uuid

import pytest
from django.core.management import call_command

from explain import precompute
from explain.models import Explanation, WorkUnit
from explain.precompute import study_precompute
from studies.models import Study
from studies.selectors import study_missing_stimuli
from studies.services import class_pair_add, study_create
from tests.explain.precompute_helpers import Worker, fashion_slice, trained_checkpoint

pytestmark = pytest.mark.slow

VISIBILITY_TIMEOUT_S = 4


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory.mktemp("cnn"))


def make_study(checkpoint, *, name: str, setups: tuple[str, ...], n_learning: int) -> Study:
    dataset, classifier, coat, pullover = fashion_slice(name=name, per_class=14, checkpoint=checkpoint)
    study = study_create(
        title=name,
        dataset=dataset,
        classifier=classifier,
        methods=["cve"],
        setups=setups,
        n_learning=n_learning,
    )
    class_pair_add(study=study, class_a=coat, class_b=pullover)
    return study


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_study_is_precomputed_end_to_end_by_a_real_worker(transactional_db, checkpoint, tmp_path):
    study = make_study(checkpoint, name="e2e", setups=("random", "consistent"), n_learning=2)
    queue = f"test-explain-{uuid.uuid4().hex[:8]}"
    worker = Worker(queue, tmp_path / "worker.log")
    worker.start()
    try:
        out = io.StringIO()
        options = ["--queue", queue, "--semantic-pool", "2", "--wait", "--timeout", "180"]
        call_command("precompute", str(study.pk), *options, stdout=out)
    finally:
        worker.stop()
    plan = study.precompute_plan
    assert re.search(r"cve / random\s+stimuli 2/2", out.getvalue())
    assert re.search(r"cve / consistent\s+stimuli 2/2", out.getvalue())
    assert "study is ready" in out.getvalue()
    study.refresh_from_db()
    assert study.status == Study.Status.READY

    assert study_missing_stimuli(study=study) == []
    units = WorkUnit.objects.filter(plan=plan)
    assert not units.filter(status=WorkUnit.Status.FAILED).exists()
    for condition in study.conditions.all():
        assert Explanation.objects.filter(study=study, condition=condition, flipped=True).count() == 2
    done = units.filter(status=WorkUnit.Status.DONE)
    assert {u.worker for u in done} and all(u.device == "cpu" and u.attempts == 1 for u in done)
    assert all(e.config["device"] == "cpu" for e in Explanation.objects.filter(study=study))
    assert (
        "Receiving task" not in worker.log_path.read_text() or "work_units_run" in worker.log_path.read_text()
    )


def test_a_worker_killed_mid_run_loses_nothing_and_duplicates_nothing(transactional_db, checkpoint, tmp_path):
    # chunk_size=1 scores one candidate cell pair per pass of g: each unit takes about a second, long enough
    # to be caught running. The broker redelivers an unacknowledged task after VISIBILITY_TIMEOUT_S.
    study = make_study(checkpoint, name="kill", setups=("random",), n_learning=3)
    queue = f"test-explain-{uuid.uuid4().hex[:8]}"
    env = {"CELERY_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT_S)}
    worker = Worker(queue, tmp_path / "worker.log", extra_env=env)
    worker.start()
    killed: list[str] = []
    try:
        plan = study_precompute(study=study, queue=queue, method_config={"cve": {"chunk_size": 1}})
        units = WorkUnit.objects.filter(plan=plan)
        for _ in range(3):  # kill until a kill lands mid-task (a unit may finish just before the signal)
            wait_until(lambda: units.filter(status=WorkUnit.Status.RUNNING).exists(), 120, "a running unit")
            worker.kill()
            running = list(units.filter(status=WorkUnit.Status.RUNNING).values_list("key", flat=True))
            killed += running
            time.sleep(VISIBILITY_TIMEOUT_S + 1)  # the new worker restores the unacknowledged task at start
            worker.start()
            if running:
                break
        assert killed, "no kill landed while a unit was running"
        wait_until(
            lambda: Study.objects.get(pk=study.pk).status == Study.Status.READY,
            240,
            f"the study to become ready; units: {list(units.values_list('key', 'status', 'attempts'))}",
        )
    finally:
        worker.stop()

    for key in killed:
        unit = WorkUnit.objects.get(key=key)
        assert unit.status in {WorkUnit.Status.DONE, WorkUnit.Status.UNEXPLAINABLE}
        assert 2 <= unit.attempts <= precompute.MAX_ATTEMPTS  # it ran again after the kill
    explanations = Explanation.objects.filter(study=study)
    assert explanations.count() == 3  # no missing, no duplicated explanations
    done = WorkUnit.objects.filter(plan=plan, status=WorkUnit.Status.DONE)
    assert sorted(explanations.values_list("key", flat=True)) == sorted(done.values_list("key", flat=True))
    assert not WorkUnit.objects.filter(plan=plan).exclude(status__in=WorkUnit.TERMINAL).exists()
