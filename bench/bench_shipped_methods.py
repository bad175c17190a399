"""The generative methods at their paper defaults (or a registered variant, by name) on the shipped backbones
(explain/shipped/), on held-out
test images of the demo's class pairs: flip rate (on the 8-bit image a rater is shown), L1, region area, NFE,
seconds per counterfactual and the fraction of raw pixels outside [0, 1] before the clamp, one row per method
and direction. Django-free.

    .venv/bin/python bench/bench_shipped_methods.py [--n 10] [--methods c3lt slc ldce-cls rcsb-28px]
        [--threads 1] [--set rcsb-28px.steps=25 ...]   # a departure, printed in the table's header

RCSB runs as ``rcsb-28px``: the release's 16-pixel cells do not tile 28-pixel images, and ``rcsb`` refuses
them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from explain.methods import registered
from explain.methods.c3lt import C3LT
from explain.methods.ldce import LDCE
from explain.methods.rcsb import RCSB
from explain.methods.slc import SLC
from explain.shipped.manifest import SHIPPED_ROOT, read_manifest
from explain.shipped.train import fashion_mnist, pixel_classifier

NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def build(name: str, folder: str, overrides: dict) -> object:
    """The method or variant ``name`` on the shipped models, with a variant's registered config under
    ``overrides``."""
    root = SHIPPED_ROOT
    entry = registered(name)
    method, overrides = entry.method, {**entry.config(), **overrides}
    if method == "c3lt":
        return C3LT(autoencoder=root / "autoencoder", maps=root / folder, **overrides)
    if method == "slc":
        return SLC(autoencoder=root / "autoencoder", sae=root / "sae", **overrides)
    if method == "ldce-cls":
        return LDCE(autoencoder=root / "autoencoder", denoiser=root / "denoiser", **overrides)
    if method == "rcsb":
        return RCSB(bridge=root / "bridge", **overrides)
    raise SystemExit(
        f"{name!r} is not a generative method with shipped models; choose c3lt, slc, ldce-cls, rcsb"
    )


def parse_overrides(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, value = item.split("=", 1)
        method, name = key.split(".", 1)
        out.setdefault(method, {})[name] = float(value) if "." in value or "e" in value else int(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="test images per direction of each pair")
    parser.add_argument("--methods", nargs="+", default=["c3lt", "slc", "ldce-cls", "rcsb-28px"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--set", nargs="*", default=[], help="method.argument=value departures from the paper"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    model = pixel_classifier(SHIPPED_ROOT / "classifier")
    x, y = fashion_mnist("test")
    with torch.no_grad():
        predicted = torch.cat([model.g(model.f(c)).argmax(-1) for c in x.split(1000)])
    pairs = {
        tuple(e["arguments"]["pair"]): folder
        for folder, e in read_manifest()["models"].items()
        if e["kind"] == "c3lt_maps"
    }
    departures = f" except {overrides}" if overrides else ""
    variants = [m for m in args.methods if registered(m).variant]
    departures += f"; variants {', '.join(variants)} as registered" if variants else ""
    print(f"shipped models, paper defaults{departures}; n {args.n} per direction")
    header = f"{'flip':>5} {'L1':>6} {'area':>5} {'NFE':>5} {'s/cf':>6} {'raw out':>7}"
    width = max(9, *(len(m) for m in args.methods))
    print(f"{'method':<{width}} {'direction':<24} {header}")
    totals: dict[str, list[float]] = {}
    for method in args.methods:
        for (a, b), folder in pairs.items():
            explainer = build(method, folder, overrides.get(method, {}))
            for source, target in ((a, b), (b, a)):
                index = torch.nonzero((y == source) & (predicted == source)).flatten()[: args.n]
                start = time.perf_counter()
                results = explainer.explain_batch(
                    model, x[index], [target] * len(index), generator=torch.Generator().manual_seed(0)
                )
                seconds = (time.perf_counter() - start) / len(index)
                flips = [float(r.flipped) for r in results]
                totals.setdefault(method, []).extend(flips)
                nfe = np.mean([sum(v for k, v in r.timings.items() if k.startswith("nfe_")) for r in results])
                direction = f"{NAMES[source][:10]} -> {NAMES[target][:10]}"
                l1 = np.mean([r.timings["l1"] for r in results])
                area = np.mean([r.timings["region_area"] for r in results])
                out = np.mean([r.timings["raw_out_of_range"] for r in results])
                print(
                    f"{method:<{width}} {direction:<24} {np.mean(flips):>5.2f} {l1:>6.3f} {area:>5.2f} "
                    f"{nfe:>5.0f} {seconds:>6.2f} {out:>7.2f}",
                    flush=True,
                )
    for method, flips in totals.items():
        print(f"{method:<{width}} {'all directions':<24} {np.mean(flips):>5.2f}")
    print(
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, {args.threads} torch thread(s))"
    )


if __name__ == "__main__":
    main()
