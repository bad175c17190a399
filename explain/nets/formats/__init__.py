"""Backbones from a researcher's local files: one loader per file format, one check per backbone kind.

A *format* (``Format``, one row of ``FORMATS``) reads a local directory or file of one backbone kind
(nothing is downloaded: diffusers and transformers load with ``local_files_only=True``) and returns the
model as the methods take it, on the CPU, in ``dtype`` (float32; float16 only where the worker loads for a
GPU and the method allows it). The table names loaders as "module:function" and imports nothing heavy, so
the web process may read it. A *check* (``checks.CHECKS``, one per kind; a format may bring its own) runs
the loaded model once on the data set's images at the size the methods see them (``checks.Probe``) and
returns what it found (channels, value range, latent shape, class count), which registration stores in the
Backbone row's config; a model that cannot serve is refused with ``FormatError``, whose message names the
problem and the fix.

Adding a format is one loader function ``load(path, options, dtype) -> model`` and one row in ``FORMATS``:
``Format("compvis-ldm", "denoiser", "explain.nets.formats.compvis:load_compvis", "a CompVis checkpoint and
its YAML config")``; the kind's check then applies to it. ``options`` are the strings a researcher passes
with the format (``--option key=value`` of ``manage.py register_backbone``), e.g. ``image_range`` of an
autoencoder; they are stored with the row and given to the loader again whenever the worker loads it.

This package never imports Django: registration (``explain.services.registration``) and the worker
(``explain.precompute.worker.load_backbone``) call it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explain.nets.formats.errors import FormatError

if TYPE_CHECKING:  # the table is read by the web process, which never imports torch
    import torch

    from explain.nets.formats.checks import Probe


@dataclass(frozen=True)
class Format:
    """A file format of one backbone kind. ``load``: "module:function", called as ``function(path, options,
    dtype)``; ``layout``: what the path holds; ``check``: "module:function" of its own check, or None for
    its kind's (``checks.CHECKS[kind]``); ``options``: the option names the loader reads."""

    name: str
    kind: str
    load: str
    layout: str
    check: str | None = None
    options: tuple[str, ...] = ()


_LOADERS = "explain.nets.formats.loaders"

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "diffusers-autoencoder",
            "autoencoder",
            f"{_LOADERS}:load_diffusers_autoencoder",
            "an AutoencoderKL directory (config.json + weights), or a Stable Diffusion directory (its vae/ "
            "is used, input range [-1, 1])",
            options=("image_range",),
        ),
        Format(
            "diffusers-unet",
            "denoiser",
            f"{_LOADERS}:load_diffusers_unet",
            "a directory with unet/ (a UNet2DModel with num_class_embeds = classes + 1, the last the null "
            "class) and scheduler/ (the noise schedule it was trained with)",
        ),
        Format(
            "diffusers-unet-conditional",
            "denoiser",
            f"{_LOADERS}:load_diffusers_unet_conditional",
            "a directory with unet/ (a UNet2DConditionModel), scheduler/ and class_embeddings.safetensors "
            "(weight: classes + 1 context rows, the last the null class) or a unet with num_class_embeds",
        ),
        Format(
            "diffusers-stable-diffusion",
            "text_denoiser",
            f"{_LOADERS}:load_stable_diffusion_dir",
            "a StableDiffusionPipeline directory: vae/, unet/, text_encoder/, tokenizer/, scheduler/",
            options=("image_size",),
        ),
        Format(
            "foil-bridge",
            "bridge",
            f"{_LOADERS}:load_foil_bridge",
            "a directory with unet/ (UNet2DModel, image + region channels in) and schedule.json (I2SB)",
        ),
        Format(
            "compvis-ldm",
            "denoiser",
            "explain.nets.formats.compvis_ldm:load_compvis_ldm_denoiser",
            "a CompVis latent-diffusion class-conditional .ckpt (LDCE's cin256-v2) with its config.yaml "
            "beside it (or --option config=PATH); converted to diffusers once, cached by sha256",
            options=("config", "weights"),
        ),
        Format(
            "compvis-ldm-autoencoder",
            "autoencoder",
            "explain.nets.formats.compvis_ldm:load_compvis_ldm_autoencoder",
            "the first stage (VQ or KL) of a CompVis latent-diffusion .ckpt with its config.yaml",
            options=("config", "weights"),
        ),
        Format(
            "i2sb",
            "bridge",
            "explain.nets.formats.i2sb:load_i2sb_bridge",
            "an I2SB run directory (latest.pt, options.pkl; adm.json for an ADM other than I2SB's 256 px "
            "one); converted once, cached by sha256",
            check="explain.nets.formats.i2sb:check_i2sb_bridge",
            options=("weights", "adm_config"),
        ),
        Format(
            "c3lt-generator",
            "autoencoder",
            "explain.nets.formats.c3lt_generator:load_c3lt_generator",
            "a directory with a generator and an encoder (TorchScript, or state dicts of C3LT's DCGAN) and "
            "generator.json declaring their format, files, latent_shape, image_channels, image_size, "
            "image_range",
        ),
        Format(
            "foil-sae",
            "sae",
            f"{_LOADERS}:load_foil_sae",
            "a SparseAutoencoder directory (explain.nets.sae)",
        ),
        Format(
            "foil-c3lt-maps",
            "c3lt_maps",
            f"{_LOADERS}:load_foil_c3lt_maps",
            "a C3LT maps directory (g/, h/, pair.json; explain.nets.c3lt_maps)",
        ),
    )
}

