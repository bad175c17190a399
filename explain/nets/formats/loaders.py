"""Loaders of the formats in ``explain.nets.formats.FORMATS``: ``load(path, options, dtype) -> model``.

Each reads local files only and refuses a directory that lacks a part, naming the part and what writes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from explain.nets.formats.errors import FormatError

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def parse_range(value: Any) -> list[float]:
    """An input range given as "-1,1" or [-1, 1]; refused unless two numbers, low < high."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        low, high = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise FormatError(
            f"image_range={value!r} is not two numbers", "give it as low,high, e.g. image_range=-1,1"
        ) from None
    if not low < high:
        raise FormatError(f"image_range={value!r} has low >= high", "give it as low,high, e.g. -1,1")
    return [low, high]


def _config(directory: Path, name: str, what: str, writer: str) -> dict[str, Any]:
    path = directory / name
    if not path.is_file():
        raise FormatError(
            f"{directory} has no {name} ({what})", f"save it with {writer}, which writes {name}"
        )
    return json.loads(path.read_text())


def _weights(directory: Path, what: str) -> None:
    if not any((directory / name).is_file() for name in WEIGHT_NAMES):
        raise FormatError(
            f"{directory} has no weights file ({' or '.join(WEIGHT_NAMES)}) for the {what}",
            "copy the whole directory written by save_pretrained",
        )


def load_diffusers_autoencoder(path: Path, options: Mapping[str, Any], dtype: torch.dtype) -> Any:
    """An AutoencoderKL directory, or a Stable Diffusion directory's ``vae/`` (input range [-1, 1] unless
    ``image_range`` says otherwise). Option ``image_range``: "low,high", where config.json does not say."""
    from explain.nets.autoencoder import load_autoencoder

    subfolder = None
    given = options.get("image_range")
    image_range = parse_range(given) if given is not None else None
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        subfolder, image_range = "vae", image_range or [-1.0, 1.0]  # Stable Diffusion's range
    directory = path / (subfolder or "")
    config = _config(directory, "config.json", "the autoencoder's config", "AutoencoderKL.save_pretrained")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise FormatError(
            f"{directory} holds a {config['_class_name']}, not an AutoencoderKL",
            "give the directory of the AutoencoderKL (a Stable Diffusion VAE's vae/ folder)",
        )
    _weights(directory, "autoencoder")
    try:
        return load_autoencoder(path, subfolder, image_range=image_range, torch_dtype=dtype)
    except ValueError as exc:
        if "image_range" not in str(exc):
            raise
        raise FormatError(
            f"{directory / 'config.json'} does not state the range of the autoencoder's input images "
            "(image_range)",
            "pass --option image_range=-1,1 for a Stable Diffusion VAE, or image_range=0,1 for one trained "
            "on images in [0, 1]",
        ) from None


def _load_unet_denoiser(path: Path, dtype: torch.dtype, wanted: str, other_format: str) -> Any:
    from explain.nets.diffusion import load_denoiser

    config = _config(path / "unet", "config.json", "the unet's config", f"{wanted}.save_pretrained")
    _config(path / "scheduler", "scheduler_config.json", "the noise schedule", "save_pretrained")
    name = config.get("_class_name")
    if name != wanted:
        raise FormatError(
            f"{path / 'unet'} holds a {name}, not a {wanted}", f"register it with --format {other_format}"
        )
    _weights(path / "unet", "unet")
    return load_denoiser(path, torch_dtype=dtype)


def load_diffusers_unet(path: Path, options: Mapping[str, Any], dtype: torch.dtype) -> Any:
    """``unet/`` (UNet2DModel with class embeddings, the last the null class) + ``scheduler/``."""
    return _load_unet_denoiser(path, dtype, "UNet2DModel", "diffusers-unet-conditional")


def load_diffusers_unet_conditional(path: Path, options: Mapping[str, Any], dtype: torch.dtype) -> Any:
    """``unet/`` (UNet2DConditionModel) + ``scheduler/`` + ``class_embeddings.safetensors`` (or a unet with
    ``num_class_embeds``)."""
    return _load_unet_denoiser(path, dtype, "UNet2DConditionModel", "diffusers-unet")


def load_stable_diffusion_dir(path: Path, options: Mapping[str, Any], dtype: torch.dtype) -> Any:
    """A StableDiffusionPipeline directory's parts (``explain.nets.diffusion.TextToImage``)."""
    from explain.nets.diffusion import STABLE_DIFFUSION_PARTS, load_stable_diffusion

    missing = [part for part in STABLE_DIFFUSION_PARTS if not (path / part).is_dir()]
    if missing:
        raise FormatError(
            f"{path} lacks {', '.join(p + '/' for p in missing)} of a Stable Diffusion directory",
            f"give the directory StableDiffusionPipeline.save_pretrained wrote (with "
            f"{', '.join(STABLE_DIFFUSION_PARTS)})",
        )
    for part in ("vae", "unet", "text_encoder"):
        _config(path / part, "config.json", f"the {part}'s config", "the pipeline's save_pretrained")
    _config(path / "scheduler", "scheduler_config.json", "the noise schedule", "save_pretrained")
    return load_stable_diffusion(path, torch_dtype=dtype)


def load_foil_bridge(path: Path, options: Mapping[str, Any], dtype: torch.dtype) -> Any:
    from explain.nets.bridge import load_bridge

    bridge = load_bridge(path)
    bridge.unet.to(dtype)
    return bridge


def load_foil_sae(path: Path, options: Mapping[str, Any], dtype: torch.dtype) -> Any:
    from explain.nets.sae import load_sae

    return load_sae(path).to(dtype)


def load_foil_c3lt_maps(path: Path, options: Mapping[str, Any], dtype: torch.dtype) -> Any:
    from explain.nets.c3lt_maps import load_c3lt_maps

    maps = load_c3lt_maps(path)
    maps.g.to(dtype), maps.h.to(dtype)
    return maps
