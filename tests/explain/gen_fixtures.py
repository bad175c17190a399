"""Tiny random backbones and a tiny classifier for the generative-method tests (16 x 16 grey images)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain.nets.autoencoder import AutoencoderKL, autoencoder_config, new_autoencoder
from explain.nets.bridge import BridgeSchedule, InpaintingBridge, UNet2DModel, bridge_config
from explain.nets.c3lt_maps import C3LTMaps, LatentMap
from explain.nets.diffusion import DDIMScheduler, LatentDenoiser, denoiser_config, scheduler_config
from explain.nets.sae import SparseAutoencoder
from explain.nets.split import SplitClassifier

SIZE = 16
NUM_CLASSES = 4


def tiny_classifier(seed: int = 0) -> SplitClassifier:
    """f: 1 x 16 x 16 -> 8 x 4 x 4 (a 4 x 4 grid), g: pool + linear."""
    torch.manual_seed(seed)
    f = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.MaxPool2d(2),
    )
    g = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES))
    return SplitClassifier(f=f.eval(), g=g.eval())


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    cfg = autoencoder_config(block_out_channels=(8, 16), norm_num_groups=8, sample_size=SIZE)
    return new_autoencoder(cfg).eval()


def tiny_denoiser(seed: int = 0) -> LatentDenoiser:
    torch.manual_seed(seed)
    cfg = denoiser_config(NUM_CLASSES, 4, SIZE // 2, block_out_channels=(16, 32), norm_num_groups=8)
    return LatentDenoiser(unet=UNet2DModel(**cfg).eval(), scheduler=DDIMScheduler(**scheduler_config()))


def tiny_bridge(seed: int = 0) -> InpaintingBridge:
    torch.manual_seed(seed)
    cfg = bridge_config(1, SIZE, (8, 16), norm_num_groups=8)
    return InpaintingBridge(unet=UNet2DModel(**cfg).eval(), schedule=BridgeSchedule())


def tiny_maps(seed: int = 0, a: int = 0, b: int = 1) -> C3LTMaps:
    """Untrained maps (the release's default initialisation) on tiny_vae's 4 x 8 x 8 latents."""
    torch.manual_seed(seed)
    g, h = LatentMap(4 * (SIZE // 2) ** 2), LatentMap(4 * (SIZE // 2) ** 2)
    return C3LTMaps(g=g.eval(), h=h.eval(), class_a=a, class_b=b)


def tiny_sae(seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    return SparseAutoencoder(d_in=8, expansion=2).eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: on a shared machine two threads contend and run many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_pair(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: a bright blob on the left half; class 1: on the right half (16 x 16, with noise)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.rand(n, 1, SIZE, SIZE, generator=g)
    y = torch.arange(n) % 2
    for i in range(n):
        top = int(torch.randint(2, SIZE - 8, (1,), generator=g))
        left = int(torch.randint(1, SIZE // 2 - 6, (1,), generator=g)) + (SIZE // 2 if y[i] else 0)
        x[i, 0, top : top + 6, left : left + 5] = 0.9
    return x, y


def trained_classifier(x: torch.Tensor, y: torch.Tensor, steps: int = 60, seed: int = 0) -> SplitClassifier:
    model = tiny_classifier(seed)
    params = [*model.f.parameters(), *model.g.parameters()]
    optimiser = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model.g(model.f(x)), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model
