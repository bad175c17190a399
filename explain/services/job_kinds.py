"""Kinds of background job, by name. Each is a function ``(job, progress) -> result`` run by a worker.

``progress(done, total)`` records how far it got, so the admin can show a counter.
"""

from collections import Counter
from collections.abc import Callable
from typing import Any

from django.core.files.storage import default_storage
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from explain.models import Classifier, Dataset, Job
from explain.services.progress import Progress

JobFunction = Callable[[Job, Progress], dict[str, Any]]

_PROGRESS_EVERY = 200


def dataset_verify(job: Job, progress: Progress) -> dict[str, Any]:
    """Open every image of a data set, count images per split and class, and list unreadable files."""
    dataset = Dataset.objects.get(pk=job.params["dataset_id"])
    images = dataset.images.select_related("class_label").only(
        "file", "split", "source_id", "class_label__name"
    )
    total = images.count()
    counts: Counter[tuple[str, str]] = Counter()
    unreadable: list[dict[str, str]] = []
    progress(0, total)
    for done, image in enumerate(images.iterator(chunk_size=1000), start=1):
        try:
            with default_storage.open(image.file.name, "rb") as fh, PILImage.open(fh) as pil:
                pil.verify()
        except (OSError, UnidentifiedImageError, SyntaxError) as exc:
            unreadable.append({"source_id": image.source_id, "file": image.file.name, "error": str(exc)})
        else:
            counts[(image.split, image.class_label.name)] += 1
        if done % _PROGRESS_EVERY == 0 or done == total:
            progress(done, total)
    per_split: dict[str, dict[str, int]] = {}
    for (split, name), n in sorted(counts.items()):
        per_split.setdefault(split, {})[name] = n
    summary = {"images": total, "readable": total - len(unreadable), "per_split": per_split}
    dataset.summary = summary
    dataset.save(update_fields=["summary"])
    return {**summary, "unreadable": unreadable}


def dataset_import(job: Job, progress: Progress) -> dict[str, Any]:
    """params: kind, path, name, skip_corrupt, limit, test_percent (as ``services.dataset_import``)."""
    from explain.services.datasets import dataset_import as import_

    p = job.params
    dataset = import_(
        kind=p["kind"],
        path=p.get("path"),
        name=p.get("name"),
        skip_corrupt=bool(p.get("skip_corrupt", False)),
        limit=p.get("limit"),
        test_percent=int(p.get("test_percent", 20)),
        progress=progress,
    )
    report = dataset.import_report
    return {
        "dataset_id": dataset.pk,
        "added": report.get("added", 0),
        "skipped": len(report.get("skipped", [])),
    }


def classifier_train(job: Job, progress: Progress) -> dict[str, Any]:
    """params: dataset_id, name, and optionally architecture, epochs, batch_size, lr, seed, width, limit."""
    from explain.services.classifiers import classifier_train as train

    p = dict(job.params)
    dataset = Dataset.objects.get(pk=p.pop("dataset_id"))
    classifier = train(dataset=dataset, progress=progress, **p)
    return {"classifier_id": classifier.pk, "test_accuracy": classifier.test_accuracy}


def classifier_register(job: Job, progress: Progress) -> dict[str, Any]:
    """params: dataset_id, name, architecture, checkpoint_path, optionally prefix, input_size; evaluates."""
    from explain.services.classifiers import classifier_evaluate
    from explain.services.classifiers import classifier_register as register

    p = dict(job.params)
    dataset = Dataset.objects.get(pk=p.pop("dataset_id"))
    classifier = classifier_evaluate(classifier=register(dataset=dataset, **p), progress=progress)
    return {"classifier_id": classifier.pk, "test_accuracy": classifier.test_accuracy}


def classifier_evaluate(job: Job, progress: Progress) -> dict[str, Any]:
    """params: classifier_id; stores predictions, accuracy and confusion matrix on both splits."""
    from explain.services.classifiers import classifier_evaluate as evaluate

    classifier = evaluate(
        classifier=Classifier.objects.get(pk=job.params["classifier_id"]), progress=progress
    )
    return {
        "classifier_id": classifier.pk,
        "evaluation": {s: e["accuracy"] for s, e in classifier.evaluation.items()},
    }


def auxiliary_train(job: Job, progress: Progress) -> dict[str, Any]:
    """params: dataset_id, and optionally name, epochs, batch_size, lr, seed, width, dim, limit."""
    from explain.services.auxiliary import auxiliary_train as train

    p = dict(job.params)
    dataset = Dataset.objects.get(pk=p.pop("dataset_id"))
    backbone = train(dataset=dataset, progress=progress, **p)
    return {"backbone_id": backbone.pk, "loss": backbone.provenance["epoch_losses"]}


def backbone_register(job: Job, progress: Progress) -> dict[str, Any]:
    """params: dataset_id, kind, path, format_name, name, options, and optionally classifier_id."""
    from explain.services.registration import backbone_register as register

    p = dict(job.params)
    dataset = Dataset.objects.get(pk=p.pop("dataset_id"))
    classifier_id = p.pop("classifier_id", None)
    classifier = Classifier.objects.get(pk=classifier_id) if classifier_id else None
    progress(0, 1)
    backbone = register(dataset=dataset, classifier=classifier, **p)
    progress(1, 1)
    return {"backbone_id": backbone.pk, "name": backbone.name, "config": backbone.config}


JOB_KINDS: dict[str, JobFunction] = {
    "auxiliary_train": auxiliary_train,
    "backbone_register": backbone_register,
    "classifier_evaluate": classifier_evaluate,
    "classifier_register": classifier_register,
    "classifier_train": classifier_train,
    "dataset_import": dataset_import,
    "dataset_verify": dataset_verify,
}
