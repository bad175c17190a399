"""The semantic search against the authors' released code, side by side in one run on the same inputs.

    .venv/bin/python -m bench.bench_authors --authors PATH     # PATH: a local copy of the authors' repository

PATH is a checkout of facebookresearch/visual-counterfactuals (Vandenhende et al. 2022) that you provide;
its ``counterfactuals/explainer/counterfactuals.py`` is imported from there at run time and never copied here.
On a machine without CUDA its ``.cuda()`` calls are made no-ops for the run. Setting: a random VGG-16 head
(200 classes) on 512 x 7 x 7 features, a random 1 x 1 convolution as the auxiliary model (128-d cells),
lambda 0.4, tau 0.1, top-k 10%, 2 torch threads (``--threads``). Both run until the decision flips,
towards the query's runner-up class. The table gives each one's wall-clock and CPU seconds (this process,
all threads) per counterfactual, the ratios, and whether the edits are identical, with the load average
before and after: on a shared machine the wall-clock ratio moves with the other jobs (``--repeat N`` runs
each pair N times and gives the medians). Ours runs after one
warm-up call that builds the per-classifier caches (VGG's per-cell weight blocks, the int8 copy of its
second layer; kept while the classifier lives, as in a worker); the authors' code has no such setup.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench.bench_cell_methods import vgg16_head
from explain.methods import cell_bounds
from explain.methods.base import SplitClassifier
from explain.methods.semantic import SemanticCounterfactual

LAMBDA, TAU, TOPK = 0.4, 0.1, 0.1


def load_authors(root: Path):
    path = root / "counterfactuals" / "explainer" / "counterfactuals.py"
    if not path.is_file():
        raise SystemExit(
            f"{path} not found: --authors must be a local checkout of facebookresearch/visual-counterfactuals"
        )
    spec = importlib.util.spec_from_file_location("authors_counterfactuals", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compute_counterfactual


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--authors", type=Path, required=True, help="local copy of visual-counterfactuals")
    parser.add_argument("--distractors", default="1,10", help="comma list of distractor counts")
    parser.add_argument("--seeds", type=int, default=2, help="counterfactuals per distractor count")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each pair (authors then ours); the table gives medians"
    )
    parser.add_argument(
        "--intervals",
        choices=["auto", "float32", "int8"],
        default="auto",
        help="the bounds' switch-term intervals: auto (this CPU's pick), or float32 / int8 to measure the "
        "other path here (e.g. an AVX2-only machine's float32 intervals on one with fast int8 products)",
    )
    parser.add_argument(
        "--omp-wait",
        choices=["passive", "active"],
        help="run with OMP_WAIT_POLICY set so (the script starts itself again: OpenMP reads it once, at "
        "load): passive makes idle OpenMP threads sleep instead of spinning, which on a loaded machine keeps "
        "two threads from waiting on each other at every parallel operation (both codes run in one process)",
    )
    args = parser.parse_args()
    if args.omp_wait and os.environ.get("OMP_WAIT_POLICY", "").lower() != args.omp_wait:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait
        os.execv(sys.executable, [sys.executable, "-m", "bench.bench_authors", *sys.argv[1:]])
    if args.intervals != "auto":
        cell_bounds.int8_products_fast = lambda: args.intervals == "int8"
    compute_counterfactual = load_authors(args.authors)
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # the authors' code moves everything to the GPU
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = vgg16_head()
    aux = nn.Conv2d(512, 128, 1).eval()
    model = SplitClassifier(f=nn.Identity(), g=g)
    ours_method = SemanticCounterfactual(lambda_=LAMBDA, tau=TAU, topk=TOPK, num_distractors=None)
    with torch.no_grad():  # the per-classifier setup (VGG's per-cell weight blocks), cached like a worker's
        warm = torch.rand(2, 512, 7, 7)
        ours_method.explain(model, warm[:1], int(g(warm[:1]).argmin()), warm[1:], aux=aux)
    cpu = platform.processor() or platform.machine()
    wait = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads ({cpu}), OMP_WAIT_POLICY {wait}")
    fast = cell_bounds.int8_products_fast()
    if args.intervals == "auto":
        why = f"{'fast' if fast else 'slow'} int8 products measured here"
    else:
        why = f"--intervals {args.intervals}"
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}: the bounds' intervals from "
        f"{'int8' if fast else 'float32'} products ({why})"
    )
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(
        "| distractors | seed | edits | authors s | ours s | ours faster | authors CPU s | ours CPU s | "
        "ours faster (CPU) | same edits |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n in [int(x) for x in args.distractors.split(",")]:
        for seed in range(args.seeds):
            generator = torch.Generator().manual_seed(1000 * n + seed)
            query = torch.rand(1, 512, 7, 7, generator=generator)
            distractors = torch.rand(n, 512, 7, 7, generator=generator)
            with torch.no_grad():
                target = int(g(query)[0].topk(2).indices[1])  # the runner-up class: a few edits flip it
                query_aux, distractor_aux = aux(query)[0], aux(distractors)
            runs = []
            for _ in range(args.repeat):
                start, cpu = time.perf_counter(), time.process_time()
                try:
                    theirs = compute_counterfactual(
                        query[0], distractors, g, target, query_aux, distractor_aux, LAMBDA, TAU, TOPK
                    )
                except ValueError:  # their loop has no cap: it fails once no candidate is left
                    theirs = None
                authors = (time.perf_counter() - start, time.process_time() - cpu)
                start, cpu = time.perf_counter(), time.process_time()
                ours = ours_method.explain(model, query, target, distractors, aux=aux)
                runs.append((*authors, time.perf_counter() - start, time.process_time() - cpu))
            authors_s, authors_cpu, ours_s, ours_cpu = (
                statistics.median(column) for column in zip(*runs, strict=True)
            )
            ours_edits = [(e.query_cell, e.distractor * 49 + e.distractor_cell) for e in ours.edits]
            theirs_edits = [(int(i), int(j)) for i, j in theirs] if theirs is not None else "no flip"
            same = "yes" if ours_edits == theirs_edits else f"NO: {theirs_edits} vs {ours_edits}"
            print(
                f"| {n} | {seed} | {len(ours_edits)} | {authors_s:.2f} | {ours_s:.2f} | "
                f"{authors_s / ours_s:.1f}x | {authors_cpu:.2f} | {ours_cpu:.2f} | "
                f"{authors_cpu / ours_cpu:.1f}x | {same} |",
                flush=True,
            )
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
