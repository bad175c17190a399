"""Registering the shipped models of the embedded default as the Fashion-MNIST data set's classifier and
backbones (Django; the rest of ``explain.shipped`` is Django-free).

Each row's provenance (``explain.services.provenance.shipped``) holds the model's manifest entry (files and
sha256, command, seed, data, steps, final loss) and its ``quality`` card, measured when the model was trained.
The C3LT maps of a class pair are registered in both directions (the maps hold g and h), so a study's pair
finds them whichever way it runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.db import transaction

from explain.models import Backbone, Classifier, Dataset
from explain.services import provenance
from explain.shipped.manifest import SHIPPED_ROOT, manifest_verify


def _backbone(
    *, dataset: Dataset, kind: str, name: str, path: Path, config: dict, entry: dict[str, Any]
) -> Backbone:
    found = Backbone.objects.filter(name=name).first()
    if found is not None:
        record = provenance.shipped(entry)
        stale = any(found.provenance.get(key) != record.get(key) for key in ("manifest", "quality"))
        if stale or found.path != str(path):
            # the shipped files were retrained since this row was registered: take their manifest entry and
            # card, or the planner would judge the new weights by the old card
            found.provenance, found.path = record, str(path)
            found.save(update_fields=["provenance", "path"])
        return found
    backbone = Backbone(
        dataset=dataset,
        kind=kind,
        name=name,
        path=str(path),
        config=config,
        provenance=provenance.shipped(entry),
    )
    backbone.full_clean()
    backbone.save()
    return backbone


def _bridge(*, dataset: Dataset, root: Path, suffix: str, entry: dict[str, Any]) -> Backbone:
    return _backbone(
        dataset=dataset, kind=Backbone.Kind.BRIDGE, name=f"inpainting bridge ({suffix})",
        path=root / "bridge", config={"architecture": "UNet2DModel", "size": 28}, entry=entry,
    )  # fmt: skip


@transaction.atomic
def shipped_bridge_register(
    *,
    dataset: Dataset,
    root: Path = SHIPPED_ROOT,
    label: str = "shipped",
    say: Callable[[str], None] | None = None,
) -> Backbone:
    """Check the shipped files against the manifest, then register (once) the shipped inpainting bridge alone
    for ``dataset``, named with ``label``. The bridge depends on no classifier (it inpaints images), so a
    study whose classifier the platform trains can run RCSB on it: the tiny demo does, because RCSB's
    released guidance acts through the bridge's prediction x0_hat, which a bridge trained for seconds does
    not carry (on one, Sandal -> Sneaker never passed p 0.26 at any s, steps or area)."""
    manifest = manifest_verify(root)
    bridge = _bridge(
        dataset=dataset, root=root, suffix=f"{dataset.name}, {label}", entry=manifest["models"]["bridge"]
    )
    if say is not None:
        _say_card(bridge, say)
    return bridge


def _say_card(backbone: Backbone, say: Callable[[str], None]) -> None:
    """One line: the backbone's name and its quality card's summary."""
    from explain.nets.quality import card_summary

    card = backbone.provenance.get("quality")
    say(f"   {backbone.name}: {card_summary(card) if card else 'no card'}")


@transaction.atomic
def shipped_models_register(
    *, dataset: Dataset, root: Path = SHIPPED_ROOT, label: str = "shipped"
) -> Classifier:
    """Check the shipped files against the manifest, then register (once) the classifier and every backbone
    for ``dataset``, named with ``label``; returns the classifier, evaluated on the data set's images. A
    backbone registered before the shipped files changed takes the manifest's new entry and card."""
    from explain.services.classifiers import classifier_evaluate, classifier_register

    manifest = manifest_verify(root)
    models = manifest["models"]
    suffix = f"{dataset.name}, {label}"
    name = f"{dataset.name} built-in CNN ({label})"
    classifier = Classifier.objects.filter(name=name, dataset=dataset).first()
    if classifier is None:
        config = json.loads((root / "classifier" / "config.json").read_text())
        classifier = classifier_register(
            dataset=dataset,
            name=name,
            architecture=config["architecture"],
            checkpoint_path=root / "classifier" / "model.pt",
            normalisation=config["normalisation"],
            options=config["options"],
            input_size=28,
        )
        classifier.provenance = provenance.shipped(models["classifier"])
        classifier.save(update_fields=["provenance"])
    if not classifier.confusion_matrix:
        classifier = classifier_evaluate(classifier=classifier)
    autoencoder = _backbone(
        dataset=dataset, kind=Backbone.Kind.AUTOENCODER, name=f"autoencoder ({suffix})",
        path=root / "autoencoder", config={"architecture": "AutoencoderKL", "size": 28, "in_channels": 1},
        entry=models["autoencoder"],
    )  # fmt: skip
    _backbone(
        dataset=dataset, kind=Backbone.Kind.DENOISER, name=f"latent denoiser ({suffix})",
        path=root / "denoiser",
        config={"architecture": "UNet2DModel", "autoencoder": autoencoder.pk, "num_classes": 10},
        entry=models["denoiser"],
    )  # fmt: skip
    _bridge(dataset=dataset, root=root, suffix=suffix, entry=models["bridge"])
    auxiliary = json.loads((root / "auxiliary" / "config.json").read_text())
    _backbone(
        dataset=dataset, kind=Backbone.Kind.AUXILIARY, name=f"SimSiam ({suffix})",
        path=root / "auxiliary" / "model.pt", config=auxiliary, entry=models["auxiliary"],
    )  # fmt: skip
    if "sae" in models:
        d_in = json.loads((root / "sae" / "config.json").read_text())["d_in"]
        _backbone(
            dataset=dataset, kind=Backbone.Kind.SAE, name=f"sparse autoencoder ({suffix})", path=root / "sae",
            config={"architecture": "SparseAutoencoder", "classifier": classifier.pk, "d_in": d_in},
            entry=models["sae"],
        )  # fmt: skip
    labels = {c.index: c for c in dataset.classes.all()}
    for folder, entry in models.items():
        if entry["kind"] != "c3lt_maps":
            continue
        a, b = entry["arguments"]["pair"]
        for first, second in ((a, b), (b, a)):
            _backbone(
                dataset=dataset, kind=Backbone.Kind.C3LT_MAPS, name=f"C3LT maps {first}->{second} ({suffix})",
                path=root / folder,
                config={
                    "architecture": "C3LT latent maps", "classifier": classifier.pk,
                    "class_a": labels[first].pk, "class_b": labels[second].pk, "autoencoder": autoencoder.pk,
                },
                entry=entry,
            )  # fmt: skip
    return classifier


def shipped_models_prepare(*, dataset: Dataset, retrain: bool, say: Callable[[str], None]) -> Classifier:
    """The shipped classifier and backbones, registered for ``dataset`` after their checksums are verified and
    their quality cards said; with ``retrain``, the same models retrained from scratch with their manifest's
    commands and seeds into FOIL_DATA_ROOT/shipped-retrained/ instead (``FOIL_DEMO_TRAIN=1``)."""
    from django.conf import settings

    from explain.shipped.manifest import manifest_retrain

    root, label = SHIPPED_ROOT, "shipped"
    if retrain:
        root, label = Path(settings.FOIL_DATA_ROOT) / "shipped-retrained", "retrained"
        manifest_retrain(root, say=say)
    classifier = shipped_models_register(dataset=dataset, root=root, label=label)
    for backbone in Backbone.objects.filter(name__endswith=f"({dataset.name}, {label})").order_by(
        "kind", "name"
    ):
        _say_card(backbone, say)
    return classifier
