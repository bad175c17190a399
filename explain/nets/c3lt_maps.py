"""C3LT's latent maps (Khorram & Fuxin, CVPR 2022): g takes class c's latent codes to class c', h takes
them back.

Both are residual conv nets on the autoencoder's latents, applied n times (g^n, an Euler-like decomposition).
Trained per class pair (Eq. 2) with the classification (Eq. 4), proximity (Eq. 5: L1 + entropy + smoothness of
the change mask), cycle (Eq. 6) and adversarial (Eq. 7) losses, weighted by Eq. (11): 1, alpha, beta, gamma.
The cycle loss's perceptual term sums over the layers L of the explained classifier's f (``cycle_layers``):
the output of every activation and every block among f's top-level children, and f's output; each layer's
L1 distance is a mean over its elements (the paper writes sums; means keep the layers on one scale).
The pixel L1 terms of Eq. (5) and (6) are measured on the paper's image scale, [-1, 1] (its release normalises
with mean 0.5 and std 0.5; ours are in [0, 1]): 2 |x - x'| on our images, so alpha and beta weigh them as the
paper's values do (``pixel_scale``; the platform's reported L1 stays on [0, 1]).
Saved as ``g/``, ``h/``, ``discriminator/`` (diffusers format), ``pair.json`` and ``training.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from explain.nets.autoencoder import decode, encode
from explain.nets.discriminator import Discriminator
from explain.nets.split import SplitClassifier, frozen
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

PAIR_NAME = "pair.json"
PAPER_PIXEL_SCALE = 2.0  # |x - x'| on [-1, 1] images (the paper's) is twice that on [0, 1] images (ours)


class LatentMap(ModelMixin, ConfigMixin):
    """z -> z + net(z), a small residual conv net in latent space."""

    @register_to_config
    def __init__(self, latent_channels: int = 4, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, latent_channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.net(z)


def apply_n(map_: nn.Module, z: torch.Tensor, n: int) -> torch.Tensor:
    """map_^n(z) = map_(map_(...map_(z)))."""
    for _ in range(n):
        z = map_(z)
    return z


@dataclass
class C3LTMaps:
    """g: class_a -> class_b and h: class_b -> class_a, each applied ``n`` times."""

    g: LatentMap
    h: LatentMap
    class_a: int
    class_b: int
    n: int = 1

    def towards(self, target: int) -> LatentMap:
        if target == self.class_b:
            return self.g
        if target == self.class_a:
            return self.h
        raise ValueError(
            f"these C3LT maps were trained for classes {self.class_a} <-> {self.class_b}; target {target} is "
            "neither. Train maps for that pair (train_c3lt_maps) and use them instead"
        )

    @property
    def name_or_path(self) -> str:
        return str(self.g.config.get("_name_or_path", "") or "<unsaved C3LTMaps>").removesuffix("/g")


def mask_entropy(m: torch.Tensor) -> torch.Tensor:
    """Binary entropy of the normalised change mask, mean per image (ExplainGAN's L_entr)."""
    m = m.clamp(1e-6, 1 - 1e-6)
    return (-(m * m.log()) - (1 - m) * (1 - m).log()).flatten(1).mean(1)


def mask_smoothness(m: torch.Tensor) -> torch.Tensor:
    """Total variation of the change mask, mean per image (ExplainGAN's L_smth)."""
    dx = (m[..., :, 1:] - m[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (m[..., 1:, :] - m[..., :-1, :]).abs().flatten(1).mean(1)
    return dx + dy


def change_mask(x: torch.Tensor, x_prime: torch.Tensor) -> torch.Tensor:
    """|x - x'| summed over channels, normalised to [0, 1] per image."""
    d = (x - x_prime).abs().sum(1, keepdim=True)
    return d / (d.flatten(1).max(1).values.view(-1, 1, 1, 1) + 1e-6)


ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid)


def cycle_layers(f: nn.Module) -> list[int]:
    """Indices of f's top-level children whose outputs Eq. (6)'s perceptual term compares: every activation
    and every block (a child with children), and always the last child (f's output); ``[-1]`` (f's output
    only) when f is not an ``nn.Sequential``."""
    if not isinstance(f, nn.Sequential):
        return [-1]
    chosen = [
        i
        for i, child in enumerate(f)
        if isinstance(child, ACTIVATIONS) or any(True for _ in child.children())
    ]
    return sorted({*chosen, len(f) - 1})


def layer_features(f: nn.Module, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """The outputs of f's children at ``layers`` (``[-1]``: f(x))."""
    if layers == [-1]:
        return [f(x)]
    out, wanted = [], set(layers)
    for i, child in enumerate(f):
        x = child(x)
        if i in wanted:
            out.append(x)
    return out


def c3lt_loss(
    x: torch.Tensor,
    target: int,
    forward: nn.Module,
    backward: nn.Module,
    vae: AutoencoderKL,
    model: SplitClassifier,
    discriminator: nn.Module,
    *,
    n: int,
    alpha: float,
    beta: float,
    gamma: float,
    pixel_scale: float = PAPER_PIXEL_SCALE,
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor, torch.Tensor]:
    """L_c3lt(x, c', g, h) of Eq. (3), weighted by Eq. (11); also returns x' and x_cyc for the
    discriminator. ``pixel_scale`` multiplies the pixel L1 terms (``PAPER_PIXEL_SCALE``: the paper's
    [-1, 1] images)."""
    z_x = encode(vae, x)
    z_prime = apply_n(forward, z_x, n)
    x_prime = decode(vae, z_prime, x.shape[1])
    z_cyc = apply_n(backward, z_prime, n)
    x_cyc = decode(vae, z_cyc, x.shape[1])
    labels = torch.full((len(x),), target, dtype=torch.long, device=x.device)
    l_cls = F.cross_entropy(model.g(model.f(x_prime)), labels)  # Eq. (4)
    m = change_mask(x, x_prime)
    l1 = pixel_scale * (x - x_prime).abs().mean()
    l_prx = l1 + mask_entropy(m).mean() + mask_smoothness(m).mean()  # Eq. (5)
    layers = cycle_layers(model.f)
    perceptual = sum(
        (a - b).abs().mean()
        for a, b in zip(
            layer_features(model.f, x_cyc, layers), layer_features(model.f, x, layers), strict=True
        )
    )
    l_cyc = perceptual + pixel_scale * (x_cyc - x).abs().mean() + (z_x - z_cyc).abs().mean()  # Eq. (6)
    # Eq. (7), in its non-saturating form: maximise log D(x') + log D(x_cyc).
    l_adv = F.softplus(-discriminator(x_cyc)).mean() + F.softplus(-discriminator(x_prime)).mean()
    loss = l_cls + alpha * l_prx + beta * l_cyc + gamma * l_adv  # Eq. (11)
    parts = {
        "cls": l_cls.item(),
        "prx": l_prx.item(),
        "prx_l1": l1.item(),
        "cyc": l_cyc.item(),
        "adv": l_adv.item(),
    }
    return loss, parts, x_prime.detach(), x_cyc.detach()


def train_c3lt_maps(
    vae: AutoencoderKL,
    model: SplitClassifier,
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    class_a: int,
    class_b: int,
    out_dir: str | os.PathLike[str],
    steps: int,
    *,
    n: int = 1,
    alpha: float = 0.1,
    beta: float = 0.1,
    gamma: float = 0.001,
    pixel_scale: float = PAPER_PIXEL_SCALE,
    batch_size: int = 32,
    lr: float = 1e-3,
    width: int = 64,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    data_note: str = "",
) -> C3LTMaps:
    """Train g (a -> b), h (b -> a) and the discriminator for one class pair (Eq. 2).

    ``vae`` and ``model`` (eval mode) are frozen; ``images_a``/``images_b`` are images of the two classes.
    """
    check_images(images_a, "images_a")
    check_images(images_b, "images_b")
    check_steps(steps, batch_size)
    if class_a == class_b:
        raise ValueError(f"class_a and class_b are both {class_a}; C3LT maps connect two different classes")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    latent_channels = int(vae.config.latent_channels)
    g, h = LatentMap(latent_channels, width).train(), LatentMap(latent_channels, width).train()
    discriminator = Discriminator(in_channels=images_a.shape[1]).train()
    optimiser = torch.optim.Adam([*g.parameters(), *h.parameters()], lr=lr, betas=(0.5, 0.999))
    optimiser_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    loop = StepLoop(steps, f"c3lt maps {class_a}<->{class_b}", progress)
    start = time.perf_counter()
    kw = {"n": n, "alpha": alpha, "beta": beta, "gamma": gamma, "pixel_scale": pixel_scale}
    with frozen(vae, model.f, model.g):
        batches_b = batches(len(images_b), batch_size, steps, generator)
        for index_a in batches(len(images_a), batch_size, steps, generator):
            x, y = images_a[index_a], images_b[next(batches_b)]
            loss_x, parts, fake_x, cyc_x = c3lt_loss(x, class_b, g, h, vae, model, discriminator, **kw)
            loss_y, _, fake_y, cyc_y = c3lt_loss(y, class_a, h, g, vae, model, discriminator, **kw)
            loss = loss_x + loss_y  # Eq. (2)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            real, fake = torch.cat([x, y]), torch.cat([fake_x, cyc_x, fake_y, cyc_y])
            loss_d = F.softplus(-discriminator(real)).mean() + F.softplus(discriminator(fake)).mean()
            optimiser_d.zero_grad(set_to_none=True)
            loss_d.backward()
            optimiser_d.step()
            loop.step(loss.item(), **parts)
    loop.close()
    g.eval(), h.eval(), discriminator.eval()
    out = Path(out_dir)
    g.save_pretrained(out / "g")
    h.save_pretrained(out / "h")
    discriminator.save_pretrained(out / "discriminator")
    (out / PAIR_NAME).write_text(json.dumps({"class_a": class_a, "class_b": class_b, "n": n}))
    write_record(
        out,
        {
            "kind": "c3lt_maps",
            "data": {"a": data_summary(images_a), "b": data_summary(images_b), "note": data_note},
            "classes": [class_a, class_b],
            "hyperparameters": {"steps": steps, "batch_size": batch_size, "lr": lr, **kw, "width": width},
            "cycle_layers": cycle_layers(model.f),
            "seconds": time.perf_counter() - start,
            **loop.summary(),
        },
    )
    return C3LTMaps(g=g, h=h, class_a=class_a, class_b=class_b, n=n)


def load_c3lt_maps(path: str | os.PathLike[str]) -> C3LTMaps:
    """The maps of one class pair from a directory written by ``train_c3lt_maps``."""
    root = require_dir(path, "C3LT maps")
    pair_path = root / PAIR_NAME
    if not pair_path.is_file():
        raise FileNotFoundError(
            f"{pair_path} is missing; a C3LT maps directory is written by train_c3lt_maps"
        )
    pair = json.loads(pair_path.read_text())
    g = LatentMap.from_pretrained(root, subfolder="g", local_files_only=True).eval()
    h = LatentMap.from_pretrained(root, subfolder="h", local_files_only=True).eval()
    return C3LTMaps(g=g, h=h, class_a=int(pair["class_a"]), class_b=int(pair["class_b"]), n=int(pair["n"]))
