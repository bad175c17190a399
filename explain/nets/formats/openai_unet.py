"""The openaimodel UNet (guided-diffusion / ADM, and latent-diffusion's copy of it) mapped onto diffusers.

The original layout: ``time_embed.{0,2}``, ``label_emb`` (class conditioning added to the time embedding),
``input_blocks.N.M`` (N runs over the stem conv, then per resolution level ``num_res_blocks`` ResBlocks each
with an optional attention, then a downsampler), ``middle_block.{0,1,2}`` (ResBlock, attention, ResBlock),
``output_blocks.N.M`` (per level, from the deepest, ``num_res_blocks + 1`` ResBlocks on the concatenated skip,
an optional attention, an upsampler), ``out.{0,2}``. Attention is an ``AttentionBlock`` (one 1-d conv ``qkv``
whose channels are ordered per head as [q, k, v] in the legacy order, or as [q..., k..., v...] in the new one)
or, in latent diffusion, a ``SpatialTransformer`` (self- and cross-attention on a context).

``unet_architecture`` normalises the constructor arguments; ``diffusers_unet_config`` gives the equivalent
``UNet2DModel`` (AttentionBlock) or ``UNet2DConditionModel`` (SpatialTransformer) config, or refuses what
diffusers cannot express; ``convert_unet_state_dict`` renames (and splits) every tensor, and
``build_unet`` loads them into the diffusers model, strictly: every key used, every weight set, every shape
checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from explain.nets.formats.common import FormatError

GROUPS = 32  # openaimodel's normalization(): GroupNorm32(32, channels)


@dataclass(frozen=True)
class UNetArchitecture:
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]  # downsampling rates ds (1, 2, 4, ...) that carry attention
    channel_mult: tuple[int, ...]
    num_heads: int = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    num_classes: int | None = None
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    image_size: int = 64

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    def channels(self, level: int) -> int:
        return self.model_channels * self.channel_mult[level]

    def has_attention(self, level: int) -> bool:
        return 2**level in self.attention_resolutions

    def heads(self, channels: int, upsampling: bool = False) -> int:
        """The number of attention heads on ``channels`` channels, as openaimodel computes it."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels
        if upsampling and not self.use_spatial_transformer and self.num_heads_upsample != -1:
            return self.num_heads_upsample
        return self.num_heads


UNET_ARGUMENTS = {f for f in UNetArchitecture.__dataclass_fields__}
IGNORED_ARGUMENTS = {"dropout", "use_checkpoint", "use_fp16", "dims", "conv_resample", "legacy", "n_embed"}


def unet_architecture(params: dict[str, Any], where: str) -> UNetArchitecture:
    """A ``UNetArchitecture`` from openaimodel's constructor arguments (``unet_config.params`` of a
    latent-diffusion YAML, or guided-diffusion's ``UNetModel`` arguments); ``where`` names their source in
    errors."""
    required = ("in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions")
    missing = [k for k in required if k not in params]
    if missing:
        raise FormatError(f"{where} lacks the UNet arguments {missing}; give the model's original config")
    if int(params.get("dims", 2)) != 2:
        raise FormatError(f"{where} has dims={params['dims']}; only 2-d image UNets are supported")
    if params.get("conv_resample", True) is False:
        raise FormatError(f"{where} has conv_resample=False, which diffusers' UNets cannot express")
    if params.get("n_embed") is not None:
        raise FormatError(f"{where} predicts codebook ids (n_embed); LDCE needs an eps-predicting UNet")
    if params.get("legacy", True) is False and params.get("use_spatial_transformer"):
        raise FormatError(
            f"{where} has legacy=False; only the released (legacy=True) head layout is supported"
        )
    unknown = set(params) - UNET_ARGUMENTS - IGNORED_ARGUMENTS
    if unknown:
        raise FormatError(f"{where} has UNet arguments this converter does not know: {sorted(unknown)}")
    kwargs = {k: v for k, v in params.items() if k in UNET_ARGUMENTS}
    kwargs["attention_resolutions"] = tuple(int(r) for r in params["attention_resolutions"])
    kwargs["channel_mult"] = tuple(int(m) for m in params.get("channel_mult", (1, 2, 4, 8)))
    context = kwargs.get("context_dim")
    if isinstance(context, list | tuple):
        if len(set(context)) != 1:
            raise FormatError(f"{where} has per-level context_dim {context}; one context size is supported")
        kwargs["context_dim"] = int(context[0])
    arch = UNetArchitecture(**kwargs)
    if arch.num_heads == -1 and arch.num_head_channels == -1:
        raise FormatError(f"{where} sets neither num_heads nor num_head_channels; openaimodel needs one")
    for level in range(arch.levels):
        if arch.channels(level) % GROUPS:
            raise FormatError(
                f"{where}: level {level} has {arch.channels(level)} channels, not a multiple of the {GROUPS} "
                "group-norm groups; the config does not describe an openaimodel UNet"
            )
    return arch


