"""An image-to-image Schrödinger bridge for region inpainting (I2SB, Liu et al. 2023), as RCSB uses it.

The bridge maps x_1 = (1 - R) o x* + R o z (the image with region R replaced by noise) to clean images x_0.
Its schedule is I2SB's symmetric one: beta_t rises to the middle of the timeline and falls back;
sigma_t^2 = int_0^t beta, bar_sigma_t^2 = int_t^1 beta. The analytic posterior (RCSB Eq. 15, I2SB Eq. 11) is

    q(x_t | x_0, x_1) = N(mu_x0 x_0 + mu_x1 x_1, var),  mu_x0 = bar_sigma^2 / (sigma^2 + bar_sigma^2),
                                                         mu_x1 = sigma^2 / (sigma^2 + bar_sigma^2)

and the network s_psi(x_t, t) predicts (x_t - x_0) / sigma_t, so x0_hat = x_t - sigma_t s_psi(x_t, t). The
network also sees the region R as an extra input channel. Saved as ``unet/`` + ``schedule.json`` +
``training.json``.

A converted I2SB model (``explain.nets.formats.i2sb``) differs in three stated ways, kept in ``bridge.json``:
its network sees x_t alone or with x_1 (``conditioning`` "none" / "x1", I2SB's ``cond_x1``) instead of the
region, it works on images in [-1, 1] (``image_range``), and its time input is I2SB's noise level
linspace(t0, T, N)[n] * N rather than the step n (``BridgeSchedule.noise_levels``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DModel

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

SCHEDULE_NAME = "schedule.json"
BRIDGE_NAME = "bridge.json"
CONDITIONING = ("region", "x1", "none")


def bridge_config(
    in_channels: int = 1,
    sample_size: int = 28,
    block_out_channels: tuple[int, ...] = (32, 64),
    norm_num_groups: int = 16,
) -> dict:
    """A small UNet2DModel: input = x_t and the region mask (C + 1 channels), output = C channels."""
    n = len(block_out_channels)
    return {
        "sample_size": sample_size,
        "in_channels": in_channels + 1,
        "out_channels": in_channels,
        "down_block_types": ["DownBlock2D"] * n,
        "up_block_types": ["UpBlock2D"] * n,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": 1,
        "norm_num_groups": norm_num_groups,
        "add_attention": False,
    }


@dataclass(frozen=True)
class BridgeSchedule:
    """I2SB's symmetric beta schedule over ``num_timesteps`` discrete times."""

    num_timesteps: int = 1000
    beta_max: float = 1.0  # RCSB's released value (I2SB's own default is 0.3)
    noise_levels: tuple[float, float] | None = None  # I2SB's (t0, T); None: the network sees the step

    def network_time(self, n: torch.Tensor) -> torch.Tensor:
        """What the network is given as its time for steps ``n``."""
        if self.noise_levels is None:
            return n
        t0, t1 = self.noise_levels
        levels = torch.linspace(t0, t1, self.num_timesteps, device=n.device) * self.num_timesteps
        return levels[n]

    def tensors(self) -> dict[str, torch.Tensor]:
        n = self.num_timesteps
        betas = torch.linspace(1e-4**0.5, (self.beta_max / n) ** 0.5, n, dtype=torch.float64) ** 2
        betas = torch.cat([betas[: n // 2], betas[: n - n // 2].flip(0)])
        std_fwd = betas.cumsum(0).sqrt()  # sigma_t
        std_bwd = betas.flip(0).cumsum(0).flip(0).sqrt()  # bar_sigma_t
        denom = std_fwd**2 + std_bwd**2
        return {
            "std_fwd": std_fwd.float(),
            "std_bwd": std_bwd.float(),
            "mu_x0": (std_bwd**2 / denom).float(),
            "mu_x1": (std_fwd**2 / denom).float(),
            "std_post": (std_fwd**2 * std_bwd**2 / denom).sqrt().float(),
        }


@dataclass
class InpaintingBridge:
    """s_psi and its schedule; ``x0_hat(x_t, n, region)`` is the network's estimate of the clean image."""

    unet: UNet2DModel
    schedule: BridgeSchedule
    conditioning: str = "region"  # the network's extra input: the region R, x_1 (I2SB's cond_x1) or none
    image_range: tuple[float, float] = (0.0, 1.0)  # the images the bridge was trained on

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONING:
            raise ValueError(f"conditioning must be one of {CONDITIONING}, not {self.conditioning!r}")
        self._tensors = self.schedule.tensors()

    @property
    def channels(self) -> int:
        """The image channels the bridge generates."""
        return int(self.unet.config.out_channels)

    def to_bridge(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the bridge's range (the identity for a platform-trained bridge)."""
        low, high = self.image_range
        return x if (low, high) == (0.0, 1.0) else x * (high - low) + low

    def from_bridge(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.image_range
        return x if (low, high) == (0.0, 1.0) else (x - low) / (high - low)

    def coefficient(self, name: str, n: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        value = self._tensors[name].to(like.device)[n]
        return value.view(-1, *([1] * (like.ndim - 1))) if value.ndim else value

    def x0_hat(
        self, x_t: torch.Tensor, n: int, region: torch.Tensor, x1: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The network's clean image from x_t at step n; ``x1`` is needed by a bridge conditioned on it."""
        t = self.schedule.network_time(torch.full((x_t.shape[0],), n, device=x_t.device, dtype=torch.long))
        if self.conditioning == "region":
            inputs = torch.cat([x_t, region], dim=1)
        elif self.conditioning == "x1":
            if x1 is None:
                raise ValueError("this bridge is conditioned on x_1 (I2SB's cond_x1); pass x1 to x0_hat")
            inputs = torch.cat([x_t, x1], dim=1)
        else:
            inputs = x_t
        s = self.unet(inputs, t).sample
        return x_t - self.coefficient("std_fwd", n, x_t) * s

    def posterior_sample(
        self, x0: torch.Tensor, x1: torch.Tensor, n: torch.Tensor | int, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """x_n ~ q(x_n | x_0, x_1) (Eq. 15); without noise, its mean."""
        mean = self.coefficient("mu_x0", n, x0) * x0 + self.coefficient("mu_x1", n, x0) * x1
        return mean if noise is None else mean + self.coefficient("std_post", n, x0) * noise

    def step_coefficients(self, n_prev: int, n: int) -> tuple[float, float]:
        """(mu_{n-1}, bar_mu_{n-1}) of x_{n-1} = mu x0_hat + bar_mu x_n (RCSB algorithm 3, line 13)."""
        std_n, std_prev = self._tensors["std_fwd"][n], self._tensors["std_fwd"][n_prev]
        if n_prev == n:
            return 0.0, 1.0
        delta2 = std_n**2 - std_prev**2
        return float(delta2 / std_n**2), float(std_prev**2 / std_n**2)

    @property
    def name_or_path(self) -> str:
        return str(self.unet.config.get("_name_or_path", "") or "<unsaved InpaintingBridge>")


def random_regions(
    n: int, size: tuple[int, int], generator: torch.Generator, grid: int = 7, max_area: float = 0.5
) -> torch.Tensor:
    """(n, 1, H, W) binary masks: half random sets of grid cells, half random rectangles."""
    height, width = size
    masks = torch.zeros(n, 1, height, width)
    for i in range(n):
        area = float(torch.empty(1).uniform_(0.05, max_area, generator=generator))
        if i % 2 == 0:
            cells = torch.randperm(grid * grid, generator=generator)[: max(1, round(area * grid * grid))]
            for cell in cells.tolist():
                r, c = divmod(cell, grid)
                masks[
                    i,
                    0,
                    r * height // grid : (r + 1) * height // grid,
                    c * width // grid : (c + 1) * width // grid,
                ] = 1
        else:
            h = max(1, min(height, round((area * height * width) ** 0.5)))
            w = max(1, min(width, round(area * height * width / h)))
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            masks[i, 0, top : top + h, left : left + w] = 1
    return masks


def train_bridge(
    images: torch.Tensor,
    out_dir: str | os.PathLike[str],
    steps: int,
    *,
    batch_size: int = 64,
    lr: float = 3e-4,
    schedule: BridgeSchedule | None = None,
    config: dict | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    data_note: str = "",
) -> InpaintingBridge:
    """Train s_psi on ``images`` (N, C, H, W) with random region masks: x_1 = (1 - R) o x_0 + R o z, x_t from
    the analytic posterior, regression of (x_t - x_0) / sigma_t (I2SB's objective)."""
    check_images(images)
    check_steps(steps, batch_size)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    schedule = schedule or BridgeSchedule()
    cfg = config or bridge_config(images.shape[1], images.shape[-1])
    if cfg["in_channels"] != images.shape[1] + 1:
        raise ValueError(
            f"bridge in_channels={cfg['in_channels']} must be the image channels + 1 (the region)"
        )
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    bridge = InpaintingBridge(unet=UNet2DModel(**cfg).train(), schedule=schedule)
    optimiser = torch.optim.AdamW(bridge.unet.parameters(), lr=lr, weight_decay=0.0)
    loop = StepLoop(steps, "inpainting bridge", progress)
    start = time.perf_counter()
    for index in batches(len(images), batch_size, steps, generator):
        x0 = images[index]
        region = random_regions(len(x0), tuple(x0.shape[-2:]), generator)
        x1 = (1 - region) * x0 + region * torch.randn(x0.shape, generator=generator)  # algorithm 3, line 2
        n = torch.randint(0, schedule.num_timesteps, (len(x0),), generator=generator)
        x_t = bridge.posterior_sample(x0, x1, n, torch.randn(x0.shape, generator=generator))
        target = (x_t - x0) / bridge.coefficient("std_fwd", n, x0)
        prediction = bridge.unet(torch.cat([x_t, region], dim=1), n).sample
        loss = torch.nn.functional.mse_loss(prediction, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        loop.step(loss.item())
    loop.close()
    bridge.unet.eval()
    out = Path(out_dir)
    bridge.unet.save_pretrained(out / "unet")
    (out / SCHEDULE_NAME).write_text(
        json.dumps({"num_timesteps": schedule.num_timesteps, "beta_max": schedule.beta_max})
    )
    write_record(
        out,
        {
            "kind": "inpainting_bridge",
            "data": {**data_summary(images), "note": data_note},
            "hyperparameters": {"steps": steps, "batch_size": batch_size, "lr": lr},
            "seconds": time.perf_counter() - start,
            **loop.summary(),
        },
    )
    return bridge


def load_bridge(path: str | os.PathLike[str]) -> InpaintingBridge:
    """An InpaintingBridge from a directory holding ``unet/``, ``schedule.json`` and, for a converted
    model, ``bridge.json``."""
    root = require_dir(path, "inpainting bridge")
    schedule_path = root / SCHEDULE_NAME
    if not schedule_path.is_file():
        raise FileNotFoundError(f"{schedule_path} is missing; a bridge directory is written by train_bridge")
    stated = json.loads(schedule_path.read_text())
    if stated.get("noise_levels") is not None:
        stated["noise_levels"] = tuple(float(v) for v in stated["noise_levels"])
    schedule = BridgeSchedule(**stated)
    extra = json.loads((root / BRIDGE_NAME).read_text()) if (root / BRIDGE_NAME).is_file() else {}
    unet = UNet2DModel.from_pretrained(root, subfolder="unet", local_files_only=True).eval()
    return InpaintingBridge(
        unet=unet,
        schedule=schedule,
        conditioning=extra.get("conditioning", "region"),
        image_range=tuple(float(v) for v in extra.get("image_range", (0.0, 1.0))),
    )
