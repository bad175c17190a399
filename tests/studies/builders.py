"""A live study with real stimulus files, small enough for the rater tests (and the browser tests)."""

import io
from contextlib import contextmanager

import numpy as np
from django.core.files.base import ContentFile
from django.db import connection, transaction
from PIL import Image as PILImage
from PIL.PngImagePlugin import PngInfo

from explain.models import ExplanationDistractor, Image
from studies.models import Condition, Study
from tests.factories import (
    ClassifierFactory,
    ClassLabelFactory,
    ClassPairFactory,
    ConditionFactory,
    DatasetFactory,
    ExplanationFactory,
    ImageFactory,
    StudyFactory,
)

# Class names that must never reach a rater's browser; distinctive, so a scan cannot hit them by accident.
SECRET_CLASS_NAMES = [
    "Sooty Albatross",
    "Laysan Albatross",
    "Crested Auklet",
    "Least Auklet",
    "Rusty Blackbird",
]


@contextmanager
def data_guards_off():
    """Test set-up only: switch off the database's guards of frozen studies (migration 0005's triggers) for
    the rest of this block, as only a database superuser could, e.g. to backdate an assignment's start."""
    with transaction.atomic():  # SET LOCAL needs a transaction (transactional tests have none around them)
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL session_replication_role = replica")
        try:
            yield
        finally:
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL session_replication_role = origin")


def png(color: tuple[int, int, int], size: int = 8, text: dict[str, str] | None = None) -> ContentFile:
    """A small PNG, with text chunks when ``text`` is given (metadata the server must strip)."""
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    out = io.BytesIO()
    PILImage.new("RGB", (size, size), color).save(out, format="PNG", pnginfo=info)
    return ContentFile(out.getvalue(), name="stimulus.png")


def live_study(
    *,
    n_pairs: int = 2,
    setups: tuple[str, ...] = (Condition.Setup.RANDOM, Condition.Setup.CONSISTENT),
    n_images: int = 4,
    n_learning: int = 2,
    test_images_per_class: int = 4,
    leaky_metadata: bool = True,
    **design,
) -> Study:
    """A live study: ``n_pairs`` class pairs, a condition per setup (method "cve"), ``n_learning`` flipped
    explanations per pair x condition, and test images whose PNG text chunks name their class (when
    ``leaky_metadata``), so that tests can check none of it reaches raters."""
    dataset = DatasetFactory()
    classes = [
        ClassLabelFactory(
            dataset=dataset, index=i, name=SECRET_CLASS_NAMES[i % len(SECRET_CLASS_NAMES)] + f" {i}"
        )
        for i in range(2 * n_pairs)
    ]
    design = {"min_learning_seconds": 0.0, "min_rt_ms": 0, **design}
    study = StudyFactory(
        dataset=dataset,
        classifier=ClassifierFactory(dataset=dataset),
        n_prelearning=n_images,
        n_test=n_images,
        n_learning=n_learning,
        **design,
    )
    conditions = [ConditionFactory(study=study, method="cve", setup=s) for s in setups]
    for c, label in enumerate(classes):
        for i in range(test_images_per_class):
            text = {"Title": label.name, "Comment": f"class {label.index}"} if leaky_metadata else None
            ImageFactory(
                class_label=label, split=Image.Split.TEST, file=png((40 * c % 256, 10 * i, 90), text=text)
            )
    for p in range(n_pairs):
        pair = ClassPairFactory(study=study, class_a=classes[2 * p], class_b=classes[2 * p + 1])
        for condition in conditions:
            for _ in range(n_learning):
                query = ImageFactory(class_label=pair.class_a, split=Image.Split.TRAIN)
                distractor = ImageFactory(class_label=pair.class_b, split=Image.Split.TRAIN)
                e = ExplanationFactory(
                    pair=pair,
                    condition=condition,
                    query_image=query,
                    query_stimulus=png((200, 30, 30), text={"Title": pair.class_a.name}),
                    distractor_stimulus=png((30, 30, 200), text={"Title": pair.class_b.name}),
                    config={"method": "cve", "setup": condition.setup, "class_a": pair.class_a.name},
                )
                ExplanationDistractor.objects.create(explanation=e, image=distractor, rank=0)
    study.status = Study.Status.LIVE
    study.save(update_fields=["status"])
    return study


def drawn(side: str, rng: np.random.Generator) -> np.ndarray:
    """28 x 28 textured noise in [0, 1]; the classes differ only in the top-left patch (bright A, dark B)."""
    image = rng.uniform(0.2, 0.8, size=(28, 28))
    image[2:10, 2:10] = rng.uniform(0.85, 1.0, (8, 8)) if side == "A" else rng.uniform(0.0, 0.15, (8, 8))
    return image


def region(rows: slice, cols: slice) -> np.ndarray:
    """A 28 x 28 mask, 1 on ``rows`` x ``cols``."""
    mask = np.zeros((28, 28))
    mask[rows, cols] = 1.0
    return mask
