"""Registering a researcher's generative backbone from local files (the admin's form and ``manage.py
register_backbone`` both call ``backbone_register``).

The model is loaded in its format (``explain.nets.formats``), run once on a few of the data set's images at
the classifier's input size, and checked against the data set and classifier: channels, value range, latent
shape, class count. What the check found goes in the row's config, with ``"registered": true``, the format
and its options; its provenance is ``explain.services.provenance.registered`` (the path and what was
found) with the files, the classifier it was checked against and the time it took. Its quality card is then
measured as a trained backbone's is (``explain.services.backbones.backbone_quality``: the same functions, on
the data set's held-out test images; "missing" with the reason where the data set has none) and stored in
``provenance["quality"]``, so the planner's gate (``explain.quality_gate``) judges it. A registered model is
used instead of one the platform would train (``explain.selectors.backbones_preferred``). A model that
cannot serve is refused with a message naming the problem and the fix.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from explain.models import Backbone, Classifier, ClassLabel, Dataset, Image
from explain.selectors import backbones_preferred

# Images of the data set (one per class, from the first classes) each check runs the model on.
PROBE_IMAGES = 4
# Options the service reads itself rather than the format's loader.
AUTOENCODER_OPTION = "autoencoder"
LATENT_KINDS = frozenset({Backbone.Kind.DENOISER, Backbone.Kind.C3LT_MAPS})


def backbone_formats() -> list[dict[str, Any]]:
    """The formats a model can be registered in: name, kind, what the path holds, options (no torch)."""
    from explain.nets.formats import FORMATS

    return [
        {"name": f.name, "kind": f.kind, "layout": f.layout, "options": list(f.options)}
        for f in FORMATS.values()
    ]


def registrable_kinds() -> dict[str, list[str]]:
    """Backbone kind -> the formats a model of that kind can be registered in."""
    from explain.nets.formats import FORMATS

    kinds: dict[str, list[str]] = {}
    for fmt in FORMATS.values():
        kinds.setdefault(fmt.kind, []).append(fmt.name)
    return kinds


def _classifier(dataset: Dataset, classifier: Classifier | None) -> Classifier:
    if classifier is None:
        classifier = Classifier.objects.filter(dataset=dataset).order_by("-created_at", "-pk").first()
        if classifier is None:
            raise ValidationError(
                f"Data set {dataset.name!r} has no classifier to check the model against; register one first "
                "(manage.py register_classifier)."
            )
    if classifier.dataset_id != dataset.pk:
        raise ValidationError(
            f"Classifier {classifier.name!r} belongs to data set {classifier.dataset.name!r}, not "
            f"{dataset.name!r}; name a classifier of {dataset.name!r}."
        )
    return classifier


def _autoencoder(dataset: Dataset, name: str | None) -> Backbone | None:
    rows = Backbone.objects.filter(dataset=dataset, kind=Backbone.Kind.AUTOENCODER)
    if name:
        found = rows.filter(name=name).first()
        if found is None:
            known = ", ".join(repr(n) for n in rows.values_list("name", flat=True)) or "none yet"
            raise ValidationError(
                f"Data set {dataset.name!r} has no autoencoder named {name!r} (it has: {known}); register "
                "the autoencoder the model was trained with first."
            )
        return found
    return backbones_preferred(rows).first()


def _probe_images(dataset: Dataset, classifier: Classifier) -> tuple[Any, Any, list[Image]]:
    """(N, C, S, S) images in [0, 1] at the classifier's input size, as the generative methods see them."""
    import numpy as np
    import torch

    from explain.precompute.worker import image_array

    images = []
    for label in ClassLabel.objects.filter(dataset=dataset).order_by("index"):
        image = (
            Image.objects.filter(dataset=dataset, class_label=label)
            .order_by("split", "id")  # "test" before "train": held-out images first
            .first()
        )
        if image is not None:
            images.append(image)
        if len(images) == PROBE_IMAGES:
            break
    if not images:
        raise ValidationError(
            f"Data set {dataset.name!r} has no images to check the model on; import it first."
        )
    arrays = [image_array(image, classifier).astype(np.float32) / 255.0 for image in images]
    x = torch.from_numpy(np.stack(arrays))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([image.class_label.index for image in images])
    return x, labels, images


