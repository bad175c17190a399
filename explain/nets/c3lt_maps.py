"""C3LT's latent maps (Khorram & Fuxin, CVPR 2022): g takes class c's latent codes to class c', h takes
them back.

Each map is the release's ``NLMappingConv``/``NLMappingFC``: T(z) = W2 relu(W1 z + b1) + b2, the paper's
"simple 2-layer fully-connected neural network with ReLU" on the flattened latent code (hidden width = the
latent size D, as the release's 1 x 1 convolutions on its (D, 1, 1) GAN codes), default initialisation. One
step is z + T(z) rescaled to the norm of the code it started from (the release's ``nonlinear_map_step``,
after gan_steerability); ``apply_n`` takes n of them (g^n, the paper: n = 1).

Trained per class pair (Eq. 2) with the classification (Eq. 4), proximity (Eq. 5), cycle (Eq. 6) and
adversarial (Eq. 7) losses weighted by Eq. (11) (alpha, beta, gamma = 0.1, 0.1, 0.001), each term as the
release computes it (``c3lt/helper.py``, ``c3lt/train.py``):

- Eq. (5): (L1 + p1 L_smth + p2 L_entr) / (1 + p1 + p2), p1 = 10, p2 = 1, on the change mask
  (x' - x)^2 normalised to [0, 1] per image; L_smth the mean squared difference of neighbouring mask pixels,
  L_entr = min(m, 1 - m).
- Eq. (6): the perceptual term is the mean of the L1 distances of the explained classifier's ReLU outputs
  (``cycle_layers``; the release: the ReLU outputs of its classifier's conv blocks) and of the pixels; the
  cycle loss is the mean of it and the latent L1.
- Eq. (7): -log D(.) of x' and x_cyc (BCE against "real"), their mean; D is a discriminator trained
  beforehand (real images of the pair against the generator's samples G(z), z ~ N(0, I), as a GAN's
  discriminator is) and frozen while the maps train: the release loads its GAN's discriminator and never
  updates it.
- Eq. (2): the two directions' losses are averaged; Adam (lr 1e-3, default betas) on g and h, the learning
  rate halved every 25 epochs of the query class (the release's StepLR).

Pixel terms are measured on the paper's image scale, [-1, 1] (its release normalises with mean 0.5, std
0.5; ours are in [0, 1]): 2 |x - x'| on our images (``pixel_scale``; the platform's reported L1 stays on
[0, 1]). Saved as ``g/``, ``h/``, ``discriminator/`` (diffusers format), ``pair.json`` and ``training.json``.
"""

from __future__ import annotations

import json
import math
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
P1_SMOOTHNESS = 10.0  # the release's --p1: weight of the mask's smoothness in Eq. (5)
P2_ENTROPY = 1.0  # the release's --p2: weight of the mask's entropy in Eq. (5)
DECAY_EPOCHS = 25  # the release's --decay_step: the learning rate is halved every 25 epochs
DECAY_GAMMA = 0.5  # the release's --decay_gamma


class LatentMap(ModelMixin, ConfigMixin):
    """T(z) = Linear(relu(Linear(z))) on the flattened latent code: the step's increment (``apply_n`` adds
    it and restores the norm). ``width``: hidden units, None for the release's latent size."""

    @register_to_config
    def __init__(self, latent_dim: int, width: int | None = None):
        super().__init__()
        hidden = width or latent_dim
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, latent_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.flatten(1)).view_as(z)


def apply_n(map_: nn.Module, z: torch.Tensor, n: int) -> torch.Tensor:
    """n steps z <- (z + T(z)) * |z_0| / |z + T(z)| from z_0 = ``z`` (the release's nonlinear_map_step)."""
    shape = (-1,) + (1,) * (z.dim() - 1)
    norm = z.flatten(1).norm(dim=1).view(shape)
    for _ in range(n):
        step = z + map_(z)
        z = step * norm / step.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
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


def change_mask(x: torch.Tensor, x_prime: torch.Tensor) -> torch.Tensor:
    """(x' - x)^2 of the first channel, min-max normalised to [0, 1] per image (the release's gen_masks,
    mode "mse")."""
    d = (x_prime - x)[:, :1].pow(2).flatten(1)
    d = d - d.min(1, keepdim=True).values
    d = d / d.max(1, keepdim=True).values.clamp_min(1e-12)
    return d.view_as(x[:, :1])


