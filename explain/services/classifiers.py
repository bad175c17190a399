"""Registering, training and evaluating classifiers (checkpoints, accuracy, confusion matrix, predictions)."""

import time
import uuid
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils.text import slugify

from explain.models import Classifier, Dataset, Image, Prediction
from explain.selectors import classifier_model
from explain.services import provenance
from explain.services.datasets import _dataset_channels, _load_split
from explain.services.progress import Progress


def _checkpoint_path(folder: str, name: str) -> Path:
    root = Path(settings.FOIL_DATA_ROOT) / folder
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{slugify(name) or 'model'}-{uuid.uuid4().hex[:8]}.pt"


def classifier_register(
    *,
    dataset: Dataset,
    name: str,
    architecture: str,
    checkpoint_path: str | Path,
    prefix: str = "",
    in_channels: int | None = None,
    input_size: int | None = None,
    normalisation: dict | None = None,
    options: dict | None = None,
) -> Classifier:
    """Register a researcher's classifier: a local checkpoint of a supported architecture, loaded here once to
    check that it fits the data set (class count, keys, shapes). Evaluate it next to store its predictions."""
    from explain.nets.classifiers import (
        GREY_NORMALISATION,
        IMAGENET_NORMALISATION,
        INPUT_SIZES,
        SPLIT_POINTS,
        CheckpointError,
        load_classifier,
    )

    if architecture not in SPLIT_POINTS:
        raise ValidationError(f"Unknown architecture {architecture!r}; supported: {', '.join(SPLIT_POINTS)}.")
    num_classes = dataset.classes.count()
    if num_classes < 2:
        raise ValidationError(f"Data set {dataset.name!r} has {num_classes} classes; import it first.")
    in_channels = in_channels or _dataset_channels(dataset)
    path = Path(checkpoint_path).expanduser().resolve()
    try:
        load_classifier(
            architecture, path, num_classes, in_channels=in_channels, prefix=prefix or None, **(options or {})
        )
    except (CheckpointError, ValueError, TypeError) as exc:
        raise ValidationError(str(exc)) from None
    classifier = Classifier(
        dataset=dataset,
        name=name,
        architecture=architecture,
        checkpoint_path=str(path),
        checkpoint_prefix=prefix,
        in_channels=in_channels,
        options=options or {},
        split_point=SPLIT_POINTS[architecture],
        input_size=input_size or INPUT_SIZES[architecture],
        normalisation=normalisation or (IMAGENET_NORMALISATION if in_channels == 3 else GREY_NORMALISATION),
        provenance=provenance.registered(path, architecture=architecture, num_classes=num_classes),
    )
    classifier.full_clean()
    classifier.save()
    return classifier