# The format of a model that names none: one the platform trained (a Backbone row without a "format" in its
# config), or a directory a setting names (FOIL_STABLE_DIFFUSION_PATH).
DEFAULT_FORMATS: dict[str, str] = {
    "autoencoder": "diffusers-autoencoder",
    "denoiser": "diffusers-unet",
    "bridge": "foil-bridge",
    "sae": "foil-sae",
    "c3lt_maps": "foil-c3lt-maps",
    "text_denoiser": "diffusers-stable-diffusion",
}


def format_named(name: str, kind: str | None = None) -> Format:
    """The format ``name`` (of backbone kind ``kind`` when given), or an error listing those there are."""
    found = FORMATS.get(name)
    if found is None or (kind is not None and found.kind != kind):
        fitting = [f.name for f in FORMATS.values() if kind is None or f.kind == kind]
        if found is not None:
            problem = f"format {name!r} holds {found.kind} models, not {kind} models"
        else:
            problem = f"there is no format {name!r}"
        raise FormatError(
            problem,
            f"formats for {kind or 'every kind'}: {', '.join(fitting) or 'none yet'}",
        )
    return found


def _resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(import_module(module), name)


def backbone_load(
    format_name: str,
    path: str | Path,
    options: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Any:
    """The model at ``path`` read by format ``format_name``, in eval mode on the CPU in ``dtype`` (default
    float32); files that are missing, truncated or unreadable are refused with ``FormatError`` naming the
    file."""
    import torch

    from explain.nets.formats.checks import check_files

    fmt = format_named(format_name)
    root = Path(path)
    if not root.exists():
        raise FormatError(
            f"{str(root)!r} does not exist",
            f"give the local path of {fmt.layout} (nothing is downloaded)",
        )
    check_files(root)
    try:
        return _resolve(fmt.load)(root, dict(options or {}), dtype or torch.float32)
    except FormatError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, EOFError) as exc:
        raise FormatError(
            f"{str(root)!r} could not be read as {fmt.name} ({type(exc).__name__}: {exc})",
            f"the {fmt.name} format is {fmt.layout}",
        ) from exc


def backbone_check(format_name: str, model: Any, probe: Probe) -> dict[str, Any]:
    """What the format's check (or its kind's) found when running ``model`` on ``probe``; ``FormatError``
    when the model cannot serve the data set and classifier."""
    import torch

    from explain.nets.formats.checks import CHECKS

    fmt = format_named(format_name)
    check = _resolve(fmt.check) if fmt.check else CHECKS.get(fmt.kind)
    if check is None:
        raise FormatError(
            f"no check is written for {fmt.kind} models", "add one to explain.nets.formats.checks.CHECKS"
        )
    with torch.no_grad():
        return check(model, probe)


def place(model: Any, device: Any) -> Any:
    """Move a loaded model (a module, a bundle with ``to``, or a dataclass of modules) to ``device``."""
    import torch

    if hasattr(model, "to") and callable(model.to):
        out = model.to(device)
        return model if out is None else out
    for value in vars(model).values():
        if isinstance(value, torch.nn.Module):
            value.to(device)
    return model


__all__ = [
    "FORMATS",
    "DEFAULT_FORMATS",
    "Format",
    "FormatError",
    "backbone_check",
    "backbone_load",
    "format_named",
    "place",
]