def diffusers_unet_config(arch: UNetArchitecture) -> tuple[type, dict]:
    """(UNet2DModel or UNet2DConditionModel, its config) computing the same function as ``arch``."""
    n = arch.levels
    common = {
        "sample_size": arch.image_size,
        "in_channels": arch.in_channels,
        "out_channels": arch.out_channels,
        "block_out_channels": [arch.channels(level) for level in range(n)],
        "layers_per_block": arch.num_res_blocks,
        "norm_num_groups": GROUPS,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,  # timestep_embedding: cat([cos, sin])
        "freq_shift": 0,
        "downsample_padding": 1,
        "resnet_time_scale_shift": "scale_shift" if arch.use_scale_shift_norm else "default",
        "num_class_embeds": arch.num_classes,
    }
    if arch.use_spatial_transformer:
        if arch.resblock_updown:
            raise FormatError("a SpatialTransformer UNet with resblock_updown has no diffusers equivalent")
        heads = [arch.heads(arch.channels(level)) for level in range(n)]
        down = ["CrossAttnDownBlock2D" if arch.has_attention(lv) else "DownBlock2D" for lv in range(n)]
        up = ["CrossAttnUpBlock2D" if arch.has_attention(lv) else "UpBlock2D" for lv in reversed(range(n))]
        return UNet2DConditionModel, {
            **common,
            "down_block_types": down,
            "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "cross_attention_dim": arch.context_dim,
            "attention_head_dim": heads,  # diffusers' name for the number of heads here
            "transformer_layers_per_block": arch.transformer_depth,
            "use_linear_projection": False,
            "act_fn": "silu",
        }
    if arch.context_dim is not None:
        raise FormatError("context_dim is set but use_spatial_transformer is not; the config is inconsistent")
    dims = set()
    for level in [lv for lv in range(n) if arch.has_attention(lv)] + [n - 1]:
        ch = arch.channels(level)
        dims.add(ch // arch.heads(ch))
        if arch.has_attention(level):
            dims.add(ch // arch.heads(ch, upsampling=True))
    if len(dims) != 1:
        raise FormatError(
            f"the UNet's attention blocks use different head sizes {sorted(dims)} (num_heads is fixed while "
            "channels change); diffusers' UNet2DModel needs one head size: such a model cannot be converted"
        )
    resample = "resnet" if arch.resblock_updown else "conv"
    plain_down = "ResnetDownsampleBlock2D" if arch.resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if arch.resblock_updown else "UpBlock2D"
    return UNet2DModel, {
        **common,
        "down_block_types": ["AttnDownBlock2D" if arch.has_attention(lv) else plain_down for lv in range(n)],
        "up_block_types": [
            "AttnUpBlock2D" if arch.has_attention(lv) else plain_up for lv in reversed(range(n))
        ],
        "downsample_type": resample,
        "upsample_type": resample,
        "attention_head_dim": dims.pop(),
        "attn_norm_num_groups": GROUPS,
        "add_attention": True,
        "act_fn": "silu",
    }


def _blocks(arch: UNetArchitecture) -> list[tuple[str, str, str]]:
    """(original prefix, diffusers prefix, kind) for every module of the UNet, walking both layouts."""
    attention = "transformer" if arch.use_spatial_transformer else "attention"
    resample = "resblock" if arch.resblock_updown else "conv"
    blocks = [
        ("input_blocks.0.0", "conv_in", "plain"),
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
        ("out.0", "conv_norm_out", "plain"),
        ("out.2", "conv_out", "plain"),
    ]
    if arch.num_classes is not None:
        blocks.append(("label_emb", "class_embedding", "plain"))
    index = 1
    for level in range(arch.levels):
        for j in range(arch.num_res_blocks):
            blocks.append((f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", "resblock"))
            if arch.has_attention(level):
                blocks.append((f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", attention))
            index += 1
        if level != arch.levels - 1:
            original = f"input_blocks.{index}.0" + ("" if arch.resblock_updown else ".op")
            new = f"down_blocks.{level}.downsamplers.0" + ("" if arch.resblock_updown else ".conv")
            blocks.append((original, new, "resblock" if resample == "resblock" else "plain"))
            index += 1
    blocks += [
        ("middle_block.0", "mid_block.resnets.0", "resblock"),
        ("middle_block.1", "mid_block.attentions.0", attention),
        ("middle_block.2", "mid_block.resnets.1", "resblock"),
    ]
    index = 0
    for up, level in enumerate(reversed(range(arch.levels))):
        for j in range(arch.num_res_blocks + 1):
            blocks.append((f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{j}", "resblock"))
            sub = 1
            if arch.has_attention(level):
                blocks.append((f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{j}", attention))
                sub = 2
            if level and j == arch.num_res_blocks:
                original = f"output_blocks.{index}.{sub}" + ("" if arch.resblock_updown else ".conv")
                new = f"up_blocks.{up}.upsamplers.0" + ("" if arch.resblock_updown else ".conv")
                blocks.append((original, new, "resblock" if resample == "resblock" else "plain"))
            index += 1
    return blocks


RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _split_qkv(weight: torch.Tensor, heads: int, new_order: bool) -> list[torch.Tensor]:
    """q, k, v from a ``qkv`` conv1d weight (3C, C, 1) or bias (3C,), as (C, C) / (C,) tensors."""
    c3 = weight.shape[0]
    c = c3 // 3
    rest = weight.shape[1:2] if weight.ndim > 1 else ()
    if new_order:  # QKVAttention: chunk(3) first, then heads
        parts = weight.reshape(3, c, *rest)
    else:  # QKVAttentionLegacy: heads first, each [q, k, v]
        parts = weight.reshape(heads, 3, c // heads, *rest).transpose(0, 1).reshape(3, c, *rest)
    return [p.contiguous() for p in parts]


def convert_unet_state_dict(
    state: dict[str, torch.Tensor], arch: UNetArchitecture, where: str
) -> dict[str, torch.Tensor]:
    """The diffusers state dict for an openaimodel state dict (keys without any ``model.diffusion_model.``
    prefix); every original key must be used."""
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise FormatError(
                f"{where} has no {key!r}, which the UNet config implies; the checkpoint and the config "
                "describe different models: give the config the checkpoint was trained with"
            )
        used.add(key)
        return state[key]

    def optional(prefix: str) -> list[str]:
        return [k for k in state if k.startswith(prefix + ".")]

    for original, new, kind in _blocks(arch):
        if kind == "plain":
            for key in optional(original):
                out[new + key[len(original) :]] = take(key)
        elif kind == "resblock":
            for key in optional(original):
                rest = key[len(original) + 1 :]
                module, _, leaf = rest.rpartition(".")
                if module not in RESBLOCK:
                    raise FormatError(f"{where}: unexpected tensor {key!r} in a ResBlock")
                out[f"{new}.{RESBLOCK[module]}.{leaf}"] = take(key)
        elif kind == "attention":
            weight, bias = take(f"{original}.qkv.weight"), take(f"{original}.qkv.bias")
            channels = weight.shape[1]
            heads = arch.heads(channels, upsampling=original.startswith("output_blocks"))
            for name, w, b in zip(
                ("to_q", "to_k", "to_v"),
                _split_qkv(weight[..., 0], heads, arch.use_new_attention_order),
                _split_qkv(bias, heads, arch.use_new_attention_order),
                strict=True,
            ):
                out[f"{new}.{name}.weight"], out[f"{new}.{name}.bias"] = w, b
            out[f"{new}.to_out.0.weight"] = take(f"{original}.proj_out.weight")[..., 0]
            out[f"{new}.to_out.0.bias"] = take(f"{original}.proj_out.bias")
            out[f"{new}.group_norm.weight"] = take(f"{original}.norm.weight")
            out[f"{new}.group_norm.bias"] = take(f"{original}.norm.bias")
        else:  # transformer: diffusers' Transformer2DModel keeps latent diffusion's names
            for key in optional(original):
                out[new + key[len(original) :]] = take(key)
    left = sorted(set(state) - used)
    if left:
        raise FormatError(
            f"{where} has {len(left)} UNet tensors the config does not account for (first: {left[:3]}); the "
            "checkpoint and the config describe different models: give the config it was trained with"
        )
    return out


def build_unet(
    state: dict[str, torch.Tensor], arch: UNetArchitecture, where: str
) -> UNet2DModel | UNet2DConditionModel:
    """The diffusers UNet holding ``state`` (original layout), built without a second random copy."""
    cls, config = diffusers_unet_config(arch)
    converted = convert_unet_state_dict(state, arch, where)
    with torch.device("meta"):
        model = cls(**config)
    load_strict(model, converted, where)
    return model.eval()


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict, assign)`` with shape mismatches and missing weights named for the user."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)}, config {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or extra or wrong:
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {extra[:3]}" if extra else "",
                f"shape mismatch {wrong[:2]}" if wrong else "",
            )
            if part
        )
        raise FormatError(
            f"{where} does not fit the architecture its config describes ({details}); give the config the "
            "checkpoint was trained with"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
