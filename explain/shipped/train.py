"""Train one model of the embedded default (Fashion-MNIST) from the Debian IDX files, without Django.

    python -m explain.shipped.train --kind classifier --out explain/shipped/fashion-mnist --epochs 8
    python -m explain.shipped.train --kind autoencoder --out explain/shipped/fashion-mnist --steps 3000
    python -m explain.shipped.train --kind c3lt_maps --pair 2 4 --out explain/shipped/fashion-mnist

Each kind calls the platform's own pure trainer (``explain.nets``) with the hyperparameters of the Django
trainers (``explain.services.classifier_train``/``auxiliary_train``, ``explain.services.backbones``) on all
60,000 training images (pixels / 255), and writes ``<out>/<kind>/`` (``c3lt_maps-<a>-<b>/`` for a class
pair) in the format the platform loads, plus ``command.json``: the arguments, the seed and the time it took.
The latent denoiser and C3LT's maps read ``<out>/autoencoder``; the SAE and C3LT's maps read
``<out>/classifier``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

KINDS = ("classifier", "auxiliary", "autoencoder", "denoiser", "bridge", "sae", "c3lt_maps")
NUM_CLASSES = 10


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m explain.shipped.train", description=__doc__.splitlines()[0])
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--out", required=True, help="the folder of the shipped models (one sub-folder per model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (generative backbones)")
    p.add_argument("--epochs", type=int, default=8, help="passes over the data (classifier, auxiliary)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="default: the Django trainer's for the kind")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64], help="diffusers block_out_channels")
    p.add_argument(
        "--width", type=int, default=32,
        help="classifier / auxiliary width (C3LT's maps are as released: hidden width = the latent size)",
    )  # fmt: skip
    p.add_argument("--pair", type=int, nargs=2, metavar=("A", "B"), help="class indices (c3lt_maps)")
    p.add_argument("--l1", type=float, default=1e-3, help="the SAE's sparsity weight lambda (Eq. 6)")
    p.add_argument(
        "--ema-decay", type=float, default=0.999, help="the latent denoiser's weight averaging (EMA) decay"
    )
    p.add_argument(
        "--beta-max", type=float, default=1.0,
        help="the bridge's noise schedule (RCSB's release: 1.0; I2SB's own default: 0.3)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p


DEFAULT_LR = {
    "classifier": 3e-3,
    "auxiliary": 0.05,
    "autoencoder": 1e-3,
    "denoiser": 3e-4,
    "bridge": 3e-4,
    "sae": 1e-3,
    "c3lt_maps": 1e-3,
}


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 28, 28) float images in [0, 1] and (N,) int64 labels of the split."""
    from explain.data.idx import load_fashion_mnist

    images, labels = load_fashion_mnist()[split]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels).long()


