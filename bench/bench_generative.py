"""Generative counterfactuals on the embedded default (Fashion-MNIST 28 x 28, SmallCNN): quality and speed.

Trains (once, cached under --cache) the classifier and every backbone on small budgets, then, per method
and class pair (both directions), prints flip rate, COUT (C3LT's definition), L1, S3-like similarity (cosine
of the classifier's pooled features, not SimSiam), region area, NFE and seconds per counterfactual, and the
throughput at batch 1 and batch 16 on CPU (and on CUDA when present).

    .venv/bin/python bench/bench_generative.py            # first run trains the backbones (minutes)
    .venv/bin/python bench/bench_generative.py --n 8      # fewer queries per direction
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explain.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from explain.methods import registered
from explain.methods.c3lt import C3LT
from explain.methods.generative import cout, s3_similarity
from explain.methods.ldce import LDCE
from explain.methods.rcsb import RCSB
from explain.methods.slc import SLC
from explain.nets.autoencoder import autoencoder_config, encode, load_autoencoder, train_autoencoder
from explain.nets.bridge import bridge_config, load_bridge, train_bridge
from explain.nets.c3lt_maps import load_c3lt_maps, train_c3lt_maps
from explain.nets.diffusion import denoiser_config, load_denoiser, train_denoiser
from explain.nets.sae import load_sae, pooled_features, train_sae
from explain.nets.small_cnn import SmallCNN

PAIRS = [(6, 4), (0, 2), (7, 9)]  # shirt/coat, t-shirt/pullover, sneaker/ankle boot


def classifier(cache: Path, x: torch.Tensor, y: torch.Tensor, steps: int) -> SmallCNN:
    path = cache / "classifier.pt"
    model = SmallCNN(num_classes=10, width=16)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(steps):
        index = torch.randint(0, len(x), (128,), generator=generator)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 200 == 0:
            print(f"classifier step {step}: loss {loss.item():.3f}", file=sys.stderr)
    torch.save(model.state_dict(), path)
    return model.eval()


def backbones(cache: Path, x: torch.Tensor, y: torch.Tensor, split, budget: dict[str, int]) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    if not (cache / "autoencoder").is_dir():
        cfg = autoencoder_config(block_out_channels=(16, 32), norm_num_groups=8)
        train_autoencoder(
            x[:20000], cache / "autoencoder", budget["autoencoder"], config=cfg, batch_size=32, generator=g
        )
    out["vae"] = load_autoencoder(cache / "autoencoder")
    if not (cache / "denoiser").is_dir():
        with torch.no_grad():
            z = torch.cat([encode(out["vae"], x[i : i + 500]) for i in range(0, 20000, 500)])
        train_denoiser(
            z,
            y[:20000],
            cache / "denoiser",
            budget["denoiser"],
            num_classes=10,
            batch_size=32,
            generator=g,
            config=denoiser_config(10, z.shape[1], z.shape[-1], (32, 64), norm_num_groups=16),
        )
    out["denoiser"] = load_denoiser(cache / "denoiser")
    if not (cache / "bridge").is_dir():
        cfg = bridge_config(1, 28, (16, 32), norm_num_groups=8)
        train_bridge(x[:20000], cache / "bridge", budget["bridge"], config=cfg, batch_size=32, generator=g)
    out["bridge"] = load_bridge(cache / "bridge")
    if not (cache / "sae").is_dir():
        with torch.no_grad():
            feats = torch.cat([pooled_features(split.f, x[i : i + 500]) for i in range(0, 20000, 500)])
        train_sae(feats, cache / "sae", budget["sae"], generator=g)
    out["sae"] = load_sae(cache / "sae")
    for a, b in PAIRS:
        d = cache / f"c3lt_{a}_{b}"
        if not d.is_dir():
            train_c3lt_maps(
                out["vae"],
                split,
                x[y == a][:3000],
                x[y == b][:3000],
                a,
                b,
                d,
                budget["c3lt"],
                batch_size=32,
                generator=g,
            )
        out[(a, b)] = load_c3lt_maps(d)
    return out


def queries(
    model, x: torch.Tensor, y: torch.Tensor, a: int, b: int, n: int
) -> tuple[torch.Tensor, list[int]]:
    """``n`` test images of each class that the classifier gets right, each aimed at the other class."""
    chosen, targets = [], []
    with torch.no_grad():
        for source, target in ((a, b), (b, a)):
            candidates = x[y == source][: 4 * n]
            right = candidates[model(candidates).argmax(-1) == source][:n]
            chosen.append(right)
            targets += [target] * len(right)
    return torch.cat(chosen), targets


def evaluate(method, split, x, targets, batch_size) -> dict:
    start = time.perf_counter()
    results = method.explain_batch(
        split, x, targets, generator=torch.Generator().manual_seed(0), batch_size=batch_size
    )
    seconds = (time.perf_counter() - start) / len(x)
    rows = {"flip": [], "cout": [], "l1": [], "s3": [], "area": [], "nfe": []}
    with torch.no_grad():
        sources = split.g(split.f(x)).argmax(-1)
    for i, r in enumerate(results):
        x_cf = torch.from_numpy(r.image)[None]
        rows["flip"].append(float(r.flipped))
        rows["cout"].append(cout(split, x[i : i + 1], x_cf, int(sources[i]), r.target))
        rows["l1"].append(r.timings["l1"])
        rows["s3"].append(s3_similarity(split.f, x[i : i + 1], x_cf))
        rows["area"].append(r.timings["region_area"])
        rows["nfe"].append(max(v for k, v in r.timings.items() if k.startswith("nfe_")))
    return {k: float(np.mean(v)) for k, v in rows.items()} | {"s_per_cf": seconds}


def throughput(method, split, x, targets, batch: int) -> float:
    """Counterfactuals per second at ``batch`` (one batch of that size, after a warm-up item)."""
    method.explain_batch(split, x[:1], targets[:1], batch_size=1)
    count = batch if batch > 1 else 2
    start = time.perf_counter()
    method.explain_batch(split, x[:count], targets[:count], batch_size=batch)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=16, help="queries per direction of each pair")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--cache", type=Path, default=Path("var/bench_generative"))
    parser.add_argument(
        "--methods",
        default="c3lt,slc,ldce-cls,rcsb-28px",
        help="methods or variants (rcsb's release cells do not tile 28 px: rcsb-28px)",
    )
    parser.add_argument(
        "--budget", default="classifier=400,autoencoder=250,denoiser=400,bridge=400,sae=300,c3lt=60"
    )
    parser.add_argument(
        "--all-throughput", action="store_true", help="throughput on every pair, not the first"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget = {k: int(v) for k, v in (item.split("=") for item in args.budget.split(","))}
    args.cache.mkdir(parents=True, exist_ok=True)
    data = load_fashion_mnist()
    x = torch.from_numpy(data["train"][0]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(data["train"][1])
    x_test = torch.from_numpy(data["test"][0]).float().div(255).unsqueeze(1)
    y_test = torch.from_numpy(data["test"][1])
    model = classifier(args.cache, x, y, budget["classifier"])
    with torch.no_grad():
        accuracy = float(
            (torch.cat([model(x_test[i : i + 1000]).argmax(-1) for i in range(0, 10000, 1000)]) == y_test)
            .float()
            .mean()
        )
    split = model.split()
    nets = backbones(args.cache, x, y, split, budget)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"classifier test accuracy {accuracy:.3f}; budgets {budget}; threads {args.threads}; "
        f"n {args.n}/direction"
    )
    header = (
        f"{'method':9} {'pair':22} {'dev':4} {'flip':>5} {'COUT':>6} {'L1':>6} {'S3clf':>6} {'area':>5} "
        f"{'NFE':>5} {'s/cf':>6} {'cf/s@1':>7} {'cf/s@16':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.methods.split(","):
        for a, b in PAIRS:
            for device in devices:
                method = build(name, nets, a, b, device)
                s = split if device == "cpu" else type(split)(f=split.f.to(device), g=split.g.to(device))
                q, targets = queries(model, x_test, y_test, a, b, args.n)
                q = q.to(device)
                r = evaluate(method, s, q, targets, batch_size=16)
                if (a, b) == PAIRS[0] or args.all_throughput:
                    r["tp1"] = throughput(method, s, q, targets, 1)
                    reps = -(-16 // len(q))
                    r["tp16"] = throughput(method, s, q.repeat(reps, 1, 1, 1), targets * reps, 16)
                else:
                    r["tp1"] = r["tp16"] = float("nan")
                pair = f"{FASHION_MNIST_CLASSES[a][:9]}<->{FASHION_MNIST_CLASSES[b][:10]}"
                print(
                    f"{name:9} {pair:22} {device:4} {r['flip']:5.2f} {r['cout']:6.2f} {r['l1']:6.3f} "
                    f"{r['s3']:6.3f} "
                    f"{r['area']:5.2f} {r['nfe']:5.0f} {r['s_per_cf']:6.2f} {r['tp1']:7.2f} {r['tp16']:8.2f}",
                    flush=True,
                )
                rows.append({"method": name, "pair": [a, b], "device": device, **r})
                split.f.to("cpu"), split.g.to("cpu")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def build(name: str, nets: dict, a: int, b: int, device: str):
    for module in (
        nets["vae"],
        nets["denoiser"].unet,
        nets["bridge"].unet,
        nets["sae"],
        nets[(a, b)].g,
        nets[(a, b)].h,
    ):
        module.to(device)
    if name == "c3lt":
        return C3LT(autoencoder=nets["vae"], maps=nets[(a, b)])
    if name == "slc":
        return SLC(autoencoder=nets["vae"], sae=nets["sae"])
    if name == "ldce-cls":
        return LDCE(autoencoder=nets["vae"], denoiser=nets["denoiser"])
    if name in ("rcsb", "rcsb-28px"):
        return RCSB(bridge=nets["bridge"], **registered(name).config())
    raise ValueError(f"unknown method {name!r}; choose from c3lt, slc, ldce-cls, rcsb-28px")


if __name__ == "__main__":
    main()
