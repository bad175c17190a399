"""Training the generative backbones of a data set (and C3LT's maps of a class pair) as Backbone rows.

Each trainer reads the data set's training images, calls the pure trainer of ``explain.nets``, saves the
model under ``FOIL_DATA_ROOT/backbones/<kind>-<uuid>/`` (diffusers format, with ``training.json``) and records
a Backbone row whose provenance holds the data, the steps, the hyperparameters and the loss record. They are
the precompute plan's trainers (each declared as a ``Model`` in ``explain.methods.declaration``):

- per data set: ``autoencoder_train``, ``denoiser_train`` (needs the autoencoder), ``bridge_train``;
- per classifier: ``sae_train`` (reads the classifier's pooled features; ``classifier`` is a parameter and
  the row's ``config["classifier"]``);
- per (classifier, class pair): ``c3lt_maps_train`` (needs the autoencoder; C3LT's discriminator is trained
  and saved with the maps, under ``discriminator/``).

Every trainer holds a row lock on the data set while it looks for an existing model and trains, so two
workers never train the same model twice: the second finds the first's row and returns it. A model that
needs another one finds it, or trains it (with ``<kind>_params``), under the same lock.

Images are in [0, 1] (pixels / 255), at the data set's image size, one channel for Fashion-MNIST and three
otherwise; the generative methods see the classifier through its normalisation
(``explain.precompute.worker``), so the same backbones serve every classifier of the data set. Training runs
on the CPU (the pure trainers draw their noise from CPU generators); tqdm bars show progress in the worker's
terminal.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from PIL import Image as PILImage

from explain.models import Backbone, Classifier, ClassLabel, Dataset, Image
from explain.selectors import backbones_preferred
from explain.services import provenance
from explain.services.progress import Progress

# Training budgets sized so that the embedded default (Fashion-MNIST, 28 px) trains every generative
# backbone in a few minutes in total on a 2-core CPU; a plan's ``backbone_params`` overrides them per kind.
DEFAULTS: dict[str, dict[str, Any]] = {
    Backbone.Kind.AUTOENCODER: {"steps": 300, "batch_size": 32, "limit_per_class": 300},
    Backbone.Kind.DENOISER: {"steps": 300, "batch_size": 32, "limit_per_class": 300},
    Backbone.Kind.BRIDGE: {"steps": 300, "batch_size": 32, "limit_per_class": 300},
    Backbone.Kind.SAE: {"steps": 300, "batch_size": 128, "limit_per_class": 300},
    Backbone.Kind.C3LT_MAPS: {"steps": 200, "batch_size": 16, "limit_per_class": 300},
}
# Model widths (diffusers block_out_channels) per kind: small enough for a CPU, a parameter for a GPU.
DEFAULT_WIDTHS: dict[str, tuple[int, ...]] = {
    Backbone.Kind.AUTOENCODER: (32, 64),
    Backbone.Kind.DENOISER: (32, 64),
    Backbone.Kind.BRIDGE: (32, 64),
}


def image_channels(dataset: Dataset) -> int:
    return 1 if dataset.kind == Dataset.Kind.FASHION_MNIST else 3


def image_size(dataset: Dataset) -> int:
    """The side the backbones are trained at: the data set's (square) image size."""
    if dataset.image_width and dataset.image_width == dataset.image_height:
        return int(dataset.image_width)
    raise ValueError(
        f"data set {dataset.name!r} has images of {dataset.image_width} x {dataset.image_height} pixels; the "
        "generative backbones are trained on square images: set image_width = image_height on the data set "
        "(the size the classifier reads)"
    )


