"""The auxiliary embedding u(.) of a data set: SimSiam trained here, or a registered ResNet-50."""

import time
from pathlib import Path

from django.core.exceptions import ValidationError

from explain.models import Backbone, Dataset, Image
from explain.selectors import auxiliary_model, image_array
from explain.services import provenance
from explain.services.classifiers import _checkpoint_path
from explain.services.datasets import _dataset_channels, _load_split
from explain.services.progress import Progress

# --- Auxiliary models

_PART_CHECK_IMAGES = 300


def auxiliary_train(
    *,
    dataset: Dataset,
    name: str | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    width: int = 32,
    dim: int = 64,
    limit: int | None = None,
    progress: Progress | None = None,
) -> Backbone:
    """Train the small SimSiam model on the data set's training images (28 px, cells on a 7 x 7 grid) and
    register it as the data set's auxiliary embedding; the part-clustering check is stored where keypoints
    exist. Deterministic given ``seed``."""
    import torch

    from explain.nets.auxiliary import SimSiamNet, train_simsiam
    from explain.nets.classifiers import to_input

    name = name or f"{dataset.name} SimSiam"
    if Backbone.objects.filter(name=name).exists():
        raise ValidationError(f"A model named {name!r} already exists; choose another name.")
    images, arrays = _load_split(dataset, "train", limit)
    if len(images) < batch_size:
        raise ValidationError(
            f"Data set {dataset.name!r} has {len(images)} training images (limit {limit}); SimSiam needs "
            f"at least one full batch of {batch_size}. Import more images or lower batch_size."
        )
    in_channels = _dataset_channels(dataset)
    normalisation = {"mean": [0.5] * in_channels, "std": [0.5] * in_channels}
    x = to_input(arrays, in_channels=in_channels, normalisation=normalisation, input_size=28)
    torch.manual_seed(seed)
    model = SimSiamNet(in_channels=in_channels, width=width, dim=dim)
    started = time.perf_counter()
    curve = train_simsiam(
        model,
        x,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        generator=torch.Generator().manual_seed(seed),
        progress=progress,
    )
    seconds = time.perf_counter() - started
    path = _checkpoint_path("auxiliary", name)
    torch.save(model.state_dict(), path)
    config = {
        "architecture": "simsiam",
        "net": model.config(),
        "input_size": 28,
        "normalisation": normalisation,
    }
    record = provenance.trained(
        data={"dataset": dataset.name, "split": "train", "images": len(images), "limit": limit},
        params={
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "width": width, "dim": dim,
        },
        seconds=seconds, losses=curve["batch_loss"], loss_unit="logged batch", epoch_losses=curve["loss"],
    )  # fmt: skip
    backbone = Backbone(
        dataset=dataset, kind=Backbone.Kind.AUXILIARY, name=name, path=str(path), config=config,
        provenance=record,
    )  # fmt: skip
    try:
        backbone.full_clean()
        backbone.save()
    except Exception:
        path.unlink(missing_ok=True)
        raise
    return auxiliary_check(backbone=backbone, model=model)


def auxiliary_register(*, dataset: Dataset, name: str, path: str | Path) -> Backbone:
    """Register a local ResNet-50 state_dict (e.g. SwAV, DeepCluster) as the data set's auxiliary embedding,
    with cells from ``layer4`` (7 x 7 at 224 px); the part-clustering check is stored where keypoints
    exist."""
    from explain.nets.auxiliary import load_resnet50_auxiliary
    from explain.nets.classifiers import IMAGENET_NORMALISATION, CheckpointError

    path = Path(path).expanduser().resolve()
    try:
        model = load_resnet50_auxiliary(path)
    except CheckpointError as exc:
        raise ValidationError(str(exc)) from None
    backbone = Backbone(
        dataset=dataset,
        kind=Backbone.Kind.AUXILIARY,
        name=name,
        path=str(path),
        config={"architecture": "resnet50", "input_size": 224, "normalisation": IMAGENET_NORMALISATION},
        provenance=provenance.registered(path, architecture="resnet50"),
    )
    backbone.full_clean()
    backbone.save()
    return auxiliary_check(backbone=backbone, model=model)


def auxiliary_check(*, backbone: Backbone, model=None, max_images: int = _PART_CHECK_IMAGES) -> Backbone:
    """The paper's part-clustering accuracy of an auxiliary model on test images with keypoints, stored in its
    provenance (``part_clustering``); left out when the data set has no keypoints."""
    from explain.nets.auxiliary import embed_cells, part_clustering_accuracy
    from explain.nets.classifiers import to_input

    images = list(
        Image.objects.filter(dataset=backbone.dataset, split=Image.Split.TEST, keypoints__isnull=False)
        .exclude(keypoints={})
        .order_by("pk")[:max_images]
    )
    if not images:
        return backbone
    model = model or auxiliary_model(backbone)
    in_channels = (
        3 if backbone.config.get("architecture") == "resnet50" else backbone.config["net"]["in_channels"]
    )
    arrays = [image_array(image) for image in images]
    x = to_input(
        arrays,
        in_channels=in_channels,
        normalisation=backbone.config["normalisation"],
        input_size=backbone.config["input_size"],
    )
    result = part_clustering_accuracy(
        embed_cells(model, x), [image.keypoints for image in images], [a.shape[:2] for a in arrays]
    )
    backbone.provenance = {**backbone.provenance, "part_clustering": {**result, "images": len(images)}}
    backbone.save(update_fields=["provenance"])
    return backbone
