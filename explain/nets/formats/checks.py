"""What registration checks on a loaded backbone, per kind, and the files it reads.

Each check runs the model once on ``Probe.images``: a few of the data set's images in [0, 1] at the size the
generative methods see them (the classifier's input size), and returns what it found for the Backbone row's
config. A model that cannot serve is refused with ``FormatError(problem, fix)``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from explain.nets.formats.errors import FormatError
from explain.nets.split import SplitClassifier

# The autoencoder's declared input range is refused when the other usual range reconstructs the data set's
# images this many times better (a random network reconstructs both equally badly and is not refused).
RANGE_RATIO = 2.0


@dataclass
class Probe:
    """What a check runs the model on: ``images`` (N, C, S, S) in [0, 1] at the classifier's input size,
    their ``labels``, the data set's class names in index order, the classifier as the generative methods see
    it, and the autoencoder a latent model works in (None when there is none)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    classifier: SplitClassifier
    autoencoder: Any = None
    autoencoder_name: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # the format's options, as registered

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------------------------------
# Files


def _safetensors_size(path: Path) -> int | None:
    """The size a safetensors file must have, from its header; None when the header itself is cut."""
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        raw = fh.read(n)
    if len(raw) < n:
        return None
    try:
        header = json.loads(raw)
    except ValueError:
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def check_files(root: Path) -> dict[str, int]:
    """Bytes of every file under ``root`` (or of ``root``); a truncated safetensors file or an unreadable
    JSON config is refused, naming the file."""
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    sizes: dict[str, int] = {}
    for path in files:
        name = path.relative_to(root).as_posix() if root.is_dir() else path.name
        size = path.stat().st_size
        sizes[name] = size
        if path.suffix == ".safetensors":
            wanted = _safetensors_size(path)
            if wanted is None or wanted > size:
                expected = f"{wanted} bytes" if wanted else "a complete header"
                raise FormatError(
                    f"{path} is truncated: it has {size} bytes and its header says {expected}",
                    "copy the file again (compare its checksum with the source)",
                )
        elif path.suffix == ".json" and not path.name.startswith("."):
            try:
                json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                raise FormatError(
                    f"{path} is not valid JSON ({exc})",
                    "copy the file again, or write the config the model was saved with",
                ) from None
    if not sizes:
        raise FormatError(f"{root} is empty", "give the directory the model was saved to")
    return sizes


# ----------------------------------------------------------------------------------------------------
# Per kind


