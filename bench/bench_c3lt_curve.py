"""C3LT maps' learning curve: the quality card (flip rate, L1 on held-out images) every few steps of one
``python -m explain.shipped.train --kind c3lt_maps`` run, to choose a training budget from measurements.

The run is the shipped trainer itself (same data, seed and batches); the maps are read at each checkpoint
through the progress callback and measured with ``explain.nets.quality.c3lt_card`` on the pair's held-out
test images (the card the manifest records). Prints one row per checkpoint and the load average.

    .venv/bin/python bench/bench_c3lt_curve.py --pair 6 0 --steps 400 --every 100 [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", type=int, nargs=2, required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--width", type=int, default=None, help="the maps' hidden units (default: the release's)")
    p.add_argument("--shipped", default="explain/shipped/fashion-mnist")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import tempfile

    import torch

    import explain.nets.c3lt_maps as c3lt
    from explain.nets.autoencoder import load_autoencoder
    from explain.nets.quality import c3lt_card
    from explain.shipped.train import fashion_mnist, pixel_classifier

    torch.set_num_threads(args.threads)
    a, b = args.pair
    shipped = Path(args.shipped)
    vae = load_autoencoder(shipped / "autoencoder")
    model = pixel_classifier(shipped / "classifier")
    x, y = fashion_mnist("train")
    tx, ty = fashion_mnist("test")
    maps: list = []

    class Captured(c3lt.LatentMap):  # the trainer's own maps, read at each checkpoint
        def __init__(self, *a_, **kw):
            super().__init__(*a_, **kw)
            maps.append(self)

    c3lt.LatentMap = Captured
    started = time.perf_counter()
    print(f"{'step':>6} {'flip_rate':>9} {'l1':>7} {'seconds':>8} {'load':>5}", flush=True)

    def progress(done: int, total: int) -> None:
        if done % args.every and done != total:  # step 0: the untrained maps (the release's initialisation)
            return
        g, h = maps[-2], maps[-1]
        card = c3lt_card(c3lt.C3LTMaps(g=g, h=h, class_a=a, class_b=b), vae, model, tx[ty == a], tx[ty == b])
        f = card["figures"]
        seconds = time.perf_counter() - started
        print(
            f"{done:>6} {f['flip_rate']:>9.3f} {f['l1']:>7.4f} {seconds:>8.0f} {os.getloadavg()[0]:>5.1f}",
            flush=True,
        )

    with tempfile.TemporaryDirectory() as out:
        c3lt.train_c3lt_maps(
            vae, model, x[y == a], x[y == b], a, b, out, args.steps, batch_size=args.batch_size,
            lr=1e-3, width=args.width, generator=torch.Generator().manual_seed(0), progress=progress,
        )  # fmt: skip


if __name__ == "__main__":
    main()
