"""A CompVis / latent-diffusion class-conditional LDM (what LDCE uses: ``cin256-v2``), converted to diffusers.

The original is one PyTorch Lightning ``.ckpt`` whose ``state_dict`` holds ``model.diffusion_model.*`` (an
openaimodel UNet), ``first_stage_model.*`` (a ``VQModelInterface`` or ``AutoencoderKL`` of
``ldm.modules.diffusionmodules.model``), ``cond_stage_model.*`` (``ClassEmbedder``: one embedding per class,
the last one the null class LDCE's unconditional score uses, as label 1000 of 1001 in ``cin256-v2``),
optionally ``model_ema.*`` (the EMA weights, dots removed from their names) and the schedule's buffers, plus a
YAML config (``model.params``: ``linear_start``/``linear_end``/``timesteps`` of the linear-in-sqrt beta
schedule, ``scale_factor``, ``conditioning_key``, ``unet_config``, ``first_stage_config``,
``cond_stage_config``). Class conditioning is either cross-attention on the ``ClassEmbedder`` token
(``conditioning_key: crossattn``) or ``label_emb`` added to the time embedding (``unet_config.num_classes``).

``convert_compvis_ldm`` writes, once per (checkpoint, config) sha256, a directory with ``denoiser/``
(``unet/``, ``scheduler/`` and, for cross-attention, ``class_embeddings.safetensors``: what
``explain.nets.diffusion.load_denoiser`` reads) and ``autoencoder/`` (``LatentDiffusionVQ``, a diffusers
``VQModel``, or an ``AutoencoderKL``, with ``image_range`` [-1, 1] and ``scaling_factor`` = the LDM's
``scale_factor``). The formats ``compvis-ldm`` (the denoiser) and ``compvis-ldm-autoencoder`` register the
two parts of one checkpoint (``load_compvis_ldm_denoiser``, ``load_compvis_ldm_autoencoder``).
The schedule is DDIM over the same betas (``scaled_linear`` is latent diffusion's ``linear``), checked against
the checkpoint's ``alphas_cumprod``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler, VQModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from safetensors.torch import save_file

from explain.nets.formats.common import (
    FormatError,
    cached_conversion,
    read_checkpoint,
    require_file,
    sha256_file,
)
from explain.nets.formats.openai_unet import build_unet, load_strict, unet_architecture

FORMAT = "compvis-ldm"
UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
EMBEDDER_KEY = "cond_stage_model.embedding.weight"


class LatentDiffusionVQ(VQModel):
    """Latent diffusion's VQ first stage (``VQModelInterface``) with the interface the methods use:
    ``encode`` gives the unquantised latents (what ``encode_first_stage`` gives) as a point posterior
    (``latent_dist.mean``, zero variance); ``decode`` quantises them (straight-through) before decoding, as
    ``decode_first_stage``."""

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput:
        h = super().encode(x).latents
        posterior = DiagonalGaussianDistribution(torch.cat([h, torch.zeros_like(h)], 1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)


@dataclass(frozen=True)
class ConvertedLDM:
    root: Path

    @property
    def denoiser(self) -> Path:
        return self.root / "denoiser"

    @property
    def autoencoder(self) -> Path:
        return self.root / "autoencoder"


def find_config(checkpoint: Path, config: str | os.PathLike[str] | None) -> Path:
    """The YAML given, else ``<checkpoint stem>.yaml`` or ``config.yaml`` beside the checkpoint."""
    if config is not None:
        return require_file(config, "the LDM's YAML config", "give the config.yaml released with it")
    for candidate in (checkpoint.with_suffix(".yaml"), checkpoint.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    raise FormatError(
        f"no YAML config for {str(checkpoint)!r}: a latent-diffusion checkpoint needs the config it was "
        "trained with (e.g. models/ldm/cin256-v2/config.yaml); put it beside the checkpoint as config.yaml "
        "or pass its path"
    )


def read_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise FormatError(f"{str(path)!r} is not valid YAML ({error}); give the LDM's config.yaml") from error
    params = (data or {}).get("model", {}).get("params") if isinstance(data, dict) else None
    if not isinstance(params, dict) or "unet_config" not in params or "first_stage_config" not in params:
        raise FormatError(
            f"{str(path)!r} is not a latent-diffusion model config: it needs model.params with unet_config "
            "and first_stage_config (as models/ldm/cin256-v2/config.yaml)"
        )
    return params


def ldm_scheduler(params: dict[str, Any]) -> DDIMScheduler:
    schedule = params.get("beta_schedule", "linear")
    if schedule != "linear":
        raise FormatError(
            f"the LDM uses beta_schedule={schedule!r}; only latent diffusion's 'linear' is supported"
        )
    if params.get("parameterization", "eps") != "eps":
        raise FormatError(
            f"the LDM predicts {params['parameterization']!r}; LDCE needs an eps-predicting model"
        )
    return DDIMScheduler(
        num_train_timesteps=int(params.get("timesteps", 1000)),
        beta_schedule="scaled_linear",  # latent diffusion's "linear": linspace(sqrt(start), sqrt(end)) ** 2
        beta_start=float(params.get("linear_start", 1e-4)),
        beta_end=float(params.get("linear_end", 2e-2)),
        clip_sample=False,
        set_alpha_to_one=False,  # alpha_prev of the last DDIM step is alphas_cumprod[0], as LDCE's sampler
        steps_offset=1,  # ddim_timesteps = range(0, T, T // S) + 1
    )


def _unet_state(state: dict[str, torch.Tensor], params: dict[str, Any], weights: str) -> tuple[dict, str]:
    unet = {k[len(UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if not unet:
        raise FormatError(
            "the checkpoint's state_dict has no model.diffusion_model.* tensors; it is not a "
            "latent-diffusion LDM checkpoint"
        )
    ema_keys = {
        k
        for k in state
        if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")
    }
    use_ema = weights == "ema" or (weights == "auto" and ema_keys and params.get("use_ema", True))
    if not use_ema:
        return unet, "model"
    if not ema_keys:
        raise FormatError("weights='ema' was asked for, but the checkpoint holds no model_ema.* tensors")
    ema = {}
    for key in unet:
        name = "model_ema." + ("diffusion_model." + key).replace(".", "")
        if name not in state:
            raise FormatError(
                f"the checkpoint's EMA lacks {name!r}; pass weights='model' to use the raw weights"
            )
        ema[key] = state[name]
    return ema, "ema"


def _down_types(dd: dict, resolution: int, attention: tuple[int, ...], up: bool) -> list[str]:
    levels = range(len(dd["ch_mult"]))
    kinds = [
        ("AttnUpDecoderBlock2D" if up else "AttnDownEncoderBlock2D")
        if resolution // 2**level in attention
        else ("UpDecoderBlock2D" if up else "DownEncoderBlock2D")
        for level in levels
    ]
    return list(reversed(kinds)) if up else kinds


def _first_stage_state(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """latent diffusion's Encoder/Decoder/quantizer names -> diffusers' VQModel/AutoencoderKL names."""
    out: dict[str, torch.Tensor] = {}
    resnet = {"nin_shortcut": "conv_shortcut"}
    attention = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    for key, value in state.items():
        parts = key.split(".")
        top, rest = parts[0], parts[1:]
        if top in ("quant_conv", "post_quant_conv", "quantize"):
            out[key] = value
            continue
        if top not in ("encoder", "decoder"):
            continue  # the training loss (discriminator, LPIPS) is not part of the model
        name: list[str]
        if rest[0] in ("conv_in", "conv_out"):
            name = rest
        elif rest[0] == "norm_out":
            name = ["conv_norm_out", *rest[1:]]
        elif rest[0] == "mid":
            block, *leaf = rest[1:]
            if block.startswith("block_"):
                name = ["mid_block", "resnets", str(int(block[-1]) - 1), *[resnet.get(p, p) for p in leaf]]
            else:
                name = ["mid_block", "attentions", "0", attention[leaf[0]], leaf[1]]
        elif rest[0] in ("down", "up"):
            level = int(rest[1]) if rest[0] == "down" else levels - 1 - int(rest[1])
            blocks = "down_blocks" if rest[0] == "down" else "up_blocks"
            what, *leaf = rest[2:]
            if what == "block":
                name = [blocks, str(level), "resnets", leaf[0], *[resnet.get(p, p) for p in leaf[1:]]]
            elif what == "attn":
                name = [blocks, str(level), "attentions", leaf[0], attention[leaf[1]], leaf[2]]
            else:  # downsample.conv / upsample.conv
                name = [
                    blocks,
                    str(level),
                    "downsamplers" if what == "downsample" else "upsamplers",
                    "0",
                    *leaf,
                ]
        else:
            raise FormatError(f"unexpected first-stage tensor {key!r}")
        new = ".".join([top, *name])
        if "attentions" in name and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> linear
        out[new] = value
    return out


def build_first_stage(
    state: dict[str, torch.Tensor], stage: dict[str, Any], scale_factor: float
) -> LatentDiffusionVQ | AutoencoderKL:
    target = str(stage.get("target", ""))
    params = stage.get("params", {})
    dd = params.get("ddconfig")
    if not isinstance(dd, dict):
        raise FormatError("first_stage_config.params.ddconfig is missing; give the LDM's original config")
    if dd.get("attn_type", "vanilla") != "vanilla" or dd.get("tanh_out") or dd.get("give_pre_end"):
        raise FormatError(f"first stage ddconfig {dd} uses options diffusers cannot express")
    attention = tuple(int(r) for r in dd.get("attn_resolutions", []))
    resolution = int(dd["resolution"])
    levels = len(dd["ch_mult"])
    common = {
        "in_channels": int(dd["in_channels"]),
        "out_channels": int(dd["out_ch"]),
        "down_block_types": _down_types(dd, resolution, attention, up=False),
        "up_block_types": _down_types(dd, resolution, attention, up=True),
        "block_out_channels": [int(dd["ch"]) * int(m) for m in dd["ch_mult"]],
        "layers_per_block": int(dd["num_res_blocks"]),
        "latent_channels": int(dd["z_channels"]),
        "norm_num_groups": 32,
        "sample_size": resolution,
        "scaling_factor": float(scale_factor),
    }
    converted = _first_stage_state(state, levels)
    if target.endswith("VQModelInterface") or target.endswith("VQModel"):
        cls, config = (
            LatentDiffusionVQ,
            {
                **common,
                "num_vq_embeddings": int(params["n_embed"]),
                "vq_embed_dim": int(params["embed_dim"]),
            },
        )
    elif target.endswith("AutoencoderKL"):
        if int(params["embed_dim"]) != int(dd["z_channels"]):
            raise FormatError(
                f"the KL first stage has embed_dim {params['embed_dim']} != z_channels {dd['z_channels']}; "
                "diffusers' AutoencoderKL needs them equal"
            )
        cls, config = AutoencoderKL, common
    else:
        raise FormatError(
            f"first_stage_config.target {target!r} is neither a VQModelInterface nor an AutoencoderKL of "
            "latent diffusion"
        )
    with torch.device("meta"):
        model = cls(**config)
    load_strict(model, converted, "the LDM's first stage")
    model.register_to_config(image_range=[-1.0, 1.0])  # latent diffusion's first stages see [-1, 1]
    return model.eval()


def _class_conditioning(
    state: dict[str, torch.Tensor], params: dict[str, Any], unet_params: dict[str, Any]
) -> torch.Tensor | None:
    """The ClassEmbedder's table for cross-attention conditioning; None for label_emb conditioning."""
    if unet_params.get("num_classes") is not None:
        return None
    cond = params.get("cond_stage_config")
    target = str(cond.get("target", "")) if isinstance(cond, dict) else str(cond)
    if params.get("conditioning_key") == "crossattn" and target.endswith("ClassEmbedder"):
        if EMBEDDER_KEY not in state:
            raise FormatError(f"the config names a ClassEmbedder but the checkpoint has no {EMBEDDER_KEY!r}")
        return state[EMBEDDER_KEY]
    raise FormatError(
        f"the LDM is not class-conditional (conditioning_key={params.get('conditioning_key')!r}, "
        f"cond_stage_config={target!r}); LDCE-cls needs a class-conditional LDM such as cin256-v2 (a text-"
        "conditional one is a Stable Diffusion model for LDCE-txt)"
    )