def load_shipped_classifier(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The shipped classifier (eval mode) and its ``config.json``."""
    from explain.nets.classifiers import load_classifier

    config = json.loads((folder / "config.json").read_text())
    model = load_classifier(
        config["architecture"], folder / "model.pt", NUM_CLASSES, in_channels=1, **config["options"]
    )
    return model, config


def pixel_classifier(folder: Path):
    """The shipped classifier as the generative methods see it: pixels in [0, 1], normalisation first in f."""
    from torchvision.transforms import Normalize

    from explain.methods.base import SplitClassifier
    from explain.nets.classifiers import split_classifier

    model, config = load_shipped_classifier(folder)
    split = split_classifier(model, config["architecture"])
    norm = config["normalisation"]
    f = nn.Sequential(Normalize(norm["mean"], norm["std"]), split.f).eval()
    return SplitClassifier(f=f, g=split.g.eval())


def train_classifier_kind(args, out: Path) -> dict[str, Any]:
    from explain.nets.classifiers import build_classifier
    from explain.nets.training import evaluate, train_classifier

    x, y = fashion_mnist("train")
    mean, std = float(x.double().mean()), float(x.double().std())
    normalisation = {"mean": [round(mean, 4)], "std": [round(std, 4)]}
    normalise = lambda t: (t - normalisation["mean"][0]) / normalisation["std"][0]  # noqa: E731
    torch.manual_seed(args.seed)
    model = build_classifier("small_cnn", NUM_CLASSES, 1, width=args.width)
    curve = train_classifier(
        model, normalise(x), y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    tx, ty = fashion_mnist("test")
    accuracy, confusion, _ = evaluate(model, normalise(tx), ty, NUM_CLASSES)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    config = {"architecture": "small_cnn", "options": {"width": args.width}, "normalisation": normalisation}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return {
        "data": {"split": "train", "images": len(x)},
        "steps": curve["steps"],
        "loss_per_epoch": curve["loss"],
        "final_loss": curve["loss"][-1],
        "test_accuracy": accuracy,
        "confusion_matrix": confusion,
    }


def train_auxiliary_kind(args, out: Path) -> dict[str, Any]:
    from explain.nets.auxiliary import SimSiamNet, train_simsiam

    x, _ = fashion_mnist("train")
    normalisation = {"mean": [0.5], "std": [0.5]}
    torch.manual_seed(args.seed)
    model = SimSiamNet(in_channels=1, width=args.width, dim=64)
    curve = train_simsiam(
        model, (x - 0.5) / 0.5, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        generator=torch.Generator().manual_seed(args.seed), progress=_progress("auxiliary"),
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    config = {
        "architecture": "simsiam",
        "net": model.config(),
        "input_size": 28,
        "normalisation": normalisation,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return {
        "data": {"split": "train", "images": len(x)},
        "steps": curve["steps"],
        "loss_per_epoch": curve["loss"],
        "final_loss": curve["loss"][-1],
    }


def _progress(kind: str):
    """Print ``kind: done/total`` every 100 steps (a background run has no terminal bar)."""
    started = time.perf_counter()

    def report(done: int, total: int) -> None:
        if done % 100 == 0 or done == total:
            seconds = time.perf_counter() - started
            sys.stderr.write(f"{kind}: {done}/{total} steps, {seconds:.0f} s\n")
            sys.stderr.flush()

    return report


def _generator(args) -> torch.Generator:
    return torch.Generator().manual_seed(args.seed)


def _record(out: Path) -> dict[str, Any]:
    from explain.nets.training_record import read_record

    record = read_record(out)
    losses = record.get("loss_every_step") or []
    parts = {k: record[k] for k in ("parts_first", "parts_last_10pct") if k in record}
    return {"data": record.get("data"), "steps": record["steps"], "final_loss": record["loss_last_10pct"],
            "first_loss": record["loss_first"], "loss_every_100": losses[::100], **parts}  # fmt: skip


def train_autoencoder_kind(args, out: Path) -> dict[str, Any]:
    from explain.nets.autoencoder import autoencoder_config, train_autoencoder

    x, _ = fashion_mnist("train")
    widths = tuple(args.widths)
    cfg = autoencoder_config(1, block_out_channels=widths, sample_size=28, norm_num_groups=min(16, widths[0]))
    train_autoencoder(
        x, out, args.steps, batch_size=args.batch_size, lr=args.lr, config=cfg, generator=_generator(args),
        progress=_progress("autoencoder"), data_note="Fashion-MNIST training split (60,000 images)",
    )  # fmt: skip
    return _record(out)


def train_denoiser_kind(args, out: Path) -> dict[str, Any]:
    from explain.nets.autoencoder import encode, load_autoencoder
    from explain.nets.diffusion import denoiser_config, train_denoiser

    x, y = fashion_mnist("train")
    vae = load_autoencoder(out.parent / "autoencoder")
    with torch.no_grad():
        latents = torch.cat([encode(vae, chunk) for chunk in x.split(512)])
    widths = tuple(args.widths)
    cfg = denoiser_config(
        NUM_CLASSES, latents.shape[1], latents.shape[-1], block_out_channels=widths,
        norm_num_groups=min(32, widths[0]),
    )  # fmt: skip
    train_denoiser(
        latents, y, out, args.steps, num_classes=NUM_CLASSES, batch_size=args.batch_size, lr=args.lr,
        ema_decay=args.ema_decay, config=cfg, generator=_generator(args), progress=_progress("denoiser"),
        data_note="latents of the shipped autoencoder",
    )  # fmt: skip
    return _record(out)


def train_bridge_kind(args, out: Path) -> dict[str, Any]:
    from explain.nets.bridge import BridgeSchedule, bridge_config, train_bridge

    x, _ = fashion_mnist("train")
    widths = tuple(args.widths)
    cfg = bridge_config(1, 28, widths, norm_num_groups=min(16, widths[0]))
    train_bridge(
        x, out, args.steps, batch_size=args.batch_size, lr=args.lr, config=cfg, generator=_generator(args),
        schedule=BridgeSchedule(beta_max=args.beta_max),
        progress=_progress("bridge"), data_note="Fashion-MNIST training split (60,000 images)",
    )  # fmt: skip
    return _record(out)


def train_sae_kind(args, out: Path) -> dict[str, Any]:
    from explain.nets.sae import pooled_features, train_sae

    x, _ = fashion_mnist("train")
    split = pixel_classifier(out.parent / "classifier")
    with torch.no_grad():
        features = torch.cat([pooled_features(split.f, chunk) for chunk in x.split(512)])
    train_sae(
        features, out, args.steps, lambda_=args.l1, batch_size=args.batch_size, lr=args.lr,
        generator=_generator(args),
        progress=_progress("sae"), data_note="pooled features of the shipped classifier",
    )  # fmt: skip
    return _record(out)


def train_c3lt_kind(args, out: Path) -> dict[str, Any]:
    from explain.nets.autoencoder import load_autoencoder
    from explain.nets.c3lt_maps import train_c3lt_maps

    if not args.pair or args.pair[0] == args.pair[1]:
        sys.exit(f"--pair is {args.pair}; give two different class indices, e.g. --pair 2 4")
    a, b = args.pair
    x, y = fashion_mnist("train")
    vae = load_autoencoder(out.parent / "autoencoder")
    split = pixel_classifier(out.parent / "classifier")
    train_c3lt_maps(
        vae, split, x[y == a], x[y == b], a, b, out, args.steps, batch_size=args.batch_size, lr=args.lr,
        generator=_generator(args), progress=_progress("c3lt_maps"),
        data_note=f"classes {a} and {b} of the training split",
    )  # fmt: skip
    return _record(out)


TRAINERS = {
    "classifier": train_classifier_kind,
    "auxiliary": train_auxiliary_kind,
    "autoencoder": train_autoencoder_kind,
    "denoiser": train_denoiser_kind,
    "bridge": train_bridge_kind,
    "sae": train_sae_kind,
    "c3lt_maps": train_c3lt_kind,
}


def folder_name(kind: str, pair: list[int] | None) -> str:
    return f"c3lt_maps-{pair[0]}-{pair[1]}" if kind == "c3lt_maps" else kind


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.lr = args.lr if args.lr is not None else DEFAULT_LR[args.kind]
    torch.set_num_threads(args.threads)
    out = Path(args.out) / folder_name(args.kind, args.pair)
    started = time.perf_counter()
    result = TRAINERS[args.kind](args, out)
    argv_used = sys.argv[1:] if argv is None else argv
    record = {
        "kind": args.kind,
        "command": ["python", "-m", "explain.shipped.train", *argv_used],
        "arguments": {k: v for k, v in vars(args).items() if k != "threads"},
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        **result,
    }
    (out / "command.json").write_text(json.dumps(record, indent=1, default=float))
    shown = {k: v for k, v in record.items() if k not in ("confusion_matrix", "loss_every_100")}
    sys.stdout.write(json.dumps(shown, default=float) + "\n")


if __name__ == "__main__":
    main()
