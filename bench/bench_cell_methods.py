"""Time per counterfactual of the cell-replacement methods at the paper's settings, ours against the plain
reference loop (one candidate per pass of g, as the tests' references), in the same run.

    .venv/bin/python bench/bench_cell_methods.py            # CPU, and the GPU too when CUDA is available
    .venv/bin/python bench/bench_cell_methods.py --quick    # fewer rows, for a smoke run

Settings (Vandenhende et al. 2022, Sec. 4.1): 224 px inputs give 7 x 7 cells; VGG-16 split after the last
pooling layer (g = its 25088 -> 4096 -> 4096 -> 200 MLP head on 512 x 7 x 7), ResNet-50 split at conv5_1
(g = layer4[1:] + pooling + fc on 2048 x 7 x 7), 200 classes (CUB). Random weights: timing does not depend
on them. f is the identity (the inputs are feature maps) so only the search is timed; the auxiliary model u is
a random 1 x 1 convolution to 128-d cells. Each counterfactual runs ``--edits`` greedy steps (default 4, near
the paper's mean #edits of 3.9-5.5) towards the class g ranks lowest, so that no run stops early.

The reference loop would take minutes per counterfactual, so it is timed on ``--reference-candidates``
candidates and extrapolated to the number of candidates our run considered (the same candidates: both searches
make the same choices). On CPU the ResNet-50 rows time ``--resnet-cpu-edits`` step(s) and scale to
``--edits`` (said in the table). Paper anchors (V100): CVE 0.81 s, semantic 1.15 s, semantic without
prefilter 10.82 s, SCOUT 0.06 s.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from explain.methods.cell_search import head_scorer
from explain.methods.cve import CVE
from explain.methods.scout import SCOUT, attribution_maps
from explain.methods.semantic import SemanticCounterfactual
from explain.nets.split import SplitClassifier

NUM_CLASSES = 200
PAPER_V100_S = {"cve": 0.81, "semantic": 1.15, "semantic-nofilter": 10.82, "scout": 0.06}


def vgg16_head(width: int = 4096, d: int = 512) -> nn.Module:
    """VGG-16's head on d x 7 x 7 features; ``width``/``d`` below 4096/512 only for the smoke run (--tiny)."""
    vgg = torchvision.models.vgg16(weights=None, num_classes=NUM_CLASSES)
    if width != 4096 or d != 512:
        vgg.classifier[0] = nn.Linear(d * 49, width)
        vgg.classifier[3] = nn.Linear(width, width)
        vgg.classifier[6] = nn.Linear(width, NUM_CLASSES)
    return nn.Sequential(nn.Flatten(), vgg.classifier).eval()


def resnet50_head(planes: int = 512) -> nn.Module:
    """ResNet-50's layer4[1:] + pooling + fc on 4 * planes x 7 x 7; ``planes`` < 512 only for --tiny."""
    if planes == 512:
        resnet = torchvision.models.resnet50(weights=None, num_classes=NUM_CLASSES)
        return nn.Sequential(resnet.layer4[1:], resnet.avgpool, nn.Flatten(), resnet.fc).eval()
    blocks = [torchvision.models.resnet.Bottleneck(4 * planes, planes) for _ in range(2)]
    return nn.Sequential(
        *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * planes, NUM_CLASSES)
    ).eval()


@dataclass
class Row:
    backbone: str
    method: str
    distractors: int
    edits: float = 0.0
    candidates: int = 0
    scored: int = (
        0  # of the candidates, those the fast scorer scored (the branch and bound left out the rest)
    )
    reference_s: dict[str, float] = field(default_factory=dict)  # by device
    ours_s: dict[str, float] = field(default_factory=dict)  # by column, "cpu" or "cuda bfloat16"
    note: str = ""


