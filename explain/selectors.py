"""Reads for data sets, classifiers, models and explanations: with the services, the surface studies reads.
Functions returning networks import torch when called, never at import time (the web process does not load
torch)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
from django.core.exceptions import ValidationError
from django.core.files.storage import default_storage
from django.db.models import Count, IntegerField, OuterRef, Q, QuerySet, Subquery
from django.db.models.fields.json import KT
from django.db.models.functions import Coalesce
from PIL import Image as PILImage

from .models import Backbone, Classifier, ClassLabel, Dataset, Explanation, Image

if TYPE_CHECKING:
    from torch import nn


def backbones_preferred(rows: QuerySet[Backbone]) -> QuerySet[Backbone]:
    """``rows`` with the researcher's registered models first (``config["registered"]``), then the newest:
    a registered model is used instead of one the platform trained, whenever both exist."""
    registered = KT("config__registered")
    return rows.order_by(registered.desc(nulls_last=True), "-created_at", "-pk")


def usable_explanations(queryset: QuerySet[Explanation]) -> QuerySet[Explanation]:
    """The explanations that can be learning stimuli: flipped, or from an attribution method (SCOUT)."""
    from .methods import no_flip_names

    return queryset.filter(Q(flipped=True) | Q(condition__method__in=no_flip_names()))


def related_count(queryset: QuerySet, field: str) -> Coalesce:
    """Annotation: how many rows of ``queryset`` have ``field`` = the outer row (a subquery, no join)."""
    sub = queryset.filter(**{field: OuterRef("pk")}).order_by().values(field)
    sub = sub.annotate(n=Count("pk")).values("n")
    return Coalesce(Subquery(sub, output_field=IntegerField()), 0)


def dataset_list_with_counts() -> QuerySet[Dataset]:
    return Dataset.objects.annotate(
        n_classes=related_count(ClassLabel.objects.all(), "dataset"),
        n_images=related_count(Image.objects.all(), "dataset"),
    )


def dataset_counts(*, dataset: Dataset) -> dict:
    """``{"images": n, "per_split": {split: {class name: n}}}`` from the database."""
    rows = (
        Image.objects.filter(dataset=dataset)
        .values("split", "class_label__name")
        .annotate(n=Count("pk"))
        .order_by("split", "class_label__index")
    )
    per_split: dict[str, dict[str, int]] = {}
    for row in rows:
        per_split.setdefault(row["split"], {})[row["class_label__name"]] = row["n"]
    return {"images": sum(sum(v.values()) for v in per_split.values()), "per_split": per_split}


def image_array(image: Image) -> np.ndarray:
    """The pixels of an imported image: uint8 (H, W) for grey images, (H, W, 3) for colour ones."""
    with default_storage.open(image.file.name, "rb") as fh, PILImage.open(fh) as pil:
        if pil.mode not in ("L", "RGB"):
            pil = pil.convert("RGB")
        return np.asarray(pil, dtype=np.uint8).copy()


def split_images(*, dataset: Dataset, split: str, limit_per_class: int | None = None) -> list[Image]:
    """The images of one split in a fixed order (class, then id); the first ``limit_per_class`` per class."""
    images = list(
        Image.objects.filter(dataset=dataset, split=split)
        .select_related("class_label")
        .only("pk", "file", "split", "source_id", "keypoints", "class_label__index")
        .order_by("class_label__index", "pk")
    )
    if limit_per_class is not None:
        kept, seen = [], Counter()
        for image in images:
            seen[image.class_label.index] += 1
            if seen[image.class_label.index] <= limit_per_class:
                kept.append(image)
        images = kept
    return images


def classifier_model(classifier: Classifier) -> nn.Module:
    """The registered or trained network with its weights, in eval mode on the CPU (the caller moves it)."""
    from .nets.classifiers import load_classifier

    return load_classifier(
        classifier.architecture,
        classifier.checkpoint_path,
        classifier.dataset.classes.count(),
        in_channels=classifier.in_channels,
        prefix=classifier.checkpoint_prefix or None,
        **classifier.options,
    )


def auxiliary_model(backbone: Backbone) -> nn.Module:
    """An auxiliary embedding u with ``.cells(x)``: a trained SimSiam model or a loaded ResNet-50."""
    from .nets.auxiliary import load_resnet50_auxiliary, load_simsiam

    if backbone.kind != Backbone.Kind.AUXILIARY:
        raise ValueError(f"backbone {backbone.name!r} is a {backbone.kind} model, not an auxiliary one")
    if backbone.config.get("architecture") == "resnet50":
        return load_resnet50_auxiliary(backbone.path)
    return load_simsiam(backbone.path, backbone.config["net"])


def mined_pairs(
    *, classifier: Classifier, method: str = "most_confused", k: int = 10
) -> list[dict[str, Any]]:
    """Class pairs mined for a classifier's data set: ``most_confused`` (per class, from the test confusion
    matrix), ``top_k`` (the k most confused ordered pairs) or ``attributes`` (nearest class by mean attribute
    vector). Each: ``{"class_a": ClassLabel, "class_b": ClassLabel, "score": float, "method": str}``."""
    from .stimuli.pairs import most_confused_pairs, nearest_by_attributes, top_k_confused_pairs

    labels = {c.index: c for c in classifier.dataset.classes.all()}
    if method in ("most_confused", "top_k"):
        if not classifier.confusion_matrix:
            raise ValidationError(
                f"Classifier {classifier.name!r} has no confusion matrix yet: evaluate it on the test split "
                "first."
            )
        if method == "most_confused":
            mined = most_confused_pairs(classifier.confusion_matrix)
        else:
            mined = top_k_confused_pairs(classifier.confusion_matrix, k)
    elif method == "attributes":
        vectors: dict[int, list[list[float]]] = {}
        rows = Image.objects.filter(dataset=classifier.dataset, attributes__isnull=False)
        for index, attributes in rows.values_list("class_label__index", "attributes").iterator():
            vectors.setdefault(index, []).append(attributes)
        if len(vectors) < 2:
            raise ValidationError(
                f"Data set {classifier.dataset.name!r} has no per-image attributes (CUB's "
                "attributes/image_attribute_labels.txt); mine pairs from the confusion matrix instead."
            )
        mined = nearest_by_attributes({c: np.asarray(v) for c, v in vectors.items()})
    else:
        raise ValueError(f"unknown mining method {method!r}; use most_confused, top_k or attributes")
    return [
        {"class_a": labels[p.class_a], "class_b": labels[p.class_b], "score": p.score, "method": method}
        for p in mined
    ]


def dataset_blur_preview(*, dataset_id: int, sigma: float) -> bytes:
    """PNG of one image of the data set as a learning stimulus shows it at blur ``sigma`` (pixels of the
    displayed 224 px image): its centre in focus, the rest blurred, rendered as raters' stimuli are."""
    from .stimuli.rendering import stimulus_png

    image = Image.objects.filter(dataset_id=dataset_id).order_by("split", "pk").first()
    if image is None:
        pixels = np.full((28, 28), 0.5)
    else:
        with image.file.open("rb") as handle, PILImage.open(handle) as opened:
            pixels = np.asarray(opened.convert("L" if opened.mode == "L" else "RGB"), dtype=np.float64) / 255
    h, w = pixels.shape[:2]
    mask = np.zeros((h, w))
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
    scale = max(1, 224 // max(h, w))
    return stimulus_png(pixels, mask, sigma / scale, scale=scale)