def train_images(
    dataset: Dataset,
    *,
    limit_per_class: int,
    labels: list[ClassLabel] | None = None,
    split: str = Image.Split.TRAIN,
    size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The data set's training images in [0, 1], (N, C, S, S), their class indices (N,), and a summary.

    At most ``limit_per_class`` images of each class (of ``labels``, or of every class), lowest ids first.
    ``size``: the side S (default: the data set's square image size).
    """
    if limit_per_class < 1:
        raise ValueError(f"limit_per_class is {limit_per_class}; give 1 or more images per class")
    size, grey = size or image_size(dataset), image_channels(dataset) == 1
    labels = labels if labels is not None else list(dataset.classes.order_by("index"))
    arrays, indices, per_class = [], [], {}
    for label in labels:
        rows = list(
            Image.objects.filter(dataset=dataset, class_label=label, split=split)
            .order_by("id")
            .values_list("file", flat=True)[:limit_per_class]
        )
        for name in rows:
            with default_storage.open(name, "rb") as fh:
                pil = PILImage.open(io.BytesIO(fh.read())).convert("L" if grey else "RGB")
            if pil.size != (size, size):
                pil = pil.resize((size, size), PILImage.Resampling.BILINEAR)
            arrays.append(np.asarray(pil, dtype=np.float32) / 255.0)
            indices.append(label.index)
        if rows:
            per_class[str(label.index)] = len(rows)
    if not arrays:
        raise ValueError(
            f"data set {dataset.name!r} has no {split} images of classes "
            f"{[label.index for label in labels]}; import its {split} split first"
        )
    x = torch.from_numpy(np.stack(arrays))
    x = x.unsqueeze(1) if grey else x.permute(0, 3, 1, 2).contiguous()
    summary = {
        "split": split,
        "images": len(arrays),
        "per_class": per_class,
        "limit_per_class": limit_per_class,
    }
    return x, torch.tensor(indices, dtype=torch.long), summary


def _out_dir(kind: str) -> Path:
    """An opaque, fresh directory for one model under FOIL_DATA_ROOT/backbones/."""
    path = Path(settings.FOIL_DATA_ROOT) / "backbones" / f"{kind}-{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    return path


def _save(
    *, dataset: Dataset, kind: str, out_dir: Path, config: dict, provenance: dict, what: str
) -> Backbone:
    backbone = Backbone(
        dataset=dataset,
        kind=kind,
        name=f"{what} of {dataset.name} ({out_dir.name})",
        path=str(out_dir),
        config=config,
        provenance=provenance,
    )
    backbone.full_clean()
    backbone.save()
    return backbone_quality(backbone=backbone)


# Held-out images per class a card is measured on when a backbone is trained (the test split).
CARD_IMAGES_PER_CLASS = 20


def backbone_quality(*, backbone: Backbone, classifier: Classifier | None = None) -> Backbone:
    """Measure the backbone's quality card (``explain.nets.quality``) on held-out test images of its data set
    and store it in ``provenance["quality"]``, with the classifier that judged it: the backbone's own
    (SAE, C3LT maps), else ``classifier``, else the data set's newest. The model is read in its format
    (``backbone_model``), so a trained and a registered backbone are judged by the same functions. Without a
    classifier or test images the card says why it is missing."""
    from explain.nets.quality import model_card
    from explain.precompute.worker import generative_classifier

    dataset = backbone.dataset
    own = backbone.config.get("classifier")
    classifier = (
        Classifier.objects.get(pk=own)
        if own
        else classifier or Classifier.objects.filter(dataset=dataset).order_by("-created_at", "-pk").first()
    )
    quality: dict[str, Any]
    if backbone.kind not in QUALITY_KINDS:
        return backbone
    if classifier is None:
        quality = {"missing": f"data set {dataset.name!r} has no classifier to judge the model with"}
    elif not Image.objects.filter(dataset=dataset, split=Image.Split.TEST).exists():
        quality = {"missing": f"data set {dataset.name!r} has no test images to measure the model on"}
    else:
        # A registered model is judged at the classifier's input size, as its registration check ran it and
        # the methods see images; a trained one at the data set's size, which it was trained at.
        size = classifier.input_size if backbone.config.get("registered") else None
        autoencoder = backbone.config.get("autoencoder")
        try:
            x_test, y_test, _ = train_images(
                dataset, limit_per_class=CARD_IMAGES_PER_CLASS, split=Image.Split.TEST, size=size
            )
            x_train, y_train, _ = train_images(dataset, limit_per_class=CARD_IMAGES_PER_CLASS, size=size)
            card = model_card(
                backbone.kind,
                backbone_model(backbone),
                classifier=generative_classifier(classifier, device=torch.device("cpu")),
                x_test=x_test,
                y_test=y_test,
                x_train=x_train,
                y_train=y_train,
                autoencoder=backbone_model(Backbone.objects.get(pk=autoencoder)) if autoencoder else None,
            )
            quality = {**card, "classifier": classifier.pk, "classifier_name": classifier.name}
        except ValueError as exc:  # e.g. no held-out images of a C3LT pair's class (FormatError is one)
            quality = {"missing": str(exc)}
    backbone.provenance = {**backbone.provenance, "quality": quality}
    backbone.save(update_fields=["provenance"])
    return backbone


QUALITY_KINDS = frozenset(
    {
        Backbone.Kind.AUTOENCODER,
        Backbone.Kind.DENOISER,
        Backbone.Kind.BRIDGE,
        Backbone.Kind.SAE,
        Backbone.Kind.C3LT_MAPS,
    }
)


def _lock(dataset: Dataset) -> Dataset:
    """Lock the data set's row until the surrounding transaction ends (one trainer at a time per data set)."""
    return Dataset.objects.select_for_update().get(pk=dataset.pk)


def _params(kind: str, **given: int | None) -> dict[str, Any]:
    """The kind's default budget with the given (not None) steps, batch_size and limit_per_class, checked."""
    params = {**DEFAULTS[kind], **{k: v for k, v in given.items() if v is not None}}
    for name in ("steps", "batch_size", "limit_per_class"):
        if not isinstance(params[name], int) or params[name] < 1:
            raise ValueError(
                f"backbone_params[{kind!r}][{name!r}] is {params[name]!r}; give a whole number >= 1"
            )
    return params


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def backbone_model(backbone: Backbone) -> Any:
    """A Backbone row's model on the CPU in float32, read in its format (a registered model's, or the
    platform's own; ``explain.nets.formats``)."""
    from explain.nets.formats import DEFAULT_FORMATS, backbone_load

    name = backbone.config.get("format") or DEFAULT_FORMATS[backbone.kind]
    return backbone_load(name, backbone.path, backbone.config.get("options"))


def existing(dataset: Dataset, kind: str, **config: Any) -> Backbone | None:
    """The model of ``kind`` of the data set whose config matches ``config`` (e.g. classifier=3): a
    registered one first, else the newest (``explain.selectors.backbones_preferred``)."""
    rows = Backbone.objects.filter(
        dataset=dataset, kind=kind, **{f"config__{k}": v for k, v in config.items()}
    )
    return backbones_preferred(rows).first()


# What a trainer's body returns: the row's config, the data it trained on, and the parameters it used.
Trained = tuple[dict[str, Any], dict[str, Any], dict[str, Any]]


def _find_or_train(
    dataset: Dataset,
    kind: str,
    *,
    what: str,
    train: Callable[[Dataset, Path], Trained],
    match: dict[str, Any] | None = None,
) -> Backbone:
    """The scaffold every trainer shares. Under a row lock on the data set (one trainer at a time), return
    the newest model of ``kind`` whose config matches ``match``; else run ``train(dataset, out_dir)`` in a
    fresh directory and save the model as a row with the one provenance record
    (``explain.services.provenance.trained``; the pure trainer's ``training.json`` gives the losses) and its
    quality card."""
    from explain.nets.training_record import read_record

    with transaction.atomic():
        dataset = _lock(dataset)
        found = existing(dataset, kind, **(match or {}))
        if found is not None:
            return found
        out = _out_dir(kind)
        start = time.perf_counter()
        config, data, params = train(dataset, out)
        seconds = time.perf_counter() - start
        record = read_record(out)
        losses = record.pop("loss_every_step", []) or []
        if "data" in record:
            data = {**data, "tensor": record.pop("data")}
        record_of = provenance.trained(
            data=data, params=params, seconds=seconds, losses=losses, loss_unit="step", training=record
        )
        return _save(dataset=dataset, kind=kind, out_dir=out, config=config, provenance=record_of, what=what)


# ----------------------------------------------------------------------------------------------------
# Per data set


def autoencoder_train(
    *,
    dataset: Dataset,
    steps: int | None = None,
    batch_size: int | None = None,
    limit_per_class: int | None = None,
    block_out_channels: list[int] | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
) -> Backbone:
    """The data set's AutoencoderKL (found, or trained on its training images and recorded)."""
    from explain.nets.autoencoder import autoencoder_config, train_autoencoder

    kind = Backbone.Kind.AUTOENCODER
    p = _params(kind, steps=steps, batch_size=batch_size, limit_per_class=limit_per_class)
    widths = tuple(block_out_channels or DEFAULT_WIDTHS[kind])

    def train(dataset: Dataset, out: Path) -> Trained:
        images, _, data = train_images(dataset, limit_per_class=p["limit_per_class"])
        cfg = autoencoder_config(
            in_channels=images.shape[1],
            block_out_channels=widths,
            sample_size=images.shape[-1],
            norm_num_groups=min(16, widths[0]),
        )
        train_autoencoder(
            images, out, p["steps"], batch_size=p["batch_size"], lr=lr, config=cfg,
            generator=_generator(seed), data_note=f"data set {dataset.pk} training split", progress=progress,
        )  # fmt: skip
        config = {"architecture": "AutoencoderKL", "size": images.shape[-1], "in_channels": images.shape[1]}
        return config, data, {**p, "block_out_channels": list(widths), "lr": lr, "seed": seed}

    return _find_or_train(dataset, kind, what="autoencoder", train=train)


def denoiser_train(
    *,
    dataset: Dataset,
    steps: int | None = None,
    batch_size: int | None = None,
    limit_per_class: int | None = None,
    block_out_channels: list[int] | None = None,
    lr: float = 3e-4,
    seed: int = 0,
    autoencoder_params: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> Backbone:
    """The class-conditional latent denoiser for LDCE-cls, in the space of the data set's autoencoder."""
    from explain.nets.autoencoder import encode
    from explain.nets.diffusion import denoiser_config, train_denoiser

    kind = Backbone.Kind.DENOISER
    p = _params(kind, steps=steps, batch_size=batch_size, limit_per_class=limit_per_class)
    widths = tuple(block_out_channels or DEFAULT_WIDTHS[kind])

    def train(dataset: Dataset, out: Path) -> Trained:
        autoencoder = autoencoder_train(dataset=dataset, **(autoencoder_params or {}))
        vae = backbone_model(autoencoder)  # a registered one in its own format and range
        images, labels, data = train_images(dataset, limit_per_class=p["limit_per_class"])
        with torch.no_grad():
            latents = torch.cat([encode(vae, chunk) for chunk in images.split(256)])
        num_classes = dataset.classes.count()
        cfg = denoiser_config(
            num_classes,
            latents.shape[1],
            latents.shape[-1],
            block_out_channels=widths,
            norm_num_groups=min(32, widths[0]),
        )
        train_denoiser(
            latents, labels, out, p["steps"], num_classes=num_classes, batch_size=p["batch_size"], lr=lr,
            config=cfg, generator=_generator(seed), data_note=f"latents of autoencoder {autoencoder.pk}",
            progress=progress,
        )  # fmt: skip
        config = {"architecture": "UNet2DModel", "autoencoder": autoencoder.pk, "num_classes": num_classes}
        return config, data, {**p, "block_out_channels": list(widths), "lr": lr, "seed": seed}

    return _find_or_train(dataset, kind, what="latent denoiser", train=train)


def bridge_train(
    *,
    dataset: Dataset,
    steps: int | None = None,
    batch_size: int | None = None,
    limit_per_class: int | None = None,
    block_out_channels: list[int] | None = None,
    lr: float = 3e-4,
    seed: int = 0,
    progress: Progress | None = None,
) -> Backbone:
    """The inpainting bridge for RCSB, trained on the data set's images with random region masks."""
    from explain.nets.bridge import bridge_config, train_bridge

    kind = Backbone.Kind.BRIDGE
    p = _params(kind, steps=steps, batch_size=batch_size, limit_per_class=limit_per_class)
    widths = tuple(block_out_channels or DEFAULT_WIDTHS[kind])

    def train(dataset: Dataset, out: Path) -> Trained:
        images, _, data = train_images(dataset, limit_per_class=p["limit_per_class"])
        cfg = bridge_config(images.shape[1], images.shape[-1], widths, norm_num_groups=min(16, widths[0]))
        train_bridge(
            images, out, p["steps"], batch_size=p["batch_size"], lr=lr, config=cfg,
            generator=_generator(seed), data_note=f"data set {dataset.pk} training split", progress=progress,
        )  # fmt: skip
        config = {"architecture": "UNet2DModel", "size": images.shape[-1]}
        return config, data, {**p, "block_out_channels": list(widths), "lr": lr, "seed": seed}

    return _find_or_train(dataset, kind, what="inpainting bridge", train=train)


# ----------------------------------------------------------------------------------------------------
# Per classifier, per class pair


def sae_train(
    *,
    dataset: Dataset,
    classifier: int,
    steps: int | None = None,
    batch_size: int | None = None,
    limit_per_class: int | None = None,
    expansion: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
) -> Backbone:
    """The sparse autoencoder on the pooled features of classifier ``classifier`` (an id) for SLC."""
    from explain.nets.sae import pooled_features, train_sae
    from explain.precompute.worker import generative_classifier

    kind = Backbone.Kind.SAE
    p = _params(kind, steps=steps, batch_size=batch_size, limit_per_class=limit_per_class)

    def train(dataset: Dataset, out: Path) -> Trained:
        model = Classifier.objects.select_related("dataset").get(pk=classifier)
        if model.dataset_id != dataset.pk:
            raise ValueError(
                f"classifier {model.name!r} belongs to data set {model.dataset.name!r}, not "
                f"{dataset.name!r}; train the SAE on the classifier's own data set"
            )
        split = generative_classifier(model, device=torch.device("cpu"))
        images, _, data = train_images(dataset, limit_per_class=p["limit_per_class"])
        with torch.no_grad():
            features = torch.cat([pooled_features(split.f, chunk) for chunk in images.split(256)])
        train_sae(
            features, out, p["steps"], expansion=expansion, batch_size=p["batch_size"], lr=lr,
            generator=_generator(seed), data_note=f"pooled features of classifier {classifier}",
            progress=progress,
        )  # fmt: skip
        config = {"architecture": "SparseAutoencoder", "classifier": classifier, "d_in": features.shape[1]}
        return config, data, {**p, "expansion": expansion, "lr": lr, "seed": seed}

    return _find_or_train(
        dataset, kind, what="sparse autoencoder", train=train, match={"classifier": classifier}
    )


def c3lt_maps_train(
    *,
    classifier: Classifier,
    class_a: ClassLabel,
    class_b: ClassLabel,
    steps: int | None = None,
    batch_size: int | None = None,
    limit_per_class: int | None = None,
    lr: float = 1e-3,
    width: int | None = None,
    seed: int = 0,
    autoencoder_params: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> Backbone:
    """C3LT's maps g (A -> B) and h (B -> A) and its discriminator for one classifier and class pair.

    The row's config holds ``classifier``, ``class_a`` and ``class_b`` (ids) and ``autoencoder``.
    """
    from explain.nets.c3lt_maps import train_c3lt_maps
    from explain.precompute.worker import generative_classifier

    kind = Backbone.Kind.C3LT_MAPS
    p = _params(kind, steps=steps, batch_size=batch_size, limit_per_class=limit_per_class)
    ids = {"classifier": classifier.pk, "class_a": class_a.pk, "class_b": class_b.pk}

    def train(dataset: Dataset, out: Path) -> Trained:
        autoencoder = autoencoder_train(dataset=dataset, **(autoencoder_params or {}))
        vae = backbone_model(autoencoder)  # a registered one in its own format and range
        split = generative_classifier(classifier, device=torch.device("cpu"))
        images_a, _, data_a = train_images(dataset, limit_per_class=p["limit_per_class"], labels=[class_a])
        images_b, _, data_b = train_images(dataset, limit_per_class=p["limit_per_class"], labels=[class_b])
        train_c3lt_maps(
            vae, split, images_a, images_b, class_a.index, class_b.index, out, p["steps"],
            batch_size=p["batch_size"], lr=lr, width=width, generator=_generator(seed),
            data_note=f"classes {class_a.index} and {class_b.index} of data set {dataset.pk}",
            progress=progress,
        )  # fmt: skip
        data = {"images": data_a["images"] + data_b["images"], "a": data_a, "b": data_b}
        config = {"architecture": "C3LT latent maps", **ids, "autoencoder": autoencoder.pk}
        return config, data, {**p, "lr": lr, "width": width, "seed": seed}

    return _find_or_train(
        classifier.dataset,
        kind,
        what=f"C3LT maps {class_a.index}<->{class_b.index}",
        train=train,
        match=ids,
    )
