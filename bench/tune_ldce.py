"""LDCE's per-dataset hyperparameter search, as its paper does it: "We optimized other hyperparameters
(diffusion steps T and the other weighing factors lambda_c, gamma, lambda_d) on a few examples per dataset"
(Schrodi, Farid et al. 2024, section 4, Table 5), eta 2, respacing 2, consensus on 1x1 latent patches with
zero overwrite, L1 distance and the release's renormalisation all kept. On the shipped models, a few
*training* images per direction of the demo's class pairs (never the held-out images the benchmarks and the
demo use), one row per setting: flips, mean L1 and seconds per counterfactual; the pick is the most flips,
then the least L1 (the paper's validity, then closeness). Django-free.

    .venv/bin/python bench/tune_ldce.py [--n 5] [--threads 1]
        [--grid start_step=220,250 lambda_c=6.9,9.2,13.8 lambda_d=0.3 gamma=45] [--part 0/2 --out F]

``--part i/k`` runs every k-th setting from the i-th, so that k processes share the cores; ``--merge`` reads
their tables (files of --out) and prints the pick.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from explain.methods.ldce import LDCE
from explain.shipped.manifest import SHIPPED_ROOT, read_manifest
from explain.shipped.train import fashion_mnist, pixel_classifier

TUNED = ("start_step", "lambda_c", "lambda_d", "gamma")  # what the paper tunes per data set (Table 5)
# The second round; the first: --n 3 --grid start_step=191,250 lambda_c=2.3,4.6,9.2 gamma=45,90
DEFAULT_GRID = {"start_step": [220, 250], "lambda_c": [6.9, 9.2, 13.8], "lambda_d": [0.3], "gamma": [45.0]}


def parse_grid(items: list[str]) -> dict[str, list]:
    grid = dict(DEFAULT_GRID)
    for item in items:
        key, _, values = item.partition("=")
        if key not in TUNED or not values:
            raise SystemExit(f"--grid takes NAME=V1,V2 with NAME one of {', '.join(TUNED)}; got {item!r}")
        grid[key] = [int(v) if key == "start_step" else float(v) for v in values.split(",")]
    return grid


def tuning_images(n: int) -> tuple[torch.Tensor, list[int], list[str]]:
    """n training images per direction of each shipped C3LT pair (the demo's pairs), classified right."""
    model = pixel_classifier(SHIPPED_ROOT / "classifier")
    x, y = fashion_mnist("train")
    pairs = sorted(
        tuple(e["arguments"]["pair"]) for e in read_manifest()["models"].values() if e["kind"] == "c3lt_maps"
    )
    images, targets, directions = [], [], []
    for a, b in pairs:
        for source, target in ((a, b), (b, a)):
            candidates = torch.nonzero(y == source).flatten()[: 20 * n]
            with torch.no_grad():
                right = model.g(model.f(x[candidates])).argmax(-1) == source
            chosen = candidates[right][:n]
            images.append(x[chosen])
            targets += [target] * len(chosen)
            directions += [f"{source}->{target}"] * len(chosen)
    return torch.cat(images), targets, directions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5, help="training images per direction of each pair")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", nargs="*", default=[], help="NAME=V1,V2 for NAME in " + ", ".join(TUNED))
    parser.add_argument("--part", default="0/1", help="i/k: every k-th setting from the i-th")
    parser.add_argument("--out", type=Path, help="write this part's rows here (JSON lines)")
    parser.add_argument("--merge", type=Path, nargs="*", help="print the pick from these parts' rows")
    args = parser.parse_args()
    if args.merge:
        rows = [json.loads(line) for path in args.merge for line in path.read_text().splitlines() if line]
        return report(rows)
    torch.set_num_threads(args.threads)
    grid = parse_grid(args.grid)
    index, parts = (int(v) for v in args.part.split("/"))
    settings = [dict(zip(TUNED, values, strict=True)) for values in itertools.product(*grid.values())]
    model = pixel_classifier(SHIPPED_ROOT / "classifier")
    x, targets, _ = tuning_images(args.n)
    rows = []
    for setting in settings[index::parts]:
        method = LDCE(autoencoder=SHIPPED_ROOT / "autoencoder", denoiser=SHIPPED_ROOT / "denoiser", **setting)
        start = time.perf_counter()
        results = method.explain_batch(model, x, targets, generator=torch.Generator().manual_seed(0))
        row = {
            **setting,
            "flips": int(sum(r.flipped for r in results)),
            "images": len(results),
            "l1": float(np.mean([r.timings["l1"] for r in results])),
            "area": float(np.mean([r.timings["region_area"] for r in results])),
            "seconds": (time.perf_counter() - start) / len(results),
            "load": os.getloadavg()[0],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    report(rows)


def report(rows: list[dict]) -> None:
    print(f"{'T':>4} {'lambda_c':>8} {'lambda_d':>8} {'gamma':>5} {'flips':>7} {'L1':>6} {'area':>5} s/cf")
    for r in sorted(rows, key=lambda r: (-r["flips"], r["l1"])):
        print(
            f"{r['start_step']:>4} {r['lambda_c']:>8.2f} {r['lambda_d']:>8.2f} {r['gamma']:>5.0f} "
            f"{r['flips']:>3}/{r['images']:<3} {r['l1']:>6.3f} {r['area']:>5.2f} {r['seconds']:>5.2f}"
        )
    best = min(rows, key=lambda r: (-r["flips"], r["l1"]))
    print("pick (most flips, then least L1):", {k: best[k] for k in TUNED})
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