def _check_schedule(state: dict[str, torch.Tensor], scheduler: DDIMScheduler) -> None:
    stored = state.get("alphas_cumprod")
    if stored is None:
        return
    ours = scheduler.alphas_cumprod
    if stored.shape != ours.shape or not torch.allclose(stored.double(), ours.double(), rtol=1e-4, atol=1e-6):
        raise FormatError(
            "the checkpoint's alphas_cumprod do not match the linear schedule its config states "
            "(linear_start, linear_end, timesteps); give the config the checkpoint was trained with"
        )


def convert_compvis_ldm(
    checkpoint: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    weights: str = "auto",
) -> ConvertedLDM:
    """Convert once (cached by the checkpoint's and config's sha256) and return the directories.

    ``weights``: "auto" (the EMA weights when the checkpoint has them and the config does not set
    ``use_ema: false``, as latent diffusion samples), "ema" or "model"."""
    if weights not in ("auto", "ema", "model"):
        raise FormatError(f"weights must be 'auto', 'ema' or 'model', not {weights!r}")
    ckpt = require_file(checkpoint, "the LDM checkpoint", "give the path of the .ckpt file")
    yaml_path = find_config(ckpt, config)
    params = read_config(yaml_path)
    key = hashlib.sha256(f"{sha256_file(ckpt)}:{sha256_file(yaml_path)}:{weights}".encode()).hexdigest()

    def convert(out: Path) -> dict:
        raw = read_checkpoint(ckpt, "the LDM checkpoint")
        state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise FormatError(f"{str(ckpt)!r} holds no state_dict of tensors; it is not an LDM checkpoint")
        unet_params = dict(params["unet_config"].get("params", {}))
        arch = unet_architecture(unet_params, "the LDM's unet_config")
        latent = params["first_stage_config"].get("params", {}).get("embed_dim")
        if latent is not None and not arch.in_channels == arch.out_channels == int(latent):
            raise FormatError(
                f"the LDM's UNet maps {arch.in_channels} to {arch.out_channels} channels but its first stage "
                f"makes {latent}-channel latents; an eps-predicting LDM maps latents to latents: "
                "the config's unet_config and first_stage_config do not belong together"
            )
        embedding = _class_conditioning(state, params, unet_params)
        unet_state, used = _unet_state(state, params, weights)
        scheduler = ldm_scheduler(params)
        _check_schedule(state, scheduler)
        unet = build_unet(unet_state, arch, "the LDM's UNet")
        denoiser = out / "denoiser"
        unet.save_pretrained(denoiser / "unet")
        scheduler.save_pretrained(denoiser / "scheduler")
        if embedding is not None:  # the ClassEmbedder's rows: the context token of each class
            from explain.nets.diffusion import CLASS_EMBEDDINGS_NAME

            save_file({"weight": embedding.float().contiguous()}, denoiser / CLASS_EMBEDDINGS_NAME)
        stage = {
            k[len(FIRST_STAGE_PREFIX) :]: v for k, v in state.items() if k.startswith(FIRST_STAGE_PREFIX)
        }
        if not stage:
            raise FormatError("the checkpoint has no first_stage_model.* tensors; LDCE needs the autoencoder")
        vae = build_first_stage(stage, params["first_stage_config"], float(params.get("scale_factor", 1.0)))
        vae.save_pretrained(out / "autoencoder")
        classes = embedding.shape[0] if embedding is not None else int(unet_params["num_classes"])
        return {
            "format": FORMAT,
            "checkpoint": str(ckpt),
            "config": str(yaml_path),
            "weights": used,
            "unet": type(unet).__name__,
            "autoencoder": type(vae).__name__,
            "class_embeddings": classes,
            "latent_channels": arch.in_channels,
        }

    return ConvertedLDM(cached_conversion(FORMAT, key, convert, cache_dir))


