"""Behaviour after (tiny) training on a toy pair: C3LT's cycle returns near the start, and the methods flip
the classifier on most queries. Both can fail: they hold only if training and the methods work."""

from __future__ import annotations

import torch

from explain.methods.rcsb import RCSB
from explain.methods.slc import SLC
from explain.nets.autoencoder import autoencoder_config, decode, encode, train_autoencoder
from explain.nets.bridge import bridge_config, train_bridge
from explain.nets.c3lt_maps import apply_n, train_c3lt_maps

from .gen_fixtures import SIZE, one_thread, toy_pair, trained_classifier  # noqa: F401 (autouse fixture)


def toy_setup(tmp_path):
    x, y = toy_pair(64)
    model = trained_classifier(x, y)
    with torch.no_grad():
        assert (model.g(model.f(x)).argmax(-1) == y).float().mean() == 1.0
    cfg = autoencoder_config(block_out_channels=(8, 16), norm_num_groups=8, sample_size=SIZE)
    vae = train_autoencoder(x, tmp_path / "vae", 60, batch_size=16, lr=3e-3, config=cfg)
    return x, y, model, vae


def test_c3lt_cycle_returns_near_the_start_and_flips(tmp_path):
    x, y, model, vae = toy_setup(tmp_path)
    maps = train_c3lt_maps(
        vae, model, x[y == 0], x[y == 1], 0, 1, tmp_path / "maps", 120, batch_size=16, lr=3e-3, beta=1.0
    )
    queries, _ = toy_pair(16, seed=9)
    a = queries[::2]  # class 0
    with torch.no_grad():
        z = encode(vae, a)
        z_prime = apply_n(maps.g, z, 1)
        z_cyc = apply_n(maps.h, z_prime, 1)
        flipped = (model.g(model.f(decode(vae, z_prime))).argmax(-1) == 1).float().mean()
    moved = (z_prime - z).abs().mean()
    back = (z_cyc - z).abs().mean()
    assert flipped >= 0.75
    assert back < 0.35 * moved, (float(back), float(moved))


def test_flip_rate_floor_on_a_tiny_budget(tmp_path):
    x, y, model, vae = toy_setup(tmp_path)
    bridge = train_bridge(
        x, tmp_path / "bridge", 40, batch_size=16, config=bridge_config(1, SIZE, (8, 16), 8)
    )
    queries, labels = toy_pair(8, seed=5)
    targets = (1 - labels).tolist()
    slc = SLC(autoencoder=vae, lr=0.1, max_steps=300, sigma=1.0).explain_batch(model, queries, targets)
    rcsb = RCSB(bridge=bridge, steps=25, s=1.0, area=0.5).explain_batch(model, queries, targets)
    # as released, SLC's stage 1 classifies the round trip D(E(D(z + dz))): on this 60-step toy autoencoder
    # it moves class 0 to 1 (4 of 4) but not 1 to 0, whose round-trip gradients do not flip it in 25 steps
    assert sum(r.flipped for r in slc) / len(slc) >= 0.5
    assert all(r.flipped for r, label in zip(slc, labels.tolist(), strict=True) if label == 0)
    assert sum(r.flipped for r in rcsb) / len(rcsb) >= 0.75
