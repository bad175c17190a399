"""An I2SB checkpoint (Liu et al. 2023; what RCSB uses), converted to the platform's inpainting bridge.

I2SB's training run writes a directory with ``options.pkl`` (its argparse options: ``interval`` N,
``beta_max``, ``t0``, ``T``, ``cond_x1``, ``image_size``, ...) and ``latest.pt``, a dict whose ``net`` is the
state dict of ``Image256Net`` (an ADM UNet of guided-diffusion under ``diffusion_model.``) and whose ``ema``
is torch_ema's state (``shadow_params`` in the order of the network's parameters; I2SB samples with them).
The ADM's own arguments are not in the run directory: I2SB builds the 256 x 256 ADM of guided-diffusion
(``I2SB_ADM_256`` below; in_channels 6 with ``cond_x1``); another architecture is given as ``adm.json`` in the
directory (guided-diffusion's ``create_model`` arguments) or as ``adm_config``.

The bridge keeps I2SB's parameterisation: betas = linspace(sqrt(1e-4), sqrt(beta_max / N), N)^2 over the
first half, mirrored (``explain.nets.bridge.BridgeSchedule``), the network given x_t (and x_1 with
``cond_x1``) and the noise level linspace(t0, T, N)[n] * N, predicting (x_t - x_0) / sigma_t, on images in
[-1, 1]. ``convert_i2sb`` writes that once per checkpoint sha256 as a bridge directory ``load_bridge`` reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from explain.nets.formats.common import (
    FormatError,
    cached_conversion,
    read_checkpoint,
    require_file,
    sha256_file,
)
from explain.nets.formats.openai_unet import UNetArchitecture, build_unet, unet_architecture

FORMAT = "i2sb"
NET_PREFIX = "diffusion_model."

# guided-diffusion's 256x256_diffusion_uncond model, as I2SB's ckpt_util.create_argparser builds it
# (learn_sigma off: I2SB drops the sigma channels).
I2SB_ADM_256 = {
    "image_size": 256,
    "num_channels": 256,
    "num_res_blocks": 2,
    "channel_mult": "",
    "learn_sigma": False,
    "class_cond": False,
    "attention_resolutions": "32,16,8",
    "num_heads": 4,
    "num_head_channels": 64,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
    "use_new_attention_order": False,
}
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def _device(*parts: Any) -> str:
    return ":".join(str(p) for p in parts)


class _OptionsUnpickler(pickle.Unpickler):
    """Unpickles I2SB's options (an argparse.Namespace of plain values and paths) and nothing else."""

    ALLOWED = {
        ("argparse", "Namespace"): argparse.Namespace,
        ("pathlib", "PosixPath"): pathlib.PurePosixPath,
        ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
        ("pathlib", "Path"): pathlib.PurePosixPath,
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("pathlib._local", "PosixPath"): pathlib.PurePosixPath,
        ("torch", "device"): _device,
        ("easydict", "EasyDict"): dict,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(
            f"options.pkl holds a {module}.{name}, which is not a plain option value"
        )


def read_options(path: Path) -> dict[str, Any]:
    """I2SB's options from ``options.pkl`` (restricted unpickling) or ``options.json``."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    try:
        with open(path, "rb") as handle:
            options = _OptionsUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as error:
        raise FormatError(
            f"{str(path)!r} is not I2SB's options pickle ({error}); give the options.pkl its training run "
            "wrote, or an options.json with interval, beta_max, t0, T and cond_x1"
        ) from error
    return vars(options) if isinstance(options, argparse.Namespace) else dict(options)


def adm_architecture(kwargs: dict[str, Any], cond_x1: bool) -> UNetArchitecture:
    """guided-diffusion's ``create_model`` arguments -> the UNetModel's (as ``script_util.create_model``)."""
    size = int(kwargs["image_size"])
    mult = kwargs.get("channel_mult", "")
    if mult in ("", None):
        if size not in DEFAULT_CHANNEL_MULT:
            raise FormatError(f"the ADM has image_size {size} and no channel_mult; state channel_mult")
        mult = DEFAULT_CHANNEL_MULT[size]
    elif isinstance(mult, str):
        mult = tuple(int(m) for m in mult.split(","))
    if any(m != int(m) for m in mult):
        raise FormatError(f"channel_mult {mult} has fractional multipliers, which diffusers cannot express")
    resolutions = kwargs["attention_resolutions"]
    if isinstance(resolutions, str):
        resolutions = [int(r) for r in resolutions.split(",") if r]
    in_channels = int(kwargs.get("in_channels", 6 if cond_x1 else 3))
    return unet_architecture(
        {
            "image_size": size,
            "in_channels": in_channels,
            "model_channels": int(kwargs["num_channels"]),
            "out_channels": 6 if kwargs.get("learn_sigma") else 3,
            "num_res_blocks": int(kwargs["num_res_blocks"]),
            "attention_resolutions": [size // int(r) for r in resolutions],
            "channel_mult": [int(m) for m in mult],
            "num_classes": 1000 if kwargs.get("class_cond") else None,
            "num_heads": int(kwargs.get("num_heads", 4)),
            "num_head_channels": int(kwargs.get("num_head_channels", -1)),
            "num_heads_upsample": int(kwargs.get("num_heads_upsample", -1)),
            "use_scale_shift_norm": bool(kwargs.get("use_scale_shift_norm", True)),
            "resblock_updown": bool(kwargs.get("resblock_updown", False)),
            "use_new_attention_order": bool(kwargs.get("use_new_attention_order", False)),
        },
        "the I2SB network's ADM config",
    )


def _run_files(path: Path) -> tuple[Path, Path]:
    """(checkpoint, options) from a run directory or its checkpoint file."""
    if path.is_dir():
        checkpoint = path / "latest.pt"
        root = path
    else:
        checkpoint, root = path, path.parent
    require_file(checkpoint, "the I2SB checkpoint", "give I2SB's run directory (latest.pt, options.pkl)")
    for name in ("options.pkl", "options.json"):
        if (root / name).is_file():
            return checkpoint, root / name
    raise FormatError(
        f"no options.pkl beside {str(checkpoint)!r}: I2SB's schedule (interval, beta_max, t0, T) and whether "
        "the network sees x_1 (cond_x1) are stored there; copy the options.pkl of the training run into "
        f"{str(root)!r}"
    )


def _adm_kwargs(root: Path, adm_config: str | os.PathLike[str] | dict | None) -> dict[str, Any]:
    if isinstance(adm_config, dict):
        return {**I2SB_ADM_256, **adm_config}
    path = Path(adm_config) if adm_config is not None else root / "adm.json"
    if adm_config is None and not path.is_file():
        return dict(I2SB_ADM_256)
    require_file(path, "the ADM config", "give guided-diffusion's create_model arguments as JSON")
    try:
        return {**I2SB_ADM_256, **json.loads(path.read_text())}
    except json.JSONDecodeError as error:
        raise FormatError(f"{str(path)!r} is not valid JSON ({error})") from error


def _network_state(raw: Any, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    if not isinstance(raw, dict) or not isinstance(raw.get("net"), dict):
        raise FormatError("the I2SB checkpoint has no 'net' state dict; give the latest.pt of an I2SB run")
    net = raw["net"]
    if not all(k.startswith(NET_PREFIX) for k in net):
        raise FormatError(
            f"the I2SB network's tensors are not under {NET_PREFIX!r}; it is not an Image256Net"
        )
    state = {k[len(NET_PREFIX) :]: v for k, v in net.items()}
    if weights == "model":
        return state, "model"
    shadow = (raw.get("ema") or {}).get("shadow_params")
    if shadow is None:
        if weights == "ema":
            raise FormatError("weights='ema' was asked for, but the checkpoint holds no EMA shadow_params")
        return state, "model"
    if len(shadow) != len(state):
        raise FormatError(
            f"the EMA holds {len(shadow)} tensors for the network's {len(state)}; pass weights='model'"
        )
    ema = {}
    for (key, value), average in zip(state.items(), shadow, strict=True):
        if average.shape != value.shape:
            raise FormatError(
                f"the EMA tensor for {key!r} has shape {tuple(average.shape)}, not {tuple(value.shape)}"
            )
        ema[key] = average
    return ema, "ema"


def convert_i2sb(
    path: str | os.PathLike[str],
    *,
    adm_config: str | os.PathLike[str] | dict | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    weights: str = "ema",
) -> Path:
    """Convert once (cached by the checkpoint's and options' sha256) and return the bridge directory.

    ``weights``: "ema" (I2SB samples with the EMA; the raw weights when the checkpoint has none) or
    "model"."""
    if weights not in ("ema", "model"):
        raise FormatError(f"weights must be 'ema' or 'model', not {weights!r}")
    checkpoint, options_path = _run_files(Path(path))
    options = read_options(options_path)
    missing = [k for k in ("interval", "beta_max", "t0", "T") if k not in options]
    if missing:
        raise FormatError(f"{str(options_path)!r} lacks {missing}; it is not the options of an I2SB run")
    interval = int(options["interval"])
    if interval < 2 or interval % 2:
        raise FormatError(f"I2SB's interval must be an even number of steps, not {interval}")
    cond_x1 = bool(options.get("cond_x1", False))
    adm = _adm_kwargs(options_path.parent, adm_config)
    arch = adm_architecture(adm, cond_x1)
    image_channels = arch.out_channels
    if arch.in_channels != image_channels * (2 if cond_x1 else 1):
        raise FormatError(
            f"the ADM takes {arch.in_channels} channels but I2SB's network with cond_x1={cond_x1} gives it "
            f"{image_channels * (2 if cond_x1 else 1)} (x_t{' and x_1' if cond_x1 else ''}); the ADM config "
            "or "
            "options.pkl belongs to another run"
        )
    stated = json.dumps(adm, sort_keys=True)
    key = f"{sha256_file(checkpoint)}:{sha256_file(options_path)}:{stated}:{weights}"
    key = hashlib.sha256(key.encode()).hexdigest()

    def convert(out: Path) -> dict:
        state, used = _network_state(read_checkpoint(checkpoint, "the I2SB checkpoint"), weights)
        unet = build_unet(state, arch, "the I2SB network")
        unet.save_pretrained(out / "unet")
        schedule = {
            "num_timesteps": interval,
            "beta_max": float(options["beta_max"]),
            "noise_levels": [float(options["t0"]), float(options["T"])],
        }
        (out / "schedule.json").write_text(json.dumps(schedule))
        bridge = {"conditioning": "x1" if cond_x1 else "none", "image_range": [-1.0, 1.0]}
        (out / "bridge.json").write_text(json.dumps(bridge))
        return {
            "format": FORMAT,
            "checkpoint": str(checkpoint),
            "options": str(options_path),
            "weights": used,
            "corrupt": str(options.get("corrupt", "")),
            "image_size": int(adm["image_size"]),
            **schedule,
            **bridge,
        }

    return cached_conversion(FORMAT, key, convert, cache_dir)


def load_i2sb(
    path: str | os.PathLike[str],
    *,
    image_channels: int | None = None,
    adm_config: str | os.PathLike[str] | dict | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    weights: str = "ema",
):
    """The ``InpaintingBridge`` RCSB uses, from an I2SB run directory (converted once and cached);
    ``image_channels``: the data set's, refused when the bridge makes others."""
    from explain.nets.bridge import load_bridge

    bridge = load_bridge(convert_i2sb(path, adm_config=adm_config, cache_dir=cache_dir, weights=weights))
    if image_channels is not None and bridge.channels != image_channels:
        raise FormatError(
            f"the I2SB network makes {bridge.channels}-channel images but the data set's have "
            f"{image_channels}; "
            "use a bridge trained on images like the data set's"
        )
    return bridge


def load_i2sb_bridge(path: Path, options: Mapping[str, Any], dtype: torch.dtype) -> Any:
    """Format ``i2sb``: ``load_i2sb`` (options ``weights``: ema or model; ``adm_config``: a JSON path)."""
    bridge = load_i2sb(path, adm_config=options.get("adm_config"), weights=options.get("weights", "ema"))
    bridge.unet.to(dtype)
    return bridge


def check_i2sb_bridge(bridge: Any, probe: Any) -> dict[str, Any]:
    """The bridge's image channels against the data set's, and one clean-image estimate at the data set's
    size from x_1 (the image with its top half replaced by noise), in the bridge's range."""
    x = probe.images
    if bridge.channels != x.shape[1]:
        raise FormatError(
            f"the I2SB network makes {bridge.channels}-channel images and the classifier reads "
            f"{x.shape[1]}-channel ones; register a bridge trained on images like the data set's"
        )
    region = torch.zeros_like(x[:, :1])
    region[..., : x.shape[-2] // 2, :] = 1
    x_b = bridge.to_bridge(x).to(bridge.unet.dtype)
    x1 = (1 - region) * x_b + region * torch.randn_like(x_b)
    x0 = bridge.x0_hat(x1, bridge.schedule.num_timesteps - 1, region, x1)
    if x0.shape != x.shape:
        raise FormatError(
            f"the I2SB network maps {tuple(x.shape[1:])} images to {tuple(x0.shape[1:])}; register a bridge "
            "that runs at the classifier's input size"
        )
    if not bool(torch.isfinite(x0).all()):
        raise FormatError("the I2SB network gives NaN or infinite values; check the weights")
    return {
        "architecture": type(bridge.unet).__name__,
        "size": x.shape[-1],
        "in_channels": x.shape[1],
        "num_timesteps": bridge.schedule.num_timesteps,
        "conditioning": bridge.conditioning,
        "image_range": list(bridge.image_range),
        "noise_levels": list(bridge.schedule.noise_levels or ()),
        "beta_max": bridge.schedule.beta_max,
    }