def _finite(name: str, value: torch.Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise FormatError(
            f"the {name} gives NaN or infinite values on the data set's images",
            "check the weights (a failed conversion or a half-precision overflow) and register it again",
        )


def _channels(model_channels: int, data_channels: int, what: str) -> None:
    if model_channels != data_channels and not (data_channels == 1 and model_channels == 3):
        raise FormatError(
            f"the {what} takes {model_channels}-channel images, and the classifier reads "
            f"{data_channels}-channel images",
            f"register a {what} of {data_channels}-channel images (grey images are only converted to 3 "
            "channels, nothing else is)",
        )


def _reconstruct(vae: Any, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """D(E(x)) with ``x`` in [0, 1] fed to the autoencoder as [low, high], back in [0, 1]."""
    wanted = vae.config.in_channels
    y = x.expand(-1, wanted, -1, -1) if x.shape[1] != wanted else x
    z = vae.encode((y * (high - low) + low).to(vae.dtype)).latent_dist.mean
    out = (vae.decode(z).sample.float() - low) / (high - low)
    return out.mean(1, keepdim=True) if x.shape[1] == 1 and out.shape[1] == 3 else out


def check_autoencoder(vae: Any, probe: Probe) -> dict[str, Any]:
    """Channels, stated input range (and that the other usual range does not fit far better), latent shape,
    and that decoding gives images of the input's size."""
    from explain.nets.autoencoder import decode, encode, input_range

    x = probe.images
    size = x.shape[-1]
    _channels(int(vae.config.in_channels), x.shape[1], "autoencoder")
    try:
        low, high = input_range(vae)
    except ValueError:
        raise FormatError(
            "the autoencoder's config.json does not state the range of its input images (image_range)",
            "pass --option image_range=-1,1 for a Stable Diffusion VAE, or image_range=0,1 for one trained "
            "on images in [0, 1]",
        ) from None
    z = encode(vae, x)
    y = decode(vae, z, x.shape[1])
    if tuple(y.shape) != tuple(x.shape):
        factor = max(1, round(size / z.shape[-1]))
        raise FormatError(
            f"the autoencoder turns {size} x {size} images into {z.shape[-2]} x {z.shape[-1]} latents and "
            f"decodes them to {y.shape[-2]} x {y.shape[-1]}",
            f"it downsamples by {factor}: use a classifier whose input size is a multiple of {factor}",
        )
    _finite("autoencoder", y)
    l1 = float((y - x).abs().mean())
    found: dict[str, Any] = {
        "architecture": type(vae).__name__,
        "in_channels": int(vae.config.in_channels),
        "image_range": [low, high],
        "size": size,
        "latent_shape": list(z.shape[1:]),
        "downsampling": size // z.shape[-1],
        "scaling_factor": float(vae.config.scaling_factor),
        "reconstruction_l1": round(l1, 5),
    }
    usual = {(0.0, 1.0): (-1.0, 1.0), (-1.0, 1.0): (0.0, 1.0)}
    if (low, high) in usual:
        other = usual[(low, high)]
        l1_other = float((_reconstruct(vae, x, *other) - x).abs().mean())
        found["reconstruction_l1_other_range"] = round(l1_other, 5)
        if l1_other * RANGE_RATIO < l1:
            raise FormatError(
                f"the autoencoder is declared to take images in [{low:g}, {high:g}], but it reconstructs the "
                f"data set's images with mean L1 {l1:.4f} so, and with {l1_other:.4f} when given them in "
                f"[{other[0]:g}, {other[1]:g}]",
                f"register it with --option image_range={other[0]:g},{other[1]:g}",
            )
    return found


def _need_autoencoder(probe: Probe, what: str) -> Any:
    if probe.autoencoder is None:
        raise FormatError(
            f"a {what} works in the latent space of an autoencoder, and the data set has none",
            "register the autoencoder it was trained with first (--kind autoencoder), or name it with "
            "--option autoencoder=NAME",
        )
    return probe.autoencoder


def check_denoiser(denoiser: Any, probe: Probe) -> dict[str, Any]:
    """Latent channels against the autoencoder's, class count (plus the null class) against the
    classifier's, and one denoising pass on the data set's latents."""
    from explain.nets.autoencoder import encode

    vae = _need_autoencoder(probe, "latent denoiser")
    z = encode(vae, probe.images)
    unet = denoiser.unet
    if int(unet.config.in_channels) != z.shape[1] or int(unet.config.out_channels) != z.shape[1]:
        raise FormatError(
            f"the denoiser takes {unet.config.in_channels}-channel latents and autoencoder "
            f"{probe.autoencoder_name!r} gives {z.shape[1]}-channel ones",
            "register the autoencoder the denoiser was trained with and name it with --option "
            "autoencoder=NAME",
        )
    rows = denoiser.null_class + 1
    if rows == probe.num_classes:
        raise FormatError(
            f"the denoiser has {rows} class labels, as many as the classifier has classes, so no null class "
            "for the unconditional score LDCE compares against",
            f"register a denoiser trained with conditioning dropout whose label {probe.num_classes} is the "
            f"null class ({probe.num_classes + 1} labels)",
        )
    if denoiser.num_classes != probe.num_classes:
        raise FormatError(
            f"the denoiser has {denoiser.num_classes} classes (and a null class) and the classifier has "
            f"{probe.num_classes}",
            "LDCE-cls steers the denoiser with the classifier's class index, so both must have the same "
            "classes in the same order: register a denoiser trained on this data set's classes",
        )
    t = int(denoiser.scheduler.config.num_train_timesteps) // 2
    eps = denoiser.eps(z, t, probe.labels.to(z.device))
    if eps.shape != z.shape:
        raise FormatError(
            f"the denoiser maps {tuple(z.shape[1:])} latents to {tuple(eps.shape[1:])}",
            "register a denoiser that predicts the noise of latents of the autoencoder's shape",
        )
    _finite("denoiser", eps)
    schedule = denoiser.scheduler.config
    return {
        "architecture": type(unet).__name__,
        "conditioning": "context" if denoiser.class_embeddings is not None else "class_embeds",
        "num_classes": denoiser.num_classes,
        "latent_shape": list(z.shape[1:]),
        "sample_size": unet.config.sample_size,
        "scheduler": {
            "num_train_timesteps": int(schedule.num_train_timesteps),
            "beta_schedule": schedule.beta_schedule,
            "prediction_type": schedule.prediction_type,
        },
    }


def check_text_to_image(sd: Any, probe: Probe) -> dict[str, Any]:
    """The autoencoder (3 channels, [-1, 1]) at the option ``image_size`` (LDCE-txt's default, 256), the text
    encoder's width against the unet's cross-attention, and one denoising pass on the latents of the data
    set's images with a class prompt."""
    from explain.nets.autoencoder import decode, encode

    image_size = int(probe.options.get("image_size", 256))
    x = F.interpolate(probe.images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    _channels(int(sd.vae.config.in_channels), x.shape[1], "Stable Diffusion autoencoder")
    z = encode(sd.vae, x)
    if int(sd.unet.config.in_channels) != z.shape[1]:
        raise FormatError(
            f"the unet takes {sd.unet.config.in_channels}-channel latents and the directory's autoencoder "
            f"gives {z.shape[1]}-channel ones",
            "the vae/ and unet/ must come from the same Stable Diffusion release",
        )
    states = sd.embed(["", f"a photo of a {probe.class_names[0]}."])
    width = int(sd.unet.config.cross_attention_dim)
    if states.shape[-1] != width:
        raise FormatError(
            f"the text encoder gives {states.shape[-1]}-wide states and the unet attends to "
            f"{width}-wide ones",
            "the text_encoder/ and unet/ must come from the same Stable Diffusion release",
        )
    t = int(sd.scheduler.config.num_train_timesteps) // 2
    context = states[1:].expand(len(z), -1, -1).to(sd.unet.dtype)
    eps = sd.unet(z.to(sd.unet.dtype), t, encoder_hidden_states=context).sample.float()
    if eps.shape != z.shape:
        raise FormatError(
            f"the unet maps {tuple(z.shape[1:])} latents to {tuple(eps.shape[1:])}",
            f"register a pipeline whose unet runs at {image_size} px, or set --option image_size",
        )
    _finite("unet", eps)
    y = decode(sd.vae, z, x.shape[1])
    if y.shape != x.shape:
        raise FormatError(
            f"the autoencoder decodes {image_size} px images to {y.shape[-1]} px",
            "set --option image_size to a multiple of the autoencoder's downsampling (8 for Stable "
            "Diffusion)",
        )
    return {
        "architecture": "StableDiffusion",
        "image_size": image_size,
        "image_range": [-1.0, 1.0],
        "latent_shape": list(z.shape[1:]),
        "text_width": width,
        "tokens": int(sd.tokenizer.model_max_length),
        "num_classes": probe.num_classes,
        "reconstruction_l1": round(float((y - x).abs().mean()), 5),
    }


def check_bridge(bridge: Any, probe: Probe) -> dict[str, Any]:
    """Image and region channels in, image channels out, one clean-image estimate at the data set's size."""
    x = probe.images
    c = x.shape[1]
    unet = bridge.unet
    if int(unet.config.in_channels) != c + 1 or int(unet.config.out_channels) != c:
        raise FormatError(
            f"the bridge takes {unet.config.in_channels} channels in and gives {unet.config.out_channels}; "
            f"for {c}-channel images it must take {c + 1} (image and region) and give {c}",
            f"register a bridge trained on {c}-channel images with the region as an extra input channel",
        )
    region = torch.zeros_like(x[:, :1])
    region[..., : x.shape[-2] // 2, :] = 1
    x1 = (1 - region) * x + region * torch.randn_like(x)
    n = bridge.schedule.num_timesteps - 1
    x0 = bridge.x0_hat(x1, n, region)
    if x0.shape != x.shape:
        raise FormatError(
            f"the bridge maps {tuple(x.shape[1:])} images to {tuple(x0.shape[1:])}",
            "register a bridge that runs at the classifier's input size",
        )
    _finite("bridge", x0)
    return {
        "architecture": type(unet).__name__,
        "size": x.shape[-1],
        "in_channels": c,
        "num_timesteps": bridge.schedule.num_timesteps,
    }


def check_sae(sae: Any, probe: Probe) -> dict[str, Any]:
    """Its input width against the classifier's pooled features."""
    from explain.nets.sae import pooled_features

    features = pooled_features(probe.classifier.f, probe.images)
    d_in = int(sae.config.d_in)
    if d_in != features.shape[1]:
        raise FormatError(
            f"the sparse autoencoder reads {d_in} features and the classifier's pooled features have "
            f"{features.shape[1]}",
            "register an SAE trained on this classifier's features",
        )
    reconstruction = sae(features)
    out = reconstruction[0] if isinstance(reconstruction, tuple) else reconstruction
    _finite("sparse autoencoder", out)
    return {"architecture": type(sae).__name__, "d_in": d_in, "latents": int(sae.config.expansion) * d_in}


def check_c3lt_maps(maps: Any, probe: Probe) -> dict[str, Any]:
    """The pair's class indices against the classifier's, and both maps on the autoencoder's latents."""
    from explain.nets.autoencoder import encode
    from explain.nets.c3lt_maps import apply_n

    for label in (maps.class_a, maps.class_b):
        if not 0 <= label < probe.num_classes:
            raise FormatError(
                f"the C3LT maps are for classes {maps.class_a} <-> {maps.class_b} and the classifier has "
                f"{probe.num_classes} classes",
                "register maps trained for a class pair of this classifier",
            )
    z = encode(_need_autoencoder(probe, "C3LT map"), probe.images)
    for name, latent_map in (("g", maps.g), ("h", maps.h)):
        out = apply_n(latent_map, z, maps.n)
        if out.shape != z.shape:
            raise FormatError(
                f"C3LT map {name} turns {tuple(z.shape[1:])} latents into {tuple(out.shape[1:])}",
                "register maps trained in the latent space of this autoencoder",
            )
        _finite(f"C3LT map {name}", out)
    return {"class_pair": [maps.class_a, maps.class_b], "n": maps.n, "latent_shape": list(z.shape[1:])}


CHECKS = {
    "autoencoder": check_autoencoder,
    "denoiser": check_denoiser,
    "text_denoiser": check_text_to_image,
    "bridge": check_bridge,
    "sae": check_sae,
    "c3lt_maps": check_c3lt_maps,
}

__all__ = ["CHECKS", "RANGE_RATIO", "FormatError", "Probe", "check_files"]
