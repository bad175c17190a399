"""The latent autoencoder (diffusers ``AutoencoderKL``): trained by the platform on the study's images, or
loaded from any local diffusers directory (e.g. a Stable Diffusion ``vae`` folder).

Images are in the classifier's input scale: values in [0, 1], C channels (the embedded default: grey, 28 x
28). An autoencoder states what it expects in its config: ``image_range`` (``[0, 1]`` for one trained here,
``[-1, 1]`` for a Stable Diffusion VAE) and ``in_channels``. ``encode`` maps images into that range and
channel count (grey repeated to 3 channels), ``decode`` maps back (3 channels to grey by their mean); an
autoencoder that does not state its range, or whose channels cannot be converted, is refused with a message.
Latents are the posterior means scaled by ``config.scaling_factor``, as the latent denoiser sees them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

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


def autoencoder_config(
    in_channels: int = 1,
    latent_channels: int = 4,
    block_out_channels: tuple[int, ...] = (32, 64),
    sample_size: int = 28,
    norm_num_groups: int = 16,
) -> dict:
    """A small AutoencoderKL: one downsampling per extra block (two blocks: 28 px -> 14 x 14 latents)."""
    n = len(block_out_channels)
    return {
        "in_channels": in_channels,
        "out_channels": in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "scaling_factor": 1.0,
        "mid_block_add_attention": False,
        "image_range": [0.0, 1.0],
    }


def new_autoencoder(config: dict) -> AutoencoderKL:
    """An untrained AutoencoderKL from ``autoencoder_config``'s dict (``image_range`` kept in its config)."""
    cfg = dict(config)
    image_range = cfg.pop("image_range", None)
    if image_range is None:
        raise ValueError(
            "the autoencoder config does not state its input range: add image_range=[0.0, 1.0] (images as "
            "the classifier sees them) or [-1.0, 1.0] (a Stable Diffusion VAE)"
        )
    vae = AutoencoderKL(**cfg)
    vae.register_to_config(image_range=[float(v) for v in image_range])
    return vae


def input_range(vae: AutoencoderKL) -> tuple[float, float]:
    """(low, high) of the images the autoencoder was trained on, from its config; refused when unstated."""
    value = vae.config.get("image_range")
    if value is None or len(value) != 2 or not value[0] < value[1]:
        raise ValueError(
            f"the autoencoder's config states image_range={value!r}; it must state the range of its "
            'input images: add "image_range": [-1.0, 1.0] to the config.json of a Stable Diffusion VAE, '
            "or [0.0, 1.0] for one trained on images in [0, 1]"
        )
    return float(value[0]), float(value[1])


def to_autoencoder(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] with C channels -> the autoencoder's range and channel count."""
    low, high = input_range(vae)
    wanted = vae.config.in_channels
    if x.shape[1] != wanted:
        if x.shape[1] == 1 and wanted == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            raise ValueError(
                f"the autoencoder takes {wanted}-channel images but these have {x.shape[1]}; only grey "
                "images are converted (to 3 channels): use an autoencoder trained on images like these"
            )
    return (x * (high - low) + low).to(vae.dtype)


def from_autoencoder(vae: AutoencoderKL, y: torch.Tensor, channels: int | None) -> torch.Tensor:
    """The autoencoder's output -> images in [0, 1] with ``channels`` channels (None: the autoencoder's)."""
    low, high = input_range(vae)
    x = (y.float() - low) / (high - low)
    if channels is not None and channels != x.shape[1]:
        if channels == 1:
            return x.mean(1, keepdim=True)
        raise ValueError(
            f"cannot turn the autoencoder's {x.shape[1]}-channel output into {channels} channels"
        )
    return x


