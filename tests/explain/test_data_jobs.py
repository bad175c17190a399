"""Import and training as background jobs, run by a real Celery worker process on Redis, with progress."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from explain.models import Classifier, Dataset, Job
from explain.services import job_create
from tests.explain.test_worker import wait_for_job, worker_queue  # noqa: F401 - the worker fixture

ROOT = Path(__file__).resolve().parents[2]

# The numerical modules added for data sets and classifiers import without Django.
DJANGO_FREE = [
    "explain.data.records",
    "explain.data.cub",
    "explain.data.image_folder",
    "explain.nets.classifiers",
    "explain.nets.training",
    "explain.nets.auxiliary",
    "explain.stimuli.pairs",
]


def test_numerical_modules_import_without_django():
    code = (
        "import importlib, sys\n"
        f"for m in {DJANGO_FREE!r}: importlib.import_module(m)\n"
        "assert not [m for m in sys.modules if m == 'django' or m.startswith('django.')]\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_worker_imports_fashion_mnist_and_trains_the_builtin_cnn(transactional_db, worker_queue):  # noqa: F811
    job = wait_for_job(
        job_create(kind="dataset_import", params={"kind": "fashion-mnist", "limit": 3}, queue=worker_queue),
        timeout=240,
    )
    assert job.status == Job.Status.DONE, job.error
    assert (job.done, job.total) == (60, 60)
    dataset = Dataset.objects.get(pk=job.result["dataset_id"])
    assert job.result["added"] == 60 and dataset.images.count() == 60

    params = {"dataset_id": dataset.pk, "name": "worker-cnn", "epochs": 2, "batch_size": 10, "width": 4}
    job = wait_for_job(job_create(kind="classifier_train", params=params, queue=worker_queue), timeout=300)
    assert job.status == Job.Status.DONE, job.error
    assert job.done == job.total == 6  # 2 epochs of 3 batches
    classifier = Classifier.objects.get(pk=job.result["classifier_id"])
    assert classifier.predictions.count() == 60 and classifier.test_accuracy == job.result["test_accuracy"]
    assert Path(classifier.checkpoint_path).is_file()

    failed = wait_for_job(
        job_create(
            kind="dataset_import", params={"kind": "cub-200-2011", "path": "/nonexistent"}, queue=worker_queue
        )
    )
    assert (
        failed.status == Job.Status.FAILED
        and "CUB-200-2011 folder /nonexistent does not exist" in failed.error
    )
