"""Importing data sets (Fashion-MNIST, CUB-200-2011, an image folder) as Dataset, ClassLabel, Image rows."""

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify
from tqdm.auto import tqdm

from explain.data.records import DatasetSource
from explain.models import ClassLabel, Dataset, Image
from explain.selectors import dataset_counts, image_array, split_images
from explain.services.progress import Progress

DEFAULT_DATASET_NAMES = {Dataset.Kind.FASHION_MNIST: "Fashion-MNIST"}
_IMPORT_BATCH = 1000


def dataset_import(
    *,
    kind: str,
    path: str | Path | None = None,
    name: str | None = None,
    skip_corrupt: bool = False,
    limit: int | None = None,
    test_percent: int = 20,
    progress: Progress | None = None,
) -> Dataset:
    """Import a data set: its classes, and every image as a PNG file (opaque name) in the default storage.

    ``kind`` is ``fashion-mnist`` (``path`` defaults to Debian's ``/usr/share/datasets/fashion-mnist``),
    ``cub-200-2011`` or ``image-folder``. ``limit`` keeps the first N images per split and class
    (tests, demos). Idempotent: images already imported (by source id) are left alone, so a second run adds
    nothing. Bad input is refused with a ``ValidationError`` naming the file and the problem, and leaves
    nothing behind; unreadable images are listed, and skipped only with ``skip_corrupt`` (writes a report).
    """
    from explain.data.records import CorruptImageError, DataError, check_keypoints, decode_image, encode_png

    if kind not in Dataset.Kind.values:
        raise ValidationError(
            f"Unknown data set kind {kind!r}; known kinds: {', '.join(Dataset.Kind.values)}."
        )
    if limit is not None and limit < 1:
        raise ValidationError(f"limit must be at least 1 image per split and class, got {limit}.")
    try:
        source = _read_source(kind, path, limit, test_percent)
    except (DataError, FileNotFoundError) as exc:
        raise ValidationError(str(exc)) from None
    name = name or DEFAULT_DATASET_NAMES.get(kind) or source.root.name
    dataset, dataset_created = _dataset_for_import(kind=kind, name=name, source=source)
    labels = {c.index: c for c in dataset.classes.all()}
    known = set(dataset.images.values_list("source_id", flat=True))
    todo = [r for r in source.records if r.source_id not in known]
    total = len(todo)
    created_ids: list[int] = []
    written: list[str] = []
    skipped: list[dict[str, str]] = []
    sizes: set[tuple[int, int]] = set()
    if progress:
        progress(0, total)
    try:
        with tqdm(total=total, desc=f"import {name}", unit="image", disable=None) as bar:
            for start in range(0, total, _IMPORT_BATCH):
                rows = []
                for record in todo[start : start + _IMPORT_BATCH]:
                    try:
                        pixels = decode_image(record)
                    except CorruptImageError as exc:
                        skipped.append(
                            {"source_id": record.source_id, "file": str(record.path), "error": str(exc)}
                        )
                        continue
                    height, width = pixels.shape[:2]
                    if record.keypoints:
                        check_keypoints(
                            record.keypoints, width, height, f"{record.path} (image {record.source_id})"
                        )
                    sizes.add((width, height))
                    token = uuid.uuid4().hex
                    stored = default_storage.save(
                        f"images/{dataset.pk}/{token[:2]}/{token}.png", ContentFile(encode_png(pixels))
                    )
                    written.append(stored)
                    rows.append(
                        Image(
                            dataset=dataset,
                            class_label=labels[record.class_index],
                            source_id=record.source_id,
                            file=stored,
                            split=record.split,
                            keypoints=record.keypoints,
                            attributes=record.attributes,
                            bbox=record.bbox,
                        )
                    )
                with transaction.atomic():
                    created_ids += [image.pk for image in Image.objects.bulk_create(rows)]
                done = min(start + _IMPORT_BATCH, total)
                bar.update(done - bar.n)
                if progress:
                    progress(done, total)
        if skipped and not skip_corrupt:
            listed = "; ".join(s["error"] for s in skipped[:10])
            more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
            raise DataError(
                f"{len(skipped)} unreadable image(s): {listed}{more}. Replace or remove them, or import with "
                "skip_corrupt (--skip-corrupt) to leave them out and write a report."
            )
    except BaseException as exc:
        # Leave nothing behind: the rows and files this run added, and the data set if this run created it.
        Image.objects.filter(pk__in=created_ids).delete()
        for stored in written:
            default_storage.delete(stored)
        if dataset_created:
            dataset.delete()
        if isinstance(exc, DataError):
            raise ValidationError(str(exc)) from None
        raise
    return _dataset_after_import(dataset, source, added=len(created_ids), skipped=skipped, sizes=sizes)