def mask_smoothness(m: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of vertically and of horizontally neighbouring mask pixels, their mean."""
    dy = (m[..., 1:, :] - m[..., :-1, :]).pow(2).flatten(1).mean(1)
    dx = (m[..., :, 1:] - m[..., :, :-1]).pow(2).flatten(1).mean(1)
    return ((dy + dx) / 2).mean()


def mask_entropy(m: torch.Tensor) -> torch.Tensor:
    """min(m, 1 - m), mean: zero for a binary mask."""
    return torch.minimum(m, 1 - m).mean()


def proximity_loss(
    x: torch.Tensor, x_prime: torch.Tensor, *, pixel_scale: float, p1: float, p2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (5) as released: (L1 + p1 L_smth + p2 L_entr) / (1 + p1 + p2); also returns the L1."""
    m = change_mask(x, x_prime)
    l1 = pixel_scale * (x - x_prime).abs().mean()
    return (l1 + p1 * mask_smoothness(m) + p2 * mask_entropy(m)) / (1 + p1 + p2), l1


ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid)


def _leaves(f: nn.Module) -> list[nn.Module] | None:
    """f's modules in the order they run when f is nested ``nn.Sequential``s; None when it is not."""
    if not isinstance(f, nn.Sequential):
        return None
    out: list[nn.Module] = []
    for child in f:
        inner = _leaves(child) if isinstance(child, nn.Sequential) else [child]
        if inner is None:
            return None
        out.extend(inner)
    return out


def cycle_layers(f: nn.Module) -> list[int]:
    """Indices, among f's modules in running order (nested ``nn.Sequential``s flattened), of the activations
    whose outputs Eq. (6)'s perceptual term compares (the release: its classifier's ReLU outputs); ``[-1]``
    (f's output) when f is not built of ``nn.Sequential``s or has no activation."""
    leaves = _leaves(f)
    chosen = [i for i, m in enumerate(leaves or []) if isinstance(m, ACTIVATIONS)]
    return chosen or [-1]


def layer_features(f: nn.Module, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """The outputs of f's modules at ``layers`` (``[-1]``: f(x))."""
    if layers == [-1]:
        return [f(x)]
    out, wanted, last = [], set(layers), max(layers)
    for i, module in enumerate(_leaves(f)):
        x = module(x)
        if i in wanted:
            out.append(x)
        if i == last:
            break
    return out


def perceptual_loss(x: torch.Tensor, x_cyc: torch.Tensor, f: nn.Module, pixel_scale: float) -> torch.Tensor:
    """Eq. (6)'s first two terms as released: the mean of the layers' L1 distances and the pixel L1."""
    layers = cycle_layers(f)
    pairs = zip(layer_features(f, x_cyc, layers), layer_features(f, x, layers), strict=True)
    features = sum((a - b).abs().mean() for a, b in pairs)
    return (features + pixel_scale * (x_cyc - x).abs().mean()) / (1 + len(layers))


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
    p1: float = P1_SMOOTHNESS,
    p2: float = P2_ENTROPY,
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor, torch.Tensor]:
    """L_c3lt(x, c', g, h) of Eq. (3), weighted by Eq. (11); also returns x' and x_cyc (detached)."""
    z_x = encode(vae, x)
    z_prime = apply_n(forward, z_x, n)
    x_prime = decode(vae, z_prime, x.shape[1])
    z_cyc = apply_n(backward, z_prime, n)
    x_cyc = decode(vae, z_cyc, x.shape[1])
    labels = torch.full((len(x),), target, dtype=torch.long, device=x.device)
    l_cls = F.cross_entropy(model.g(model.f(x_prime)), labels)  # Eq. (4)
    l_prx, l1 = proximity_loss(x, x_prime, pixel_scale=pixel_scale, p1=p1, p2=p2)  # Eq. (5)
    l_cyc = (perceptual_loss(x, x_cyc, model.f, pixel_scale) + (z_x - z_cyc).abs().mean()) / 2  # Eq. (6)
    # Eq. (7), in its non-saturating form (the release: BCE of D against "real"): -log D(x') - log D(x_cyc).
    l_adv = (F.softplus(-discriminator(x_prime)).mean() + F.softplus(-discriminator(x_cyc)).mean()) / 2
    loss = l_cls + alpha * l_prx + beta * l_cyc + gamma * l_adv  # Eq. (11)
    parts = {
        "cls": l_cls.item(),
        "prx": l_prx.item(),
        "prx_l1": l1.item(),
        "cyc": l_cyc.item(),
        "adv": l_adv.item(),
    }
    return loss, parts, x_prime.detach(), x_cyc.detach()


