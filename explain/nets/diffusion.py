"""A class-conditional latent denoiser and its DDIM schedule, and a text-to-image model (Stable Diffusion).

The denoiser is trained with conditioning dropout (Ho & Salimans): label ``num_classes`` is the null class, so
one network gives both the conditional eps(z_t, c) and the unconditional eps(z_t) that LDCE's consensus
guidance compares. The platform trains a ``UNet2DModel`` with class embeddings, saved as ``unet/`` +
``scheduler/`` (diffusers format) + ``training.json``; the saved weights are an exponential moving average of
the trained ones (DDPM, Ho et al. 2020, and latent diffusion sample from the EMA weights; with a short CPU
budget the raw weights still jitter at the learning rate's noise floor). A researcher's denoiser may also be a
``UNet2DConditionModel`` that reads the class through cross-attention, as the latent diffusion model LDCE uses
(CompVis cin256: a class embedding table whose row is the context token): ``class_embeddings.safetensors``
(tensor ``weight``, (num_classes + 1, cross_attention_dim), the last row the null class) beside ``unet/``.

``TextToImage`` is a Stable Diffusion directory's parts (``vae/``, ``unet/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) without the pipeline around them, as LDCE-txt uses them.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel

from explain.nets.training_record import (
    Progress,
    StepLoop,
    batches,
    check_images,
    check_steps,
    data_summary,
    require_dir,
    write_record,
)


def denoiser_config(
    num_classes: int,
    latent_channels: int = 4,
    sample_size: int = 14,
    block_out_channels: tuple[int, ...] = (64, 128),
    norm_num_groups: int = 32,
) -> dict:
    """A small UNet2DModel over latents with ``num_classes + 1`` class embeddings (the last is the null
    class)."""
    n = len(block_out_channels)
    return {
        "sample_size": sample_size,
        "in_channels": latent_channels,
        "out_channels": latent_channels,
        "down_block_types": ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D"] + ["UpBlock2D"] * (n - 1),
        "block_out_channels": list(block_out_channels),
        "layers_per_block": 1,
        "norm_num_groups": norm_num_groups,
        "attention_head_dim": block_out_channels[-1] // 2,
        "num_class_embeds": num_classes + 1,
    }


def scheduler_config(num_train_timesteps: int = 1000) -> dict:
    return {
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


CLASS_EMBEDDINGS_NAME = "class_embeddings.safetensors"


@dataclass
class LatentDenoiser:
    """eps_theta(z_t, t, c) with ``null_class`` for the unconditional score, and its noise schedule.

    ``unet``: a ``UNet2DModel`` (or ``UNet2DConditionModel``) with ``num_class_embeds`` class embeddings, or a
    ``UNet2DConditionModel`` with ``class_embeddings`` (num_classes + 1, cross_attention_dim), the context
    token of each class. Latents go in and come out in float32 whatever the network's dtype."""

    unet: UNet2DModel | UNet2DConditionModel
    scheduler: DDIMScheduler
    class_embeddings: torch.Tensor | None = None

    @property
    def null_class(self) -> int:
        if self.class_embeddings is not None:
            return int(self.class_embeddings.shape[0]) - 1
        return int(self.unet.config.num_class_embeds) - 1

    @property
    def num_classes(self) -> int:
        return self.null_class

    def eps(self, z_t: torch.Tensor, t: torch.Tensor | int, labels: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        if isinstance(self.unet, UNet2DConditionModel):
            if self.class_embeddings is not None:
                context = self.class_embeddings.to(z_t.device, dtype)[labels].unsqueeze(1)
                return self.unet(z_t.to(dtype), t, encoder_hidden_states=context).sample.float()
            width = self.unet.config.cross_attention_dim
            context = torch.zeros((len(z_t), 1, width), device=z_t.device, dtype=dtype)
            out = self.unet(z_t.to(dtype), t, encoder_hidden_states=context, class_labels=labels)
            return out.sample.float()
        return self.unet(z_t.to(dtype), t, class_labels=labels).sample.float()

    def to(self, device: torch.device | str) -> LatentDenoiser:
        self.unet.to(device)
        if self.class_embeddings is not None:
            self.class_embeddings = self.class_embeddings.to(device)
        return self

    @property
    def name_or_path(self) -> str:
        return str(self.unet.config.get("_name_or_path", "") or "<unsaved LatentDenoiser>")


def train_denoiser(
    latents: torch.Tensor,
    labels: torch.Tensor,
    out_dir: str | os.PathLike[str],
    steps: int,
    *,
    num_classes: int,
    batch_size: int = 64,
    lr: float = 3e-4,
    p_uncond: float = 0.1,
    ema_decay: float | None = 0.999,
    config: dict | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    data_note: str = "",
) -> LatentDenoiser:
    """Train eps_theta on (scaled) ``latents`` (N, D, h, w) with class ``labels`` (N,), eps-prediction MSE.

    With probability ``p_uncond`` a label is replaced by the null class (classifier-free guidance training).
    ``ema_decay``: the weights saved are the EMA of the trained ones with this decay, warmed up as
    min(ema_decay, (1 + k) / (10 + k)) at step k (diffusers' ``EMAModel``); None saves the last weights.
    """
    check_images(latents, "latents")
    check_steps(steps, batch_size)
    if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1) (or be None: no averaging), not {ema_decay}")
    if labels.shape != (latents.shape[0],):
        raise ValueError(f"labels must have shape ({latents.shape[0]},), not {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1}, found {int(labels.min())}..{int(labels.max())}"
        )
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    cfg = config or denoiser_config(num_classes, latents.shape[1], latents.shape[-1])
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    unet = UNet2DModel(**cfg).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False) if ema_decay is not None else None
    scheduler = DDIMScheduler(**scheduler_config())
    alphas_cumprod = scheduler.alphas_cumprod
    optimiser = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    loop = StepLoop(steps, "latent denoiser", progress)
    start = time.perf_counter()
    null = num_classes
    for index in batches(len(latents), batch_size, steps, generator):
        z0, c = latents[index], labels[index].clone()
        drop = torch.rand(c.shape, generator=generator) < p_uncond
        c[drop] = null
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), generator=generator)
        eps = torch.randn(z0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps  # Eq. (2) of LDCE
        loss = torch.nn.functional.mse_loss(unet(z_t, t, class_labels=c).sample, eps)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if ema is not None:
            k = len(loop.losses)
            decay = min(ema_decay, (1 + k) / (10 + k))
            with torch.no_grad():
                for averaged, trained in zip(ema.parameters(), unet.parameters(), strict=True):
                    averaged.lerp_(trained, 1 - decay)
        loop.step(loss.item())
    loop.close()
    unet = ema if ema is not None else unet.eval()
    out = Path(out_dir)
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    write_record(
        out,
        {
            "kind": "latent_denoiser",
            "data": {**data_summary(latents, labels), "note": data_note},
            "hyperparameters": {
                "steps": steps,
                "batch_size": batch_size,
                "lr": lr,
                "p_uncond": p_uncond,
                "ema_decay": ema_decay,
            },
            "seconds": time.perf_counter() - start,
            **loop.summary(),
        },
    )
    return LatentDenoiser(unet=unet, scheduler=scheduler)


def load_denoiser(
    path: str | os.PathLike[str], *, torch_dtype: torch.dtype = torch.float32
) -> LatentDenoiser:
    """A LatentDenoiser from a directory holding ``unet/`` and ``scheduler/`` (diffusers format), and
    ``class_embeddings.safetensors`` when the unet is a ``UNet2DConditionModel`` that reads the class as its
    context."""
    from safetensors.torch import load_file

    root = Path(path)
    require_dir(root / "unet", "latent denoiser unet")
    name = json.loads((root / "unet" / "config.json").read_text()).get("_class_name", "UNet2DModel")
    kind = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}.get(name)
    if kind is None:
        raise ValueError(
            f"the unet in {path} is a {name}; a latent denoiser is a UNet2DModel or a UNet2DConditionModel"
        )
    unet = kind.from_pretrained(root, subfolder="unet", local_files_only=True, torch_dtype=torch_dtype)
    scheduler = DDIMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    embeddings = None
    if (root / CLASS_EMBEDDINGS_NAME).is_file():
        embeddings = load_file(root / CLASS_EMBEDDINGS_NAME)["weight"].to(torch_dtype)
    elif unet.config.get("num_class_embeds") is None:
        raise ValueError(
            f"the unet in {path} has no class embeddings (num_class_embeds is None and no "
            f"{CLASS_EMBEDDINGS_NAME} beside it); LDCE-cls needs a class-conditional denoiser trained with a "
            "null class (train_denoiser writes one)"
        )
    return LatentDenoiser(unet=unet.eval(), scheduler=scheduler, class_embeddings=embeddings)


