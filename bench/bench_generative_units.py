"""A task's generative units, one by one against one ``explain_batch``, side by side in one run.

A precompute task carries up to 16 units of one method (its declaration's ``batch``); the worker explains
them together when they share plan, condition and models (``explain.precompute.running.work_units_run``).
This times that part without a database: the same pairs and per-unit seeds through
``worker.explain_arrays`` one at a time (the old path) and ``worker.explain_arrays_batch`` (the new one),
classification check, method, metrics and rendering included, and reports whether every unit gets the same
outcome and how far the synthesised images are apart (batched convolutions round differently).

Models: the shipped Fashion-MNIST ones (explain/shipped/), the methods as the CPU demo runs them
(``c3lt``, ``slc-cpu-demo``, ``ldce-cls-cpu-demo``, ``rcsb-cpu-demo``), Pullover -> Shirt test images.

    .venv/bin/python bench/bench_generative_units.py [--units 16] [--threads 1] [--methods c3lt ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_precompute import django_without_database  # noqa: E402

METHODS = ["c3lt", "slc-cpu-demo", "ldce-cls-cpu-demo", "rcsb-cpu-demo"]
CLASS_A, CLASS_B = 2, 6  # Pullover -> Shirt: a pair the shipped C3LT maps translate


def shipped_method(name: str):
    """The registered method or variant with its config, on the shipped backbones."""
    from explain.methods import method_class, registered
    from explain.shipped.manifest import SHIPPED_ROOT, read_manifest

    entry = registered(name)
    folders = {
        e["kind"]: folder for folder, e in read_manifest()["models"].items() if e["kind"] != "c3lt_maps"
    }
    folders["c3lt_maps"] = next(
        folder
        for folder, e in read_manifest()["models"].items()
        if e["kind"] == "c3lt_maps" and tuple(e["arguments"]["pair"]) == (CLASS_A, CLASS_B)
    )
    models = {arg: SHIPPED_ROOT / folders[m.kind] for arg, m in entry.declaration.backbones.items()}
    return method_class(name)(**models, **entry.config()), entry.declaration.requires_flip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--units", type=int, default=16, help="units of one task (default 16)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    django_without_database()
    from explain.precompute.worker import PairArrays, explain_arrays, explain_arrays_batch
    from explain.shipped.manifest import SHIPPED_ROOT
    from explain.shipped.train import fashion_mnist, pixel_classifier

    model = pixel_classifier(SHIPPED_ROOT / "classifier")
    x, y = fashion_mnist("test")
    with torch.no_grad():
        predicted = torch.cat([model.g(model.f(c)).argmax(-1) for c in x.split(1000)])
    queries = torch.nonzero((y == CLASS_A) & (predicted == CLASS_A)).flatten()[: args.units]
    distractors = torch.nonzero((y == CLASS_B) & (predicted == CLASS_B)).flatten()[: args.units]
    pixels = (x[:, 0] * 255).round().to(torch.uint8).numpy()
    pairs = [
        PairArrays(pixels[int(q)], pixels[int(d)], CLASS_A, CLASS_B, seed=1000 + k)
        for k, (q, d) in enumerate(zip(queries, distractors, strict=True))
    ]

    def to_input(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(image.astype(np.float32) / 255.0)[None, None]

    print(
        f"torch {torch.__version__}, {args.threads} torch thread(s), {len(pairs)} units per task, "
        f"load average before {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print("| method | units | one by one s | one batch s | batch faster | same outcomes | max image diff |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for name in args.methods:
        method, requires_flip = shipped_method(name)
        options = {"model": model, "method": method, "to_input": to_input, "blur_sigma": 8.0}
        options["requires_flip"] = requires_flip
        start = time.perf_counter()
        alone = [
            explain_arrays(
                query=p.query,
                distractor=p.distractor,
                class_a=p.class_a,
                class_b=p.class_b,
                seed=p.seed,
                **options,
            )
            for p in pairs
        ]
        one_by_one = time.perf_counter() - start
        start = time.perf_counter()
        together = explain_arrays_batch(pairs=pairs, **options)
        batched = time.perf_counter() - start
        same = all(
            (a.unexplainable is None) == (b.unexplainable is None)
            and (a.counterfactual is None or a.counterfactual.flipped == b.counterfactual.flipped)
            for a, b in zip(alone, together, strict=True)
        )
        gaps = [
            float(np.abs(a.counterfactual.image - b.counterfactual.image).max())
            for a, b in zip(alone, together, strict=True)
            if a.counterfactual is not None and b.counterfactual is not None
        ]
        print(
            f"| {name} | {len(pairs)} | {one_by_one:.1f} | {batched:.1f} | {one_by_one / batched:.1f}x | "
            f"{'yes' if same else 'NO'} | {max(gaps, default=0.0):.1e} |",
            flush=True,
        )
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