def encode(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """z = E(x) for images in [0, 1]: the posterior mean, scaled for the denoiser (deterministic; float32
    whatever the autoencoder's dtype)."""
    return vae.encode(to_autoencoder(vae, x)).latent_dist.mean.float() * vae.config.scaling_factor


def decode(vae: AutoencoderKL, z: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """x = D(z), in [0, 1]'s scale with ``channels`` channels (None: the autoencoder's own)."""
    z = (z / vae.config.scaling_factor).to(vae.dtype)
    return from_autoencoder(vae, vae.decode(z).sample, channels)


def train_autoencoder(
    images: torch.Tensor,
    out_dir: str | os.PathLike[str],
    steps: int,
    *,
    batch_size: int = 64,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    config: dict | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    data_note: str = "",
) -> AutoencoderKL:
    """Train an AutoencoderKL on ``images`` (N, C, H, W) with L1 reconstruction + ``kl_weight`` * KL.

    Saves ``out_dir`` (save_pretrained) and ``out_dir/training.json``; returns the model in eval mode. The
    latent scaling factor is set to 1 / std of the trained latents, as in latent diffusion.
    """
    check_images(images)
    check_steps(steps, batch_size)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    cfg = config or autoencoder_config(in_channels=images.shape[1], sample_size=images.shape[-1])
    if cfg["in_channels"] != images.shape[1]:
        raise ValueError(
            f"config has in_channels={cfg['in_channels']} but images have {images.shape[1]} channels"
        )
    if cfg.get("image_range", [0.0, 1.0]) != [0.0, 1.0]:
        raise ValueError(f"images here are in [0, 1]; the config says image_range={cfg['image_range']!r}")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    vae = new_autoencoder({**cfg, "image_range": [0.0, 1.0]}).train()
    optimiser = torch.optim.Adam(vae.parameters(), lr=lr)
    loop = StepLoop(steps, "autoencoder", progress)
    start = time.perf_counter()
    for index in batches(len(images), batch_size, steps, generator):
        x = images[index]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(z).sample
        l1 = (reconstruction - x).abs().mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + kl_weight * kl
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        loop.step(loss.item(), l1=l1.item())
    loop.close()
    vae.eval()
    with torch.no_grad():
        sample = images[torch.randperm(len(images), generator=generator)[:512]]
        std = float(vae.encode(sample).latent_dist.mean.std())
        reconstruction_l1 = float(
            (vae.decode(vae.encode(sample).latent_dist.mean).sample - sample).abs().mean()
        )
    vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
    out = Path(out_dir)
    vae.save_pretrained(out)
    write_record(
        out,
        {
            "kind": "autoencoder",
            "data": {**data_summary(images), "note": data_note},
            "hyperparameters": {"steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight},
            "seconds": time.perf_counter() - start,
            "reconstruction_l1": reconstruction_l1,
            **loop.summary(),
        },
    )
    return vae


def load_autoencoder(
    path: str | os.PathLike[str],
    subfolder: str | None = None,
    *,
    image_range: list[float] | None = None,
    torch_dtype: torch.dtype = torch.float32,
) -> AutoencoderKL:
    """An AutoencoderKL from a local directory (e.g. ``path=<stable diffusion dir>, subfolder="vae"``,
    ``image_range=[-1.0, 1.0]``). ``image_range`` states the input range when the config does not; one the
    platform trained (with its ``training.json``) without the key in its config was trained on [0, 1].
    ``torch_dtype``: float32 (the default, and always on a CPU) or float16 where a method allows it on a GPU;
    ``encode`` and ``decode`` take and give float32 either way."""
    directory = Path(path) / (subfolder or "")
    require_dir(directory, "autoencoder")
    vae = AutoencoderKL.from_pretrained(
        path, subfolder=subfolder, local_files_only=True, torch_dtype=torch_dtype
    )
    if image_range is not None:
        vae.register_to_config(image_range=[float(v) for v in image_range])
    elif vae.config.get("image_range") is None and (directory / "training.json").is_file():
        vae.register_to_config(image_range=[0.0, 1.0])
    input_range(vae)  # refuse now, naming the fix, rather than at the first encode
    return vae.eval()