@dataclass
class TextToImage:
    """A Stable Diffusion directory's parts: latent autoencoder (input range [-1, 1]), text-conditional
    ``UNet2DConditionModel``, CLIP text encoder and tokenizer, and its DDIM schedule."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    scheduler: DDIMScheduler
    path: str = ""

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), tokens, width) text-encoder states, padded and truncated to the tokenizer's length."""
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    def to(self, device: torch.device | str) -> TextToImage:
        for module in (self.vae, self.unet, self.text_encoder):
            module.to(device)
        return self

    @property
    def name_or_path(self) -> str:
        return self.path or "<unsaved TextToImage>"


STABLE_DIFFUSION_PARTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")


def load_stable_diffusion(
    path: str | os.PathLike[str], *, torch_dtype: torch.dtype = torch.float32
) -> TextToImage:
    """The parts of a local Stable Diffusion directory (``StableDiffusionPipeline.save_pretrained``), each
    loaded once with ``local_files_only``; the autoencoder's input range is Stable Diffusion's, [-1, 1]."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from explain.nets.autoencoder import load_autoencoder

    root = Path(path)
    missing = [part for part in STABLE_DIFFUSION_PARTS if not (root / part).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{str(root)!r} is not a local Stable Diffusion directory: it lacks {', '.join(missing)}/ (it "
            f"needs {', '.join(STABLE_DIFFUSION_PARTS)}); save one once with "
            "StableDiffusionPipeline.save_pretrained and pass its path"
        )
    vae = load_autoencoder(root, "vae", image_range=[-1.0, 1.0], torch_dtype=torch_dtype)
    unet = UNet2DConditionModel.from_pretrained(
        root, subfolder="unet", local_files_only=True, torch_dtype=torch_dtype
    )
    text_encoder = CLIPTextModel.from_pretrained(
        root, subfolder="text_encoder", local_files_only=True, dtype=torch_dtype
    )
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    scheduler = DDIMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    return TextToImage(
        vae=vae,
        unet=unet.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        path=str(root),
    )