def backbone_register(
    *,
    dataset: Dataset,
    kind: str,
    path: str | Path,
    format_name: str,
    name: str,
    classifier: Classifier | None = None,
    options: dict[str, Any] | None = None,
) -> Backbone:
    """Check the model of ``kind`` at the local ``path`` (a directory or file in format ``format_name``)
    against ``dataset`` and ``classifier`` (default: the data set's newest) and record it as Backbone
    ``name``. ``options``: the format's options (e.g. ``{"image_range": "-1,1"}``) and, for a model that
    works in an autoencoder's latent space (denoiser, C3LT maps), ``autoencoder``: the name of a Backbone row
    of the data set (default: the one the planner would use). Refused with ``ValidationError`` naming the
    problem and the fix."""
    import torch

    from explain.nets.formats import FormatError, backbone_check, backbone_load, format_named
    from explain.nets.formats.checks import Probe, check_files
    from explain.precompute.worker import generative_classifier
    from explain.services import provenance
    from explain.services.backbones import backbone_model, backbone_quality

    kinds = registrable_kinds()
    if kind not in kinds:
        raise ValidationError(
            f"No format registers {kind!r} models; registrable kinds: "
            + "; ".join(f"{k} ({', '.join(v)})" for k, v in sorted(kinds.items()))
            + "."
        )
    if Backbone.objects.filter(name=name).exists():
        raise ValidationError(f"A backbone named {name!r} already exists; choose another name.")
    classifier = _classifier(dataset, classifier)
    options = {str(k): v for k, v in (options or {}).items()}
    autoencoder_name = options.pop(AUTOENCODER_OPTION, None)
    root = Path(path).expanduser().resolve()
    start = time.perf_counter()
    try:
        fmt = format_named(format_name, kind)
        unknown = sorted(set(options) - set(fmt.options))
        if unknown:
            raise FormatError(
                f"format {fmt.name} takes no option {', '.join(unknown)}",
                f"its options: {', '.join(fmt.options) or 'none'}",
            )
        autoencoder = _autoencoder(dataset, autoencoder_name) if kind in LATENT_KINDS else None
        x, labels, images = _probe_images(dataset, classifier)
        probe = Probe(
            images=x,
            labels=labels,
            class_names=list(dataset.classes.order_by("index").values_list("name", flat=True)),
            classifier=generative_classifier(classifier, device=torch.device("cpu")),
            autoencoder=backbone_model(autoencoder) if autoencoder is not None else None,
            autoencoder_name=autoencoder.name if autoencoder is not None else "",
            options=options,
        )
        model = backbone_load(fmt.name, root, options)
        found = backbone_check(fmt.name, model, probe)
        files = check_files(root)
    except FormatError as exc:
        raise ValidationError(f"Cannot register {name!r} ({kind}, {format_name}): {exc}") from None
    config: dict[str, Any] = {
        **found,
        "registered": True,
        "format": fmt.name,
        "options": options,
    }
    if autoencoder is not None:
        config["autoencoder"] = autoencoder.pk
    if kind == Backbone.Kind.SAE:
        config["classifier"] = classifier.pk  # an SAE serves the classifier whose features it reads
    if kind == Backbone.Kind.C3LT_MAPS:
        ids = dict(ClassLabel.objects.filter(dataset=dataset).values_list("index", "pk"))
        config |= {
            "classifier": classifier.pk,
            "class_a": ids[found["class_pair"][0]],
            "class_b": ids[found["class_pair"][1]],
        }
    backbone = Backbone(
        dataset=dataset,
        kind=kind,
        name=name,
        path=str(root),
        config=config,
        provenance={
            **provenance.registered(root, **found),
            "files": dict(list(files.items())[:200]),
            "bytes": sum(files.values()),
            "checked_with": {
                "classifier": classifier.pk,
                "classifier_name": classifier.name,
                "images": [image.pk for image in images],
                "size": int(x.shape[-1]),
                "device": "cpu",
                "dtype": "float32",
            },
            "seconds": round(time.perf_counter() - start, 2),
        },
    )
    backbone.full_clean()
    with transaction.atomic():  # a card that cannot be measured leaves no row
        backbone.save()
        return backbone_quality(backbone=backbone, classifier=classifier)
