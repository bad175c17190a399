"""Training time of every generative backbone at the platform's default budgets on the embedded default.

Trains, with the pure trainers and exactly the configs of ``explain.services.backbones`` (DEFAULTS,
DEFAULT_WIDTHS), the autoencoder, the latent denoiser, the inpainting bridge, the SAE and C3LT's maps (Coat vs
Pullover) on Fashion-MNIST's training split (``limit_per_class`` images of each class), and prints one row per
model.

    .venv/bin/python bench/gen_backbones.py [--threads 1] [--fraction 1.0]

``--fraction`` scales every step count (e.g. 0.1 for a quick look); the table says which was used.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

import django

django.setup()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from explain.data.idx import load_fashion_mnist  # noqa: E402
from explain.nets.autoencoder import autoencoder_config, encode, train_autoencoder  # noqa: E402
from explain.nets.bridge import bridge_config, train_bridge  # noqa: E402
from explain.nets.c3lt_maps import train_c3lt_maps  # noqa: E402
from explain.nets.diffusion import denoiser_config, train_denoiser  # noqa: E402
from explain.nets.sae import pooled_features, train_sae  # noqa: E402
from explain.nets.small_cnn import SmallCNN  # noqa: E402
from explain.nets.training_record import read_record  # noqa: E402
from explain.services.backbones import DEFAULT_WIDTHS, DEFAULTS  # noqa: E402

COAT, PULLOVER = 4, 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def steps(kind: str) -> int:
        return max(1, round(DEFAULTS[kind]["steps"] * args.fraction))

    images, labels = load_fashion_mnist()["train"]
    limit = DEFAULTS["autoencoder"]["limit_per_class"]
    keep = np.concatenate([np.flatnonzero(labels == c)[:limit] for c in range(10)])
    x = torch.from_numpy(images[keep].astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels[keep]).long()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        widths = DEFAULT_WIDTHS["autoencoder"]
        cfg = autoencoder_config(
            1, block_out_channels=widths, sample_size=28, norm_num_groups=min(16, widths[0])
        )
        bs = DEFAULTS["autoencoder"]["batch_size"]
        vae = train_autoencoder(x, out / "ae", steps("autoencoder"), batch_size=bs, config=cfg)
        rows.append(("autoencoder", "ae", len(x), bs))

        with torch.no_grad():
            latents = torch.cat([encode(vae, c) for c in x.split(256)])
        widths = DEFAULT_WIDTHS["denoiser"]
        cfg = denoiser_config(
            10, latents.shape[1], latents.shape[-1], widths, norm_num_groups=min(32, widths[0])
        )
        bs = DEFAULTS["denoiser"]["batch_size"]
        train_denoiser(latents, y, out / "den", steps("denoiser"), num_classes=10, batch_size=bs, config=cfg)
        rows.append(("denoiser", "den", len(x), bs))

        widths = DEFAULT_WIDTHS["bridge"]
        cfg = bridge_config(1, 28, widths, norm_num_groups=min(16, widths[0]))
        bs = DEFAULTS["bridge"]["batch_size"]
        train_bridge(x, out / "br", steps("bridge"), batch_size=bs, config=cfg)
        rows.append(("bridge", "br", len(x), bs))

        torch.manual_seed(0)
        cnn = SmallCNN(num_classes=10, in_channels=1, width=16).eval()  # untrained: only the cost matters
        model = cnn.split()
        with torch.no_grad():
            features = torch.cat([pooled_features(model.f, c) for c in x.split(256)])
        bs = DEFAULTS["sae"]["batch_size"]
        train_sae(features, out / "sae", steps("sae"), batch_size=bs)
        rows.append(("sae", "sae", len(x), bs))

        xa, xb = x[y == COAT], x[y == PULLOVER]
        bs = DEFAULTS["c3lt_maps"]["batch_size"]
        train_c3lt_maps(vae, model, xa, xb, COAT, PULLOVER, out / "c3lt", steps("c3lt_maps"), batch_size=bs)
        rows.append(("c3lt_maps", "c3lt", len(xa) + len(xb), bs))

        print(f"\nGenerative backbones, default budgets x {args.fraction}, {args.threads} torch thread(s)")
        print(
            f"{'model':<12} {'images':>7} {'batch':>6} {'steps':>6} {'seconds':>8} {'s/step':>7} {'loss':>17}"
        )
        total = 0.0
        for kind, folder, n, bs in rows:
            record = read_record(out / folder)
            seconds = float(record["seconds"])
            total += seconds
            loss = f"{record['loss_first']:.3f} -> {record['loss_last_10pct']:.3f}"
            print(
                f"{kind:<12} {n:>7} {bs:>6} {record['steps']:>6} {seconds:>8.1f} "
                f"{seconds / record['steps']:>7.3f} {loss:>17}"
            )
        print(f"{'total':<12} {'':>7} {'':>6} {'':>6} {total:>8.1f}")
        started = time.strftime("%Y-%m-%d %H:%M")
        print(f"(run {started}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
