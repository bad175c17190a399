"""A sparse autoencoder on the classifier's pooled features, for SLC's trait loss (Carlyn et al. 2025, Eq. 6).

h_enc(x) = ReLU(W_enc (x - b_dec) + b_enc), h_dec(a) = W_dec a + b_dec. The paper trains Matryoshka SAEs
(Bussmann et al. 2025): the latents are nested groups, their first m_1 < m_2 < ... < m_k = all, and every
prefix must reconstruct x on its own,

    L = mean over prefixes m of ||x - h_dec(h_enc(x)[:m])||_2^2 + lambda ||h_enc(x)||_1

(Eq. 6 is the single prefix m = all, ``prefixes=(1.0,)``). The prefixes are fractions of the dictionary.
The architecture (and so the saved weights' keys) is the plain SAE's. Saved with ``save_pretrained``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from explain.nets.training_record import (
    Progress,
    StepLoop,
    batches,
    check_steps,
    data_summary,
    require_dir,
    write_record,
)


class SparseAutoencoder(ModelMixin, ConfigMixin):
    """A one-layer ReLU SAE with ``expansion`` x ``d_in`` latents."""

    @register_to_config
    def __init__(self, d_in: int, expansion: int = 4):
        super().__init__()
        self.encoder = nn.Linear(d_in, d_in * expansion)
        self.decoder = nn.Linear(d_in * expansion, d_in)

    def h_enc(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.encoder(x - self.decoder.bias))

    def h_dec(self, a: torch.Tensor) -> torch.Tensor:
        return self.decoder(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h_dec(self.h_enc(x))


def matryoshka_reconstruction(
    sae: SparseAutoencoder, a: torch.Tensor, x: torch.Tensor, prefixes: tuple[float, ...]
) -> torch.Tensor:
    """Mean over the prefixes m of the squared error of x rebuilt from the first m latents of ``a``."""
    width = a.shape[-1]
    errors = []
    for fraction in prefixes:
        m = max(1, round(fraction * width))
        rebuilt = a[:, :m] @ sae.decoder.weight[:, :m].t() + sae.decoder.bias
        errors.append(((rebuilt - x) ** 2).sum(-1).mean())
    return torch.stack(errors).mean()


def pooled_features(f: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier's spatial features f(x), global-average pooled to (N, d): what the SAE reads."""
    return f(x).mean(dim=(-2, -1))


def train_sae(
    features: torch.Tensor,
    out_dir: str | os.PathLike[str],
    steps: int,
    *,
    expansion: int = 4,
    lambda_: float = 1e-3,
    prefixes: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5, 1.0),
    batch_size: int = 256,
    lr: float = 1e-3,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    data_note: str = "",
) -> SparseAutoencoder:
    """Train a Matryoshka SAE on ``features`` (N, d) (module docstring; ``prefixes=(1.0,)``: Eq. 6 alone);
    saves ``out_dir`` and ``training.json``."""
    if features.ndim != 2 or features.shape[0] < 1:
        raise ValueError(
            f"features must have shape (N >= 1, d), not {tuple(features.shape)}; pool them first"
        )
    check_steps(steps, batch_size)
    if not prefixes or list(prefixes) != sorted(set(prefixes)) or not 0 < prefixes[0] or prefixes[-1] != 1.0:
        raise ValueError(
            "prefixes must be increasing fractions of the dictionary in (0, 1] ending at 1.0, not "
            f"{prefixes!r}"
        )
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    sae = SparseAutoencoder(d_in=features.shape[1], expansion=expansion).train()
    optimiser = torch.optim.Adam(sae.parameters(), lr=lr)
    loop = StepLoop(steps, "sparse autoencoder", progress)
    start = time.perf_counter()
    for index in batches(len(features), batch_size, steps, generator):
        x = features[index]
        a = sae.h_enc(x)
        reconstruction = matryoshka_reconstruction(sae, a, x, prefixes)
        sparsity = a.abs().sum(-1).mean()
        loss = reconstruction + lambda_ * sparsity  # Eq. (6), over the nested prefixes
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        loop.step(loss.item(), l0=float((a > 0).float().sum(-1).mean()))
    loop.close()
    sae.eval()
    out = Path(out_dir)
    sae.save_pretrained(out)
    write_record(
        out,
        {
            "kind": "sae",
            "data": {**data_summary(features), "note": data_note},
            "hyperparameters": {
                "steps": steps,
                "batch_size": batch_size,
                "lr": lr,
                "lambda_": lambda_,
                "prefixes": list(prefixes),
            },
            "seconds": time.perf_counter() - start,
            **loop.summary(),
        },
    )
    return sae


def load_sae(path: str | os.PathLike[str]) -> SparseAutoencoder:
    require_dir(path, "sparse autoencoder")
    return SparseAutoencoder.from_pretrained(path, local_files_only=True).eval()