def load_converted_autoencoder(directory: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The first stage a conversion wrote (``LatentDiffusionVQ`` or ``AutoencoderKL``), in eval mode."""
    from explain.nets.autoencoder import input_range

    name = AutoencoderKL.load_config(directory).get("_class_name")
    cls = LatentDiffusionVQ if name == "LatentDiffusionVQ" else AutoencoderKL
    vae = cls.from_pretrained(directory, local_files_only=True, torch_dtype=dtype).eval()
    input_range(vae)
    return vae


def load_compvis_ldm(
    checkpoint: str | os.PathLike[str],
    config: str | os.PathLike[str] | None = None,
    *,
    num_classes: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    weights: str = "auto",
    dtype: torch.dtype = torch.float32,
):
    """(autoencoder, LatentDenoiser) for LDCE-cls from a CompVis LDM, converted once and cached.

    ``num_classes``: the classifier's class count; refused unless the LDM has exactly one more class
    embedding (the null class)."""
    from explain.nets.diffusion import load_denoiser

    converted = convert_compvis_ldm(checkpoint, config, cache_dir=cache_dir, weights=weights)
    denoiser = load_denoiser(converted.denoiser, torch_dtype=dtype)
    if num_classes is not None and denoiser.num_classes != num_classes:
        raise FormatError(
            f"the LDM has {denoiser.num_classes + 1} class embeddings ({denoiser.num_classes} classes "
            f"and the null class), but the classifier has {num_classes} classes; use an LDM trained on the "
            "classifier's classes"
        )
    return load_converted_autoencoder(converted.autoencoder, dtype), denoiser


def _options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(options) - {"config", "weights", "autoencoder"}
    if unknown:
        raise FormatError(
            f"the compvis-ldm formats take the options config and weights, not {sorted(unknown)}; e.g. "
            "--option config=/models/cin256-v2/config.yaml"
        )
    return {"config": options.get("config"), "weights": options.get("weights", "auto")}


def load_compvis_ldm_denoiser(path: Path, options: Mapping[str, Any], dtype: torch.dtype) -> Any:
    """Format ``compvis-ldm``: the LDM's denoiser (the ``.ckpt``; options ``config``, ``weights``)."""
    from explain.nets.diffusion import load_denoiser

    converted = convert_compvis_ldm(path, **_options(options))
    return load_denoiser(converted.denoiser, torch_dtype=dtype)


def load_compvis_ldm_autoencoder(path: Path, options: Mapping[str, Any], dtype: torch.dtype) -> Any:
    """Format ``compvis-ldm-autoencoder``: the LDM's first stage (the same ``.ckpt`` and options)."""
    converted = convert_compvis_ldm(path, **_options(options))
    return load_converted_autoencoder(converted.autoencoder, dtype)
