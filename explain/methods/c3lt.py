"""Cycle-Consistent Counterfactuals by Latent Transformations (C3LT; Khorram & Fuxin, CVPR 2022).

A counterfactual is one forward pass: x' = G(g^n(E(x))) (Eq. 1), with g the latent map trained for the class
pair (explain.nets.c3lt_maps.train_c3lt_maps); towards the pair's other class, h is used. The region shown in
a study is the thresholded, smoothed change |x - x'| (C3LT itself produces no region).
"""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL

from explain.methods.base import SplitClassifier
from explain.methods.declaration import AUTOENCODER, C3LT_MAPS, MethodDeclaration
from explain.methods.generative import Generated, GenerativeMethod
from explain.nets.autoencoder import decode, encode, load_autoencoder
from explain.nets.c3lt_maps import C3LTMaps, apply_n, load_c3lt_maps

DECLARATION = MethodDeclaration(
    name="c3lt",
    target="explain.methods.c3lt:C3LT",
    paper="Khorram and Fuxin, Cycle-Consistent Counterfactuals by Latent Transformations, CVPR 2022",
    kind="generative",
    backbones={"autoencoder": AUTOENCODER, "maps": C3LT_MAPS},
    batch=16,
)


class C3LT(GenerativeMethod):
    """x' = G(g^n(E(x))) for one trained class pair; ``n`` is taken from the maps (the paper: n = 1)."""

    name = "c3lt"

    def __init__(
        self,
        *,
        autoencoder: str | os.PathLike[str] | AutoencoderKL,
        maps: str | os.PathLike[str] | C3LTMaps,
        region_threshold: float = 0.25,
        region_sigma: float = 1.0,
    ):
        """``autoencoder``/``maps``: loaded backbones or local directories (stored by path in config())."""
        self.autoencoder = str(autoencoder) if isinstance(autoencoder, str | os.PathLike) else autoencoder
        self.maps = str(maps) if isinstance(maps, str | os.PathLike) else maps
        self._vae = (
            load_autoencoder(autoencoder) if isinstance(autoencoder, str | os.PathLike) else autoencoder
        )
        self._maps = load_c3lt_maps(maps) if isinstance(maps, str | os.PathLike) else maps
        self.region_threshold, self.region_sigma = region_threshold, region_sigma

    @torch.no_grad()
    def _generate(self, model: SplitClassifier, x: torch.Tensor, y: torch.Tensor, noise: dict) -> Generated:
        z_x = encode(self._vae, x)
        z_prime = torch.empty_like(z_x)
        for target in y.unique().tolist():
            rows = y == target
            z_prime[rows] = apply_n(self._maps.towards(int(target)), z_x[rows], self._maps.n)
        x_prime = decode(self._vae, z_prime, x.shape[1])
        b = len(x)
        return Generated(x_cf=x_prime, nfe={"autoencoder": [2] * b, "latent_map": [self._maps.n] * b})