def classifier_train(
    *,
    dataset: Dataset,
    name: str,
    architecture: str = "small_cnn",
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    width: int = 32,
    limit: int | None = None,
    progress: Progress | None = None,
) -> Classifier:
    """Train a classifier on the data set's train split (the built-in CNN by default), save its checkpoint
    under ``FOIL_DATA_ROOT/classifiers/``, and evaluate it on both splits (accuracy, confusion matrix,
    predictions).

    ``limit`` trains on the first N images per class (tests, demos). Deterministic given ``seed``.
    """
    import torch

    from explain.nets.classifiers import INPUT_SIZES, SPLIT_POINTS, build_classifier, to_input
    from explain.nets.training import train_classifier

    if Classifier.objects.filter(name=name).exists():
        raise ValidationError(f"A classifier named {name!r} already exists; choose another name.")
    if architecture not in SPLIT_POINTS:
        raise ValidationError(f"Unknown architecture {architecture!r}; supported: {', '.join(SPLIT_POINTS)}.")
    num_classes = dataset.classes.count()
    in_channels = _dataset_channels(dataset)
    options = {"width": width} if architecture == "small_cnn" else {}
    input_size = (dataset.image_width or 28) if architecture == "small_cnn" else INPUT_SIZES[architecture]
    images, arrays = _load_split(dataset, "train", limit)
    if not images:
        raise ValidationError(f"Data set {dataset.name!r} has no training images; import it first.")
    if in_channels == 1:
        pixels = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float64) / 255
        normalisation = {"mean": [round(float(pixels.mean()), 4)], "std": [round(float(pixels.std()), 4)]}
    else:
        from explain.nets.classifiers import IMAGENET_NORMALISATION

        normalisation = IMAGENET_NORMALISATION
    x = to_input(arrays, in_channels=in_channels, normalisation=normalisation, input_size=input_size)
    y = torch.tensor([image.class_label.index for image in images])
    torch.manual_seed(seed)
    model = build_classifier(architecture, num_classes, in_channels, **options)
    started = time.perf_counter()
    curve = train_classifier(
        model,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        generator=torch.Generator().manual_seed(seed),
        progress=progress,
    )
    seconds = time.perf_counter() - started
    path = _checkpoint_path("classifiers", name)
    torch.save(model.state_dict(), path)
    classifier = Classifier(
        dataset=dataset,
        name=name,
        architecture=architecture,
        checkpoint_path=str(path),
        in_channels=in_channels,
        options=options,
        split_point=SPLIT_POINTS[architecture],
        input_size=input_size,
        normalisation=normalisation,
        provenance=provenance.trained(
            data={"dataset": dataset.name, "split": "train", "images": len(images), "limit": limit},
            params={"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed},
            seconds=seconds, losses=curve["batch_loss"], loss_unit="logged batch", epoch_losses=curve["loss"],
        ),
    )  # fmt: skip
    try:
        classifier.full_clean()
        classifier.save()
    except Exception:
        path.unlink(missing_ok=True)
        raise
    _store_evaluation(classifier, model, "train", images, arrays)
    test_images, test_arrays = _load_split(dataset, "test")
    if test_images:
        _store_evaluation(classifier, model, "test", test_images, test_arrays)
    return classifier


def classifier_evaluate(
    *, classifier: Classifier, splits: tuple[str, ...] = ("train", "test"), progress: Progress | None = None
) -> Classifier:
    """Run the classifier on every image of the given splits; store each prediction, and per split the
    accuracy and confusion matrix (the test split's also in ``test_accuracy`` and ``confusion_matrix``)."""
    model = classifier_model(classifier)
    for number, split in enumerate(splits, start=1):
        images, arrays = _load_split(classifier.dataset, split)
        if images:
            _store_evaluation(classifier, model, split, images, arrays)
        if progress:
            progress(number, len(splits))
    return classifier


_PREDICT_CHUNK = 2048


def _store_evaluation(classifier: Classifier, model, split: str, images: list[Image], arrays: list) -> None:
    import torch

    from explain.nets.classifiers import to_input
    from explain.nets.training import confusion_matrix, predict

    num_classes = classifier.dataset.classes.count()
    predictions: list[int] = []
    for start in range(0, len(arrays), _PREDICT_CHUNK):
        x = to_input(
            arrays[start : start + _PREDICT_CHUNK],
            in_channels=classifier.in_channels,
            normalisation=classifier.normalisation,
            input_size=classifier.input_size,
        )
        predictions += predict(model, x).tolist()
    y = torch.tensor([image.class_label.index for image in images])
    confusion = confusion_matrix(y, torch.tensor(predictions), num_classes)
    accuracy = sum(confusion[c][c] for c in range(num_classes)) / len(images)
    with transaction.atomic():
        Prediction.objects.filter(classifier=classifier, image__split=split).delete()
        Prediction.objects.bulk_create(
            [
                Prediction(
                    classifier=classifier,
                    image=image,
                    predicted_index=p,
                    correct=p == image.class_label.index,
                )
                for image, p in zip(images, predictions, strict=True)
            ],
            batch_size=5000,
        )
        classifier.evaluation = {
            **classifier.evaluation,
            split: {"accuracy": accuracy, "confusion_matrix": confusion, "images": len(images)},
        }
        fields = ["evaluation"]
        if split == "test":
            classifier.test_accuracy, classifier.confusion_matrix = accuracy, confusion
            fields += ["test_accuracy", "confusion_matrix"]
        classifier.save(update_fields=fields)
