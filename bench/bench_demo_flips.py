"""Flip rates of the generative methods on the demo's learning images, through the worker's own path.

Builds what `make demo` builds up to the precompute (the embedded Fashion-MNIST, the budget's models: for the
full budget the shipped ones registered after their checksums, for the tiny one the classifier trained here
and the shipped bridge; the demo study with its mined class pairs), takes each pair's learning candidates (the
first n_learning x semantic_pool image pairs of the plan's seeded stream: the random setup shows the first
n_learning, the consistent setup picks from all of them) and explains every query with each method through
``explain.precompute.worker.explain_pair`` (the seed of the unit a plan would give it). Prints one row per
method and pair: flip rate, L1, region area, the share of queries whose region is the method's most common one
(1.00: the same region for every garment), NFE, seconds per counterfactual, and the load average.

    DATABASE_URL=postgres://.../foil_x .venv/bin/python bench/bench_demo_flips.py \
        [--methods c3lt slc ldce-cls rcsb-28px] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

GENERATIVE = ["c3lt", "slc", "ldce-cls", "rcsb-28px"]


def same(masks: Counter) -> float:
    """The share of the counted regions that are the most common one (nan when none was counted)."""
    total = sum(masks.values())
    return masks.most_common(1)[0][1] / total if total else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=GENERATIVE, help="methods or variants to measure")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--budget", default="full", help="the demo budget whose models, study and pairs are used"
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=None,
        help="image pairs per class pair (default: the learning candidates, n_learning x semantic_pool)",
    )
    parser.add_argument(
        "--config",
        type=json.loads,
        default={},
        help="constructor arguments over each method's own, as JSON (e.g. '{\"s\": 1.5}'), as a study's "
        "method_config gives them",
    )
    args = parser.parse_args()

    import django

    django.setup()
    import numpy as np
    import torch
    from django.core.management import call_command

    from explain.methods import registered
    from explain.models import Image
    from explain.precompute.planning import _stream_length, candidate_stream
    from explain.precompute.units import explanation_key, method_backbones, unit_seed
    from explain.precompute.worker import explain_pair
    from studies.demo import BUDGETS, demo_dataset, demo_methods, demo_models, demo_study
    from studies.management.commands.demo import database_ensure

    torch.set_num_threads(args.threads)
    for name in args.methods:
        registered(name)  # an unknown name fails here, with the registry's message
    database_ensure()
    call_command("migrate", verbosity=0)
    budget = BUDGETS[args.budget]
    dataset = demo_dataset(budget=budget)
    classifier = demo_models(dataset=dataset, budget=budget, say=lambda s: None)
    runnable, _ = demo_methods(budget)
    study = demo_study(classifier=classifier, budget=budget, methods=sorted({*runnable, *args.methods}))
    pool = budget.semantic_pool
    conditions = {c.method: c for c in study.conditions.all()}
    print(
        f"demo study {study.title!r}: {args.candidates or f'{study.n_learning} x {pool} learning'} "
        "candidates per pair "
        f"(classifier test accuracy {classifier.test_accuracy:.3f}); worker path, one unit seed each"
    )
    w = max(18, *(len(m) for m in args.methods))
    print(
        f"{'method':<{w}} {'pair':<22} {'flip':>5} {'L1':>6} {'area':>5} {'same':>5} {'NFE':>5} {'s/cf':>6} "
        f"{'load':>5}"
    )
    totals: dict[str, list[float]] = {}
    regions: dict[str, Counter] = {}
    for pair in study.pairs.select_related("class_a", "class_b").order_by("id"):
        count = args.candidates or study.n_learning * pool
        stream = candidate_stream(study=study, pair=pair, length=max(count, _stream_length(study, pool)))
        candidates = stream[:count]
        images = Image.objects.in_bulk([i for q_d in candidates for i in q_d])
        for method in args.methods:
            condition = conditions.get(method) or next(iter(conditions.values()))
            backbones = method_backbones(study, pair, method)
            flips, l1, area, nfe, seconds, masks = [], [], [], [], [], Counter()
            for k, (query, distractor) in enumerate(candidates):
                key = explanation_key(study.pk, pair.pk, condition.pk, k)
                start = time.perf_counter()
                result = explain_pair(
                    classifier=classifier,
                    method_name=method,
                    method_config=args.config,
                    query_image=images[query],
                    distractor_image=images[distractor],
                    class_a=pair.class_a.index,
                    class_b=pair.class_b.index,
                    seed=unit_seed(study, key),
                    blur_sigma=study.blur_sigma,
                    stimulus_region=study.stimulus_region,
                    backbones=dict(backbones),
                )
                seconds.append(time.perf_counter() - start)
                flips.append(float(bool(result.metrics.get("flipped"))))
                if result.counterfactual is not None:
                    masks[(result.counterfactual.query_mask > 0).tobytes()] += 1
                if "l1" in result.metrics:
                    l1.append(result.metrics["l1"])
                    area.append(result.metrics["region_area"])
                    nfe.append(result.metrics["nfe"])
            totals.setdefault(method, []).extend(flips)
            regions.setdefault(method, Counter()).update(masks)
            mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
            print(
                f"{method:<{w}} {str(pair)[:22]:<22} {mean(flips):>5.2f} {mean(l1):>6.3f} {mean(area):>5.2f} "
                f"{same(masks):>5.2f} {mean(nfe):>5.0f} {mean(seconds):>6.2f} {os.getloadavg()[0]:>5.1f}",
                flush=True,
            )
    for method, flips in totals.items():
        print(
            f"{method:<{w}} {'all pairs':<22} {np.mean(flips):>5.2f}  ({int(sum(flips))} of {len(flips)}; "
            f"the most common region for {same(regions[method]):.2f} of the queries)"
        )
    load = os.getloadavg()[0]
    print(f"(load average {load:.1f} on {os.cpu_count()} cores, {args.threads} torch thread(s))")


if __name__ == "__main__":
    main()
