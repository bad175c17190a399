"""A real Celery worker process on Redis runs a job and writes its outcome to the test database."""

import time
import uuid

import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from explain.models import Dataset, Job
from explain.services import job_create
from tests.explain.precompute_helpers import Worker
from tests.factories import ClassLabelFactory, DatasetFactory, ImageFactory


@pytest.fixture(scope="module")
def worker_queue(django_db_setup, django_db_blocker, tmp_path_factory):
    """Start ``celery worker`` on a queue of its own, pointed at the test database; yield the queue name."""
    queue = f"test-{uuid.uuid4().hex[:10]}"
    worker = Worker(queue, tmp_path_factory.mktemp("worker") / "worker.log")
    worker.start()
    yield queue
    worker.stop()


def wait_for_job(job: Job, timeout: float = 60) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.status in {Job.Status.DONE, Job.Status.FAILED}:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job.pk} still {job.status} after {timeout} s")


@pytest.mark.slow
def test_worker_checks_every_image_of_a_dataset(transactional_db, worker_queue):
    dataset = DatasetFactory(name="round-trip")
    coat = ClassLabelFactory(dataset=dataset, index=0, name="Coat")
    shirt = ClassLabelFactory(dataset=dataset, index=1, name="Shirt")
    ImageFactory.create_batch(2, class_label=coat, split="train")
    ImageFactory(class_label=shirt, split="test")
    broken = ImageFactory(class_label=shirt, split="test", source_id="broken-1")
    broken.file.name = default_storage.save("images/broken.png", ContentFile(b"\x89PNG\r\n\x1a\nnot really"))
    broken.save(update_fields=["file"])

    job = wait_for_job(
        job_create(kind="dataset_verify", params={"dataset_id": dataset.pk}, queue=worker_queue)
    )

    assert job.status == Job.Status.DONE, job.error
    assert (job.done, job.total) == (4, 4)
    assert job.result["readable"] == 3
    assert job.result["per_split"] == {"test": {"Shirt": 1}, "train": {"Coat": 2}}
    assert [u["source_id"] for u in job.result["unreadable"]] == ["broken-1"]
    assert job.worker and job.started_at and job.finished_at
    dataset.refresh_from_db()
    assert dataset.summary["images"] == 4


@pytest.mark.slow
def test_worker_keeps_the_error_of_a_failed_job(transactional_db, worker_queue):
    missing_id = (Dataset.objects.order_by("-pk").values_list("pk", flat=True).first() or 0) + 1000
    job = wait_for_job(
        job_create(kind="dataset_verify", params={"dataset_id": missing_id}, queue=worker_queue)
    )
    assert job.status == Job.Status.FAILED
    assert "DoesNotExist" in job.error and "Dataset matching query does not exist" in job.error


@pytest.mark.slow
def test_a_worker_of_another_installation_on_the_same_redis_leaves_our_tasks(transactional_db, tmp_path):
    """Two installations on one Redis database (a demo beside a benchmark) used to take each other's tasks
    and fail them on the wrong database. A worker of another namespace, listening on the very queue, leaves
    the job waiting in our namespace's queue; a worker of ours then runs it."""
    import redis

    queue = f"test-{uuid.uuid4().hex[:10]}"
    stranger = Worker(
        queue, tmp_path / "stranger.log", {"FOIL_BROKER_NAMESPACE": f"other-{uuid.uuid4().hex[:6]}"}
    )
    ours = Worker(queue, tmp_path / "ours.log")
    dataset = DatasetFactory(name="namespaced")
    ImageFactory(class_label=ClassLabelFactory(dataset=dataset, index=0, name="Coat"), split="train")
    try:
        stranger.start()
        job = job_create(kind="dataset_verify", params={"dataset_id": dataset.pk}, queue=queue)
        time.sleep(6)  # a worker on the same keys takes a message within a second of its arrival
        job.refresh_from_db()
        assert job.status == Job.Status.QUEUED, f"another installation's worker ran our job: {job.status}"
        waiting = redis.Redis.from_url(settings.CELERY_BROKER_URL).llen(
            f"foil:{settings.FOIL_BROKER_NAMESPACE}:{queue}"
        )
        assert waiting == 1
        assert "Received task" not in stranger.log_path.read_text()

        ours.start()
        job = wait_for_job(job)
        assert job.status == Job.Status.DONE, job.error
    finally:
        stranger.stop()
        ours.stop()
