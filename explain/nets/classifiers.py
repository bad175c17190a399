"""Classifiers a study explains: build, load from a local checkpoint, split into features f and decision g.

Architectures (random initialisation; pretrained weights are never downloaded):

- ``small_cnn``: the built-in CNN for small images (``explain.nets.small_cnn``), f = a 7 x 7 grid at 28 px.
- ``vgg16``, ``vgg16_bn``: split after the last max-pool (512 x 7 x 7 at 224 px); g = pooling, flatten and
  the fully connected layers (Goyal et al. 2019; Vandenhende et al. 2022).
- ``resnet50``: split after ``layer4[0]`` (2048 x 7 x 7 at 224 px); g = the rest of ``layer4``, pooling, fc
  (Vandenhende et al. 2022).
- ``resnet18``, and any network ending in global average pooling plus a linear layer: split after the last
  convolutional stage, g = pooling + flatten + linear.

Checkpoints are local files in one of three forms: a plain ``state_dict``; a Lightning-style dict with a
``state_dict`` key whose keys carry a prefix (``model.``); or a TorchScript archive. All are loaded with
``map_location="cpu"`` and (for pickles) ``weights_only=True``; a mismatch raises ``CheckpointError`` naming
the missing and unexpected keys or the shapes that differ.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision import models as tv

from explain.nets.split import SplitClassifier

from .small_cnn import SmallCNN

ARCHITECTURES: tuple[str, ...] = ("small_cnn", "vgg16", "vgg16_bn", "resnet18", "resnet50")

# Where f ends, as a module path, and the input side the papers' 7 x 7 grid needs.
SPLIT_POINTS: dict[str, str] = {
    "small_cnn": "features",
    "vgg16": "features",
    "vgg16_bn": "features",
    "resnet18": "layer4",
    "resnet50": "layer4.0",
}
INPUT_SIZES: dict[str, int] = {
    "small_cnn": 28,
    "vgg16": 224,
    "vgg16_bn": 224,
    "resnet18": 224,
    "resnet50": 224,
}
IMAGENET_NORMALISATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
GREY_NORMALISATION = {"mean": [0.5], "std": [0.5]}

_MAX_LISTED = 8


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose weights do not fit the architecture."""


def build_classifier(architecture: str, num_classes: int, in_channels: int = 3, **options: Any) -> nn.Module:
    """A randomly initialised classifier; ``options`` go to the constructor (small_cnn: width, dropout)."""
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got num_classes={num_classes}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grey) or 3 (RGB), got {in_channels}")
    if architecture == "small_cnn":
        return SmallCNN(num_classes=num_classes, in_channels=in_channels, **options)
    if options:
        raise ValueError(f"architecture {architecture!r} takes no options, got {sorted(options)}")
    if architecture in ("vgg16", "vgg16_bn"):
        model = getattr(tv, architecture)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
        return model
    if architecture in ("resnet18", "resnet50"):
        model = getattr(tv, architecture)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return model
    raise ValueError(f"unknown architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")


def load_classifier(
    architecture: str,
    checkpoint_path: str | Path,
    num_classes: int,
    *,
    in_channels: int = 3,
    prefix: str | None = None,
    **options: Any,
) -> nn.Module:
    """``architecture`` with the weights of a local checkpoint, in eval mode on the CPU.

    ``prefix`` is stripped from the keys (e.g. ``"model."`` for a Lightning module holding the network as
    ``self.model``); keys without it are ignored. Without ``prefix``, a ``module.`` prefix (DataParallel) or
    one common prefix shared by every key is stripped when that makes the keys fit.
    """
    model = build_classifier(architecture, num_classes, in_channels, **options)
    state = read_state_dict(checkpoint_path)
    state = _strip_prefix(state, prefix, set(model.state_dict()), checkpoint_path)
    load_state_dict_strict(model, state, checkpoint_path, num_classes=num_classes)
    return model.eval()


def read_state_dict(checkpoint_path: str | Path) -> dict[str, Tensor]:
    """The tensors of a plain, Lightning-style or TorchScript checkpoint, by key."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist or is not a file; give the path of a local file"
        )
    if _is_torchscript(path):
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # TorchScript raises many kinds; all mean unreadable
            raise CheckpointError(f"checkpoint {path}: unreadable TorchScript archive ({exc})") from None
        return dict(scripted.state_dict())
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # damaged or non-torch files raise many kinds
        raise CheckpointError(
            f"checkpoint {path} could not be read with torch.load(weights_only=True): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Save the weights with "
            "torch.save(model.state_dict(), path) (no pickled objects) or as TorchScript"
        ) from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not loaded:
        raise CheckpointError(
            f"checkpoint {path} holds {type(loaded).__name__}, not a state_dict (a dict of tensors) or a "
            "dict with a 'state_dict' key"
        )
    bad = [k for k, v in loaded.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {path}: entries that are not tensors: {_listed(bad)}")
    return dict(loaded)


def load_state_dict_strict(
    model: nn.Module, state: Mapping[str, Tensor], source: str | Path, *, num_classes: int | None = None
) -> None:
    """Load ``state`` into ``model``, refusing missing or unexpected keys and shape mismatches by name."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {source} does not fit {type(model).__name__}: missing keys {_listed(missing)}; "
            f"unexpected keys {_listed(unexpected)}. Check the architecture, and the prefix of a Lightning "
            "checkpoint (e.g. prefix='model.')"
        )
    mismatched = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if mismatched:
        details = "; ".join(
            f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
            for k in mismatched[:_MAX_LISTED]
        )
        last_weight = [k for k in expected if k.endswith("weight")][-1]
        hint = ""
        if num_classes is not None and last_weight in mismatched:
            hint = (
                f" The checkpoint has {state[last_weight].shape[0]} classes, the data set has {num_classes}: "
                "register it with a data set of as many classes."
            )
        raise CheckpointError(f"checkpoint {source}: shape mismatch for {details}.{hint}")
    model.load_state_dict(state, strict=True)