def reference_seconds_per_candidate(g: nn.Module, d: int, device: str, n: int, generator) -> float:
    """The plain loop's cost of one candidate on ``device``: clone, replace one cell, one pass of g,
    log-softmax (read back to Python, which also waits for the GPU)."""
    features = torch.rand(1, d, 7, 7, generator=generator).to(device)
    distractor = features.flip(1)
    _, d, h, w = features.shape
    with torch.no_grad():
        g(features)  # warm up
        start = time.perf_counter()
        for k in range(n):
            i, j = divmod(k * 7919 % (h * w * h * w), h * w)
            candidate = features[0].clone()
            candidate[:, i // w, i % w] = distractor[0, :, j // w, j % w]
            float(torch.log_softmax(g(candidate[None])[0], dim=-1)[0])
        return (time.perf_counter() - start) / n


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_method(method, g, d, distractors, edits, device, generator) -> tuple[float, int, int, int]:
    """(seconds, edits made, candidates considered, of those scored) for one counterfactual on ``device``."""
    model = SplitClassifier(f=nn.Identity(), g=g.to(device))
    aux = nn.Conv2d(d, 128, 1).eval().to(device)
    query = torch.rand(1, d, 7, 7, generator=generator).to(device)
    pool = torch.rand(distractors, d, 7, 7, generator=generator).to(device)
    with torch.no_grad():
        target = int(g(query).argmin())
    if hasattr(method, "max_edits"):
        method.max_edits = 1 if device != "cpu" else 0
    # warm up: SCOUT's first autograd pass allocates; on a GPU, kernels load and the allocator grows
    method.explain(model, query, target, pool, aux=aux)
    if hasattr(method, "max_edits"):
        method.max_edits = edits
    synchronise(device)
    start = time.perf_counter()
    result = method.explain(model, query, target, pool, aux=aux)
    synchronise(device)
    seconds = time.perf_counter() - start
    timings = result.timings
    return seconds, len(result.edits), int(timings.get("candidates", 0)), int(timings.get("evaluated", 0))


def scout_reference_seconds(g: nn.Module, d: int, device: str, generator) -> float:
    """SCOUT the plain way: six separate forward and backward passes, one map each."""
    query = torch.rand(1, d, 7, 7, generator=generator).to(device)
    distractor = torch.rand(1, d, 7, 7, generator=generator).to(device)
    attribution_maps(g, query, torch.tensor([1], device=device))  # warm up
    synchronise(device)
    start = time.perf_counter()
    for features in (query, query, query, distractor, distractor, distractor):
        attribution_maps(g, features, torch.tensor([1], device=device))
    with torch.no_grad():
        g(query)
    synchronise(device)
    return time.perf_counter() - start


SETTINGS = {  # name -> [(backbone, label, distractors)]
    "cpu": [
        ("VGG-16", "cve", 1),
        ("VGG-16", "semantic", 1),
        ("VGG-16", "semantic", 10),
        ("VGG-16", "semantic", 20),
        ("VGG-16", "semantic-nofilter", 10),
        ("VGG-16", "scout", 1),
        ("ResNet-50", "cve", 1),
        ("ResNet-50", "semantic", 10),
        ("ResNet-50", "scout", 1),
    ],
    "quick": [("VGG-16", "cve", 1), ("VGG-16", "semantic", 10), ("VGG-16", "scout", 1)],
    "tiny": [("VGG-16", "semantic", 10), ("ResNet-50", "cve", 1), ("ResNet-50", "scout", 1)],
    "gpu": [
        (backbone, label, n)
        for backbone in ("VGG-16", "ResNet-50")
        for label, n in (("cve", 1), ("semantic", 1), ("semantic", 10), ("scout", 1))
    ],
}


def factory(label: str, precision: str):
    if label == "cve":
        return CVE(precision=precision)
    if label == "scout":
        return SCOUT()
    topk = None if label == "semantic-nofilter" else 0.1
    return SemanticCounterfactual(topk=topk, num_distractors=None, precision=precision)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=4)
    parser.add_argument("--reference-candidates", type=int, default=20)
    parser.add_argument("--resnet-cpu-edits", type=int, default=1)
    parser.add_argument(
        "--settings", choices=sorted(SETTINGS), default="cpu", help="which rows (default cpu)"
    )
    parser.add_argument("--quick", action="store_true", help="--settings quick: VGG-16 CVE, semantic, SCOUT")
    parser.add_argument("--devices", default=None, help="comma list (default: cpu, and cuda when present)")
    parser.add_argument(
        "--precisions", default="float32", help="comma list; the fast scores' precision off the CPU"
    )
    parser.add_argument("--tiny", action="store_true", help="heads at 1/8 width, 1 edit: a smoke run")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="skip rows that would overrun")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    devices = (
        args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    precisions = args.precisions.split(",")
    deadline = time.perf_counter() + args.budget_s
    torch.manual_seed(0)
    if args.tiny:
        heads = {"VGG-16": (vgg16_head(512, 64), 64), "ResNet-50": (resnet50_head(64), 256)}
        args.edits, args.reference_candidates = 1, 3
    else:
        heads = {"VGG-16": (vgg16_head(), 512), "ResNet-50": (resnet50_head(), 2048)}
    settings = SETTINGS["quick" if args.quick else args.settings]
    columns = [
        (device, precision)
        for device in devices
        for precision in (["float32"] if device == "cpu" else precisions)
    ]

    setup = {}
    for backbone, (g, d) in heads.items():  # once per classifier: e.g. the VGG head's per-cell weight blocks
        for device, precision in columns:
            synchronise(device)
            start = time.perf_counter()
            head_scorer(g.to(device), d, (7, 7), precision)
            synchronise(device)
            setup[backbone, device, precision] = time.perf_counter() - start
        g.to("cpu")

    rows = []
    per_candidate = {}
    for backbone, label, distractors in settings:
        g, d = heads[backbone]
        row = Row(backbone, label, distractors)
        for device in devices:
            if label != "scout" and (backbone, device) not in per_candidate:
                per_candidate[backbone, device] = reference_seconds_per_candidate(
                    g.to(device), d, device, args.reference_candidates, generator
                )
        for device, precision in columns:
            column = device if device == "cpu" else f"{device} {precision}"
            if time.perf_counter() > deadline:
                row.note += f" {column}: skipped, over the time budget;"
                continue
            edits = args.edits
            if backbone == "ResNet-50" and device == "cpu" and label != "scout":
                edits = min(edits, args.resnet_cpu_edits)
            seconds, made, considered, scored = run_method(
                factory(label, precision), g, d, distractors, edits, device, generator
            )
            if label == "scout":
                row.ours_s[column] = seconds
                row.edits = made
                continue
            scale = args.edits / max(made, 1)
            row.ours_s[column] = seconds * scale
            if not row.candidates:
                row.edits, row.candidates = made * scale, round(considered * scale)
                row.scored = round(scored * scale)
            if scale != 1:
                row.note += f" {column}: {made} step(s) timed, x{scale:g};"
        for device in devices:
            if label == "scout":
                row.reference_s[device] = scout_reference_seconds(g.to(device), d, device, generator)
            else:
                row.reference_s[device] = per_candidate[backbone, device] * row.candidates
        g.to("cpu")
        rows.append(row)
        print(
            f"{backbone} {label} {distractors}: "
            + ", ".join(f"{k} {v:.4f} s" for k, v in row.ours_s.items()),
            flush=True,
        )

    lines = [describe(devices, per_candidate, setup, args.tiny), ""]
    header = "| backbone | method | distractors | edits | candidates | scored |"
    rule = "|---|---|---:|---:|---:|---:|"
    for device in devices:
        header += f" reference loop {device} s |"
        rule += "---:|"
        for column_device, precision in columns:
            if column_device == device:
                name = "CPU" if device == "cpu" else f"{device} {precision}"
                header += f" ours {name} s | speedup |"
                rule += "---:|---:|"
    header += " paper V100 s | note |"
    rule += "---:|---|"
    lines += [header, rule]
    for row in rows:
        line = (
            f"| {row.backbone} | {row.method} | {row.distractors} | {row.edits:g} | {row.candidates} | "
            f"{row.scored} |"
        )
        for device in devices:
            line += f" {row.reference_s[device]:.4g} |"
            for column_device, precision in columns:
                if column_device == device:
                    ours = row.ours_s.get(device if device == "cpu" else f"{device} {precision}")
                    line += (
                        " - | - |"
                        if ours is None
                        else f" {ours:.4g} | {row.reference_s[device] / ours:.0f}x |"
                    )
        line += f" {PAPER_V100_S[row.method]} | {row.note.strip()} |"
        lines.append(line)
    print("\n".join(lines))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")


def describe(devices: list[str], per_candidate: dict, setup: dict, tiny: bool) -> str:
    cpu = platform.processor() or platform.machine()
    text = f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads ({cpu})"
    if any(device.startswith("cuda") for device in devices):
        text += f", GPU: {torch.cuda.get_device_name()}"
    if tiny:
        text += "; TINY heads (1/8 width, 1 edit): a smoke run, not a measurement"
    text += "; reference loop per candidate: " + ", ".join(
        f"{backbone} {device} {seconds * 1e3:.2f} ms" for (backbone, device), seconds in per_candidate.items()
    )
    text += " (extrapolated to the candidates considered)\n"
    text += "one-time setup per classifier, not in the times below: "
    return text + ", ".join(f"{b} {dev} {p} {sec:.2f} s" for (b, dev, p), sec in setup.items())


if __name__ == "__main__":
    main()
