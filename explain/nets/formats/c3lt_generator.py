"""A generator and encoder pair for C3LT (Khorram & Fuxin 2022): x' = G(g^n(E(x))) with the paper's GAN.

C3LT's release pairs a DCGAN generator G (``Generator(latent_dim, nc, ngf)``: transposed convolutions from a
``latent_dim x 1 x 1`` code to a 28 x 28 image in [-1, 1], tanh) with an encoder E trained to invert it
(``EncoderDCGAN(latent_dim, nc, ndf)``: convolutions from the image to a ``latent_dim x 1 x 1`` code). A
directory of this format holds the two networks and ``generator.json``, which declares what the files cannot::

    {"format": "torchscript" | "dcgan-state-dict", "generator": "netG.pt", "encoder": "encoder.pt",
     "latent_shape": [100, 1, 1], "image_channels": 1, "image_size": 28, "image_range": [-1, 1]}

``torchscript``: any G and E saved with ``torch.jit.save`` (architecture in the file); ``dcgan-state-dict``:
state dicts of C3LT's DCGAN classes (``main.N.*``; widths read from the shapes). ``GeneratorPair`` gives the
interface the methods use of an autoencoder (``encode(x).latent_dist.mean``, ``decode(z).sample``, a config
with ``in_channels``, ``latent_channels``, ``image_range``, ``scaling_factor``), so C3LT's latent maps are
trained on its codes and C3LT runs with it as its ``autoencoder``: registered as format ``c3lt-generator`` of
kind ``autoencoder``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import nn

from explain.nets.formats.common import FormatError, read_checkpoint, require_file

MANIFEST = "generator.json"
KINDS = ("torchscript", "dcgan-state-dict")


class DCGANGenerator(nn.Module):
    """C3LT's MNIST generator: (latent, 1, 1) -> (nc, 28, 28) in [-1, 1]."""

    def __init__(self, latent_dim: int, nc: int = 1, ngf: int = 64):
        super().__init__()
        widths = [latent_dim, ngf * 8, ngf * 4, ngf * 2, ngf]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
            stride, padding = (1, 0) if i == 0 else (2, 1)
            layers += [
                nn.ConvTranspose2d(a, b, 4, stride, padding, bias=False),
                nn.BatchNorm2d(b),
                nn.ReLU(True),
            ]
        layers += [nn.ConvTranspose2d(ngf, nc, kernel_size=1, stride=1, padding=2, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class DCGANEncoder(nn.Module):
    """C3LT's encoder: (nc, 28, 28) -> (latent, 1, 1)."""

    def __init__(self, latent_dim: int, nc: int = 1, ndf: int = 64):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, latent_dim, 4, 2, 1, bias=False),
            nn.BatchNorm2d(latent_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class GeneratorPair(nn.Module):
    """E and G behind the autoencoder interface: latents are E(x) reshaped to ``latent_shape`` (C, h, w)."""

    def __init__(
        self,
        generator: nn.Module,
        encoder: nn.Module,
        *,
        latent_shape: tuple[int, ...],
        image_channels: int,
        image_size: int,
        image_range: tuple[float, float] = (-1.0, 1.0),
        name_or_path: str = "",
    ):
        super().__init__()
        self.generator, self.encoder = generator, encoder
        self.code_shape = tuple(int(v) for v in latent_shape)  # what G takes and E gives
        self.latent_shape = self.code_shape + (1,) * (3 - len(self.code_shape))  # a flat code: C x 1 x 1
        self.config = FrozenDict(
            in_channels=image_channels,
            out_channels=image_channels,
            latent_channels=self.latent_shape[0],
            latent_shape=list(self.latent_shape),
            sample_size=image_size,
            image_range=[float(v) for v in image_range],
            scaling_factor=1.0,
            _name_or_path=name_or_path,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, x: torch.Tensor) -> AutoencoderKLOutput:
        z = self.encoder(x).reshape(len(x), *self.latent_shape)
        return AutoencoderKLOutput(
            latent_dist=DiagonalGaussianDistribution(
                torch.cat([z, torch.zeros_like(z)], 1), deterministic=True
            )
        )

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        return DecoderOutput(sample=self.generator(z.reshape(len(z), *self.code_shape)))


def _read_manifest(root: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise FormatError(
            f"{str(root)!r} has no {MANIFEST}: a generator and encoder pair needs its declared latent shape; "
            f'write {MANIFEST} with {{"format": "torchscript" or "dcgan-state-dict", "generator": FILE, '
            '"encoder": FILE, "latent_shape": [100, 1, 1], "image_channels": 1, "image_size": 28, '
            '"image_range": [-1, 1]}'
        )
    try:
        manifest = {**json.loads(path.read_text()), **dict(options)}
    except json.JSONDecodeError as error:
        raise FormatError(f"{str(path)!r} is not valid JSON ({error}); write it again") from error
    missing = [
        k
        for k in ("format", "generator", "encoder", "latent_shape", "image_channels", "image_size")
        if k not in manifest
    ]
    if missing:
        raise FormatError(
            f"{str(path)!r} lacks {missing}; state them (see explain.nets.formats.c3lt_generator)"
        )
    if manifest["format"] not in KINDS:
        raise FormatError(f"{MANIFEST} names format {manifest['format']!r}; it must be one of {list(KINDS)}")
    return manifest


def _load_module(file: Path, kind: str, role: str, manifest: dict[str, Any]) -> nn.Module:
    if kind == "torchscript":
        require_file(file, f"the {role}", f"give the file named in {MANIFEST}")
        try:
            return torch.jit.load(str(file), map_location="cpu")
        except Exception as error:  # a truncated archive or a non-TorchScript file
            raise FormatError(
                f"the {role} {str(file)!r} ({file.stat().st_size} bytes) cannot be read as TorchScript "
                f"({str(error).splitlines()[0]}); it is probably truncated: copy it again, or save it with "
                "torch.jit.save"
            ) from error
    state = read_checkpoint(file, f"the {role}")
    if not isinstance(state, dict) or "main.0.weight" not in state:
        raise FormatError(f"the {role} {str(file)!r} is not a state dict of C3LT's DCGAN (no main.0.weight)")
    first = state["main.0.weight"]
    if role == "generator":  # ConvTranspose2d(latent, ngf * 8): weight (latent, ngf * 8, 4, 4)
        nc = state["main.12.weight"].shape[1] if "main.12.weight" in state else 1
        module: nn.Module = DCGANGenerator(first.shape[0], nc, first.shape[1] // 8)
    else:  # Conv2d(nc, ndf): weight (ndf, nc, 4, 4)
        last = state["main.9.weight"].shape[0] if "main.9.weight" in state else first.shape[0]
        module = DCGANEncoder(last, first.shape[1], first.shape[0])
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise FormatError(
            f"the {role} {str(file)!r} does not fit C3LT's DCGAN ({str(error).splitlines()[0]} ...); give "
            "the state dict of its Generator / EncoderDCGAN, or save the networks as TorchScript"
        ) from error
    return module


def load_generator_pair(
    path: str | os.PathLike[str], options: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> GeneratorPair:
    """A ``GeneratorPair`` from a directory with ``generator.json`` (``options`` override its entries),
    checked on a blank image of the declared size: channels and latent shape."""
    root = Path(path)
    if not root.is_dir():
        raise FormatError(f"{str(root)!r} is not a directory; give the directory holding {MANIFEST}")
    manifest = _read_manifest(root, options or {})
    kind = manifest["format"]
    generator = _load_module(root / manifest["generator"], kind, "generator", manifest)
    encoder = _load_module(root / manifest["encoder"], kind, "encoder", manifest)
    pair = GeneratorPair(
        generator.eval(),
        encoder.eval(),
        latent_shape=tuple(manifest["latent_shape"]),
        image_channels=int(manifest["image_channels"]),
        image_size=int(manifest["image_size"]),
        image_range=tuple(manifest.get("image_range", (-1.0, 1.0))),
        name_or_path=str(root),
    ).to(dtype)
    channels, size = int(manifest["image_channels"]), int(manifest["image_size"])
    blank = torch.zeros(2, channels, size, size, dtype=dtype)
    with torch.no_grad():
        try:
            code = encoder(blank)
        except RuntimeError as error:
            raise FormatError(
                f"the encoder does not take {channels}-channel {size} x {size} images "
                f"({str(error).splitlines()[0]}); state the image_channels and image_size it was trained on"
            ) from error
        if code[0].numel() != math.prod(pair.latent_shape):
            raise FormatError(
                f"the encoder gives {tuple(code.shape[1:])} codes but {MANIFEST} declares latent_shape "
                f"{list(manifest['latent_shape'])}; declare the encoder's latent shape"
            )
        image = pair.decode(pair.encode(blank).latent_dist.mean).sample
    if tuple(image.shape[1:]) != (channels, size, size):
        raise FormatError(
            f"the generator makes {tuple(image.shape[1:])} images from the encoder's codes, not "
            f"({channels}, {size}, {size}); the generator and encoder do not belong together"
        )
    return pair


def load_c3lt_generator(path: Path, options: Mapping[str, Any], dtype: torch.dtype) -> GeneratorPair:
    """Format ``c3lt-generator`` (kind autoencoder): ``load_generator_pair``."""
    return load_generator_pair(path, options, dtype)