def _read_source(kind: str, path: str | Path | None, limit: int | None, test_percent: int) -> DatasetSource:
    from explain.data.cub import read_cub
    from explain.data.idx import FASHION_MNIST_ROOT, fashion_mnist_source
    from explain.data.image_folder import read_image_folder

    if kind == Dataset.Kind.FASHION_MNIST:
        source = fashion_mnist_source(path or FASHION_MNIST_ROOT)
    elif path is None:
        raise ValidationError(f"A {kind} import needs the path of the data set's folder.")
    elif kind == Dataset.Kind.CUB_200_2011:
        source = read_cub(path)
    else:
        source = read_image_folder(path, test_percent=test_percent)
    if limit is not None:
        seen: Counter[tuple[str, int]] = Counter()
        kept = []
        for record in source.records:
            seen[(record.split, record.class_index)] += 1
            if seen[(record.split, record.class_index)] <= limit:
                kept.append(record)
        source.records, source.count = kept, len(kept)
    return source


@transaction.atomic
def _dataset_for_import(*, kind: str, name: str, source: DatasetSource) -> tuple[Dataset, bool]:
    """The data set to import into: a new one with its classes, or the same one imported before."""
    dataset = Dataset.objects.select_for_update().filter(name=name).first()
    if dataset is None:
        dataset = Dataset(
            name=name, kind=kind, root_path=str(source.root), attribute_names=source.attribute_names
        )
        dataset.full_clean()
        dataset.save()
        ClassLabel.objects.bulk_create(
            [ClassLabel(dataset=dataset, index=i, name=n) for i, n in enumerate(source.classes)]
        )
        return dataset, True
    if dataset.kind != kind:
        raise ValidationError(
            f"A data set named {name!r} already exists with kind {dataset.kind!r}, not {kind!r}; "
            "import under another name."
        )
    stored = list(dataset.classes.order_by("index").values_list("name", flat=True))
    if stored != source.classes:
        differ = [
            f"{i}: {a!r} vs {b!r}"
            for i, (a, b) in enumerate(zip(stored, source.classes, strict=False))
            if a != b
        ]
        raise ValidationError(
            f"Data set {name!r} was imported with {len(stored)} classes and {source.root} has "
            f"{len(source.classes)}; they differ ({'; '.join(differ[:3]) or 'in number'}). "
            "Import it under another name."
        )
    return dataset, False


def _dataset_after_import(
    dataset: Dataset,
    source: DatasetSource,
    *,
    added: int,
    skipped: list[dict[str, str]],
    sizes: set[tuple[int, int]],
) -> Dataset:
    report: dict[str, Any] = {
        "added": added,
        "source_images": source.count,
        "skipped": skipped,
        "at": timezone.now().isoformat(),
    }
    if skipped:
        reports = Path(settings.FOIL_DATA_ROOT) / "import-reports"
        reports.mkdir(parents=True, exist_ok=True)
        report_file = (
            reports / f"{slugify(dataset.name)}-{timezone.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}.json"
        )
        report_file.write_text(json.dumps(report, indent=2))
        report["report_file"] = str(report_file)
    fields = ["import_report", "summary"]
    if added:
        had_images = dataset.images.count() > added
        previous = {(dataset.image_width, dataset.image_height)} if had_images else set()
        all_sizes = sizes | previous
        width, height = next(iter(all_sizes)) if len(all_sizes) == 1 else (None, None)
        dataset.image_width, dataset.image_height = width, height
        fields += ["image_width", "image_height"]
    dataset.import_report = report
    dataset.summary = dataset_counts(dataset=dataset)
    dataset.save(update_fields=fields)
    return dataset


def _dataset_channels(dataset: Dataset) -> int:
    return 1 if dataset.kind == Dataset.Kind.FASHION_MNIST else 3


def _load_split(dataset: Dataset, split: str, limit_per_class: int | None = None) -> tuple[list[Image], list]:
    images = split_images(dataset=dataset, split=split, limit_per_class=limit_per_class)
    arrays = [image_array(image) for image in tqdm(images, desc=f"read {split} images", disable=None)]
    return images, arrays