def split_classifier(model: nn.Module, architecture: str) -> SplitClassifier:
    """f (spatial features) and g (decision) with ``g(f(x)) == model(x)``, at the papers' split points."""
    if architecture == "small_cnn":
        return SplitClassifier(f=model.features, g=model.classifier)
    if architecture in ("vgg16", "vgg16_bn"):
        g = nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)
        return SplitClassifier(f=model.features, g=g)
    if architecture == "resnet50":
        stem = [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3]
        f = nn.Sequential(*stem, model.layer4[0])
        g = nn.Sequential(*model.layer4[1:], model.avgpool, nn.Flatten(1), model.fc)
        return SplitClassifier(f=f, g=g)
    return split_gap_linear(model)


def split_gap_linear(model: nn.Module) -> SplitClassifier:
    """Split a network whose last two children are global average pooling and a linear layer (ResNet-18 and
    the like) after the last convolutional stage. Its children must run in order in ``forward``."""
    children = list(model.named_children())
    kinds = [type(m) for _, m in children[-2:]]
    if len(children) < 3 or not (kinds[0] in (nn.AdaptiveAvgPool2d, nn.AvgPool2d) and kinds[1] is nn.Linear):
        names = ", ".join(f"{n} ({type(m).__name__})" for n, m in children[-3:])
        raise ValueError(
            f"{type(model).__name__} does not end in global average pooling plus a linear layer (its last "
            f"children are {names}); use one of {', '.join(ARCHITECTURES)} or split it by hand"
        )
    *body, (_, pool), (_, fc) = children
    return SplitClassifier(f=nn.Sequential(*(m for _, m in body)), g=nn.Sequential(pool, nn.Flatten(1), fc))


def to_input(
    images: np.ndarray | Sequence[np.ndarray],
    *,
    in_channels: int,
    normalisation: Mapping[str, Sequence[float]] | None = None,
    input_size: int | None = None,
) -> Tensor:
    """A float batch (N, C, H, W) from uint8 images: a stacked array (N, H, W) or (N, H, W, 3), or a list of
    (H, W) / (H, W, 3) arrays. Scaled to [0, 1], converted to the classifier's channels, resized to
    ``input_size`` (bilinear) and normalised with ``normalisation["mean"]`` / ``["std"]`` per channel."""
    arrays = list(images)
    if not arrays:
        raise ValueError("to_input needs at least one image")
    batch = []
    for array in arrays:
        array = np.asarray(array)
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
            raise ValueError(f"expected uint8 images (H, W) or (H, W, 3), got {array.dtype} {array.shape}")
        t = torch.from_numpy(np.ascontiguousarray(array)).float().div_(255)
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
        if t.shape[0] == 1 and in_channels == 3:
            t = t.expand(3, -1, -1)
        elif t.shape[0] == 3 and in_channels == 1:
            t = (t * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
        if input_size is not None and tuple(t.shape[1:]) != (input_size, input_size):
            t = nn.functional.interpolate(
                t[None], size=(input_size, input_size), mode="bilinear", antialias=True
            )[0]
        batch.append(t)
    x = torch.stack(batch)
    if normalisation:
        mean = torch.tensor(normalisation["mean"], dtype=x.dtype)[None, :, None, None]
        std = torch.tensor(normalisation["std"], dtype=x.dtype)[None, :, None, None]
        x = (x - mean) / std
    return x


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def _strip_prefix(
    state: dict[str, Tensor], prefix: str | None, expected: set[str], source: str | Path
) -> dict[str, Tensor]:
    if prefix:
        kept = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not kept:
            raise CheckpointError(
                f"checkpoint {source}: no key starts with the prefix {prefix!r} "
                f"(keys: {_listed(list(state))}); "
                "give the prefix the network's keys carry, or none"
            )
        return kept
    if set(state) <= expected:
        return state
    firsts = {k.split(".", 1)[0] for k in state}
    if len(firsts) == 1 and all("." in k for k in state):
        (common,) = firsts
        stripped = {k[len(common) + 1 :]: v for k, v in state.items()}
        if set(stripped) & expected:
            return stripped
    return state


def _listed(keys: Sequence[str]) -> str:
    if not keys:
        return "none"
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    return shown + (f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")