def train_discriminator(
    vae: AutoencoderKL,
    images: torch.Tensor,
    steps: int,
    *,
    batch_size: int,
    lr: float = 2e-4,
    generator: torch.Generator,
) -> tuple[Discriminator, list[float]]:
    """D of Eq. (7), trained as a GAN's discriminator is (DCGAN: Adam lr 2e-4, betas (0.5, 0.999)): real
    ``images`` against the generator's samples G(z), z ~ N(0, I) in the latent code's shape. Returns D
    (eval mode) and its loss per step."""
    discriminator = Discriminator(in_channels=images.shape[1]).train()
    optimiser = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    with torch.no_grad():
        latent_shape = encode(vae, images[:1]).shape[1:]
    losses = []
    for index in batches(len(images), batch_size, steps, generator):
        real = images[index]
        with torch.no_grad():
            fake = decode(vae, torch.randn((len(real), *latent_shape), generator=generator), real.shape[1])
        loss = F.softplus(-discriminator(real)).mean() + F.softplus(discriminator(fake)).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return discriminator.eval(), losses


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
    p1: float = P1_SMOOTHNESS,
    p2: float = P2_ENTROPY,
    batch_size: int = 128,
    lr: float = 1e-3,
    width: int | None = None,
    discriminator_steps: int = 200,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    data_note: str = "",
) -> C3LTMaps:
    """Train the discriminator, then (with it frozen) g (a -> b) and h (b -> a) for one class pair (Eq. 2).

    ``vae`` and ``model`` (eval mode) are frozen; ``images_a``/``images_b`` are images of the two classes.
    ``width``: the maps' hidden units (None: the latent size, the release's).
    """
    check_images(images_a, "images_a")
    check_images(images_b, "images_b")
    check_steps(steps, batch_size)
    if class_a == class_b:
        raise ValueError(f"class_a and class_b are both {class_a}; C3LT maps connect two different classes")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    start = time.perf_counter()
    with frozen(vae):
        discriminator, d_losses = train_discriminator(
            vae, torch.cat([images_a, images_b]), discriminator_steps, batch_size=batch_size,
            generator=generator,
        )  # fmt: skip
    with torch.no_grad():
        latent_dim = encode(vae, images_a[:1])[0].numel()
    g, h = LatentMap(latent_dim, width).train(), LatentMap(latent_dim, width).train()
    optimiser = torch.optim.Adam([*g.parameters(), *h.parameters()], lr=lr)
    epoch_steps = math.ceil(len(images_a) / batch_size)
    scheduler = torch.optim.lr_scheduler.StepLR(optimiser, DECAY_EPOCHS * epoch_steps, DECAY_GAMMA)
    loop = StepLoop(steps, f"c3lt maps {class_a}<->{class_b}", progress)
    kw = {"n": n, "alpha": alpha, "beta": beta, "gamma": gamma, "pixel_scale": pixel_scale}
    kw |= {"p1": p1, "p2": p2}
    with frozen(vae, model.f, model.g, discriminator):
        batches_b = batches(len(images_b), batch_size, steps, generator)
        for index_a in batches(len(images_a), batch_size, steps, generator):
            x, y = images_a[index_a], images_b[next(batches_b)]
            loss_x, parts, _, _ = c3lt_loss(x, class_b, g, h, vae, model, discriminator, **kw)
            loss_y, _, _, _ = c3lt_loss(y, class_a, h, g, vae, model, discriminator, **kw)
            loss = (loss_x + loss_y) / 2  # Eq. (2), the two directions averaged as released
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            loop.step(loss.item(), **parts)
    loop.close()
    g.eval(), h.eval()
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
            "hyperparameters": {
                "steps": steps,
                "batch_size": batch_size,
                "lr": lr,
                **kw,
                "width": width or latent_dim,
                "discriminator_steps": discriminator_steps,
                "lr_halved_every_steps": DECAY_EPOCHS * epoch_steps,
            },
            "cycle_layers": cycle_layers(model.f),
            "discriminator_loss_first": d_losses[0] if d_losses else None,
            "discriminator_loss_last": d_losses[-1] if d_losses else None,
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
