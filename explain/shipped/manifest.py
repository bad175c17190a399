"""The manifest of the shipped models: every file with its sha256, the command and seed that made each model,
its data, steps, final losses and quality card. Django-free.

    python -m explain.shipped.manifest build    # after training: hash the files, measure the cards
    python -m explain.shipped.manifest verify   # what `make demo` does before it uses them
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

SHIPPED_ROOT = Path(__file__).resolve().parent / "fashion-mnist"
MANIFEST_NAME = "manifest.json"
COMMAND_NAME = "command.json"
DATA = (
    "Fashion-MNIST from the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist): models "
    "train on all 60,000 training images; cards are measured on held-out test images"
)
CARD_TEST_PER_CLASS = 100  # held-out test images per class a card reads
CARD_TRAIN_PER_CLASS = 200  # training images per class (the bridge's mean image, the auxiliary's neighbours)


class ShippedModelError(ValueError):
    """A shipped file that is missing or differs from the manifest."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def per_class(x, y, n: int):
    """The first ``n`` images of every class (in file order)."""
    import torch

    keep = torch.cat([torch.nonzero(y == c).flatten()[:n] for c in range(int(y.max()) + 1)])
    return x[keep], y[keep]


def model_card(root: Path, folder: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """The quality card of one shipped model (None for the classifier, which has its test accuracy)."""
    from explain.nets.quality import backbone_card
    from explain.shipped.train import fashion_mnist, pixel_classifier

    kind = record["kind"]
    if kind == "classifier":
        return None
    x_test, y_test = per_class(*fashion_mnist("test"), CARD_TEST_PER_CLASS)
    x_train, y_train = per_class(*fashion_mnist("train"), CARD_TRAIN_PER_CLASS)
    auxiliary_config = None
    if kind == "auxiliary":
        auxiliary_config = json.loads((root / folder / "config.json").read_text())
    return backbone_card(
        kind,
        str(root / folder / "model.pt") if kind == "auxiliary" else str(root / folder),
        classifier=pixel_classifier(root / "classifier"),
        x_test=x_test,
        y_test=y_test,
        x_train=x_train,
        y_train=y_train,
        autoencoder=str(root / "autoencoder"),
        auxiliary_config=auxiliary_config,
    )


def manifest_build(
    root: Path = SHIPPED_ROOT, *, cards: bool = True, measure_again: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Hash every file of every model folder under ``root`` (one with a ``command.json``), add each model's
    card, and write ``root/manifest.json``. A card measured before is kept when the files have not changed,
    unless its folder is in ``measure_again`` (the card's code changed)."""
    import torch

    torch.set_num_threads(1)
    old = read_manifest(root) if (root / MANIFEST_NAME).is_file() else {"models": {}}
    models = {}
    for command in sorted(root.glob(f"*/{COMMAND_NAME}")):
        folder = command.parent.name
        record = json.loads(command.read_text())
        files = {
            str(p.relative_to(root)): {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(command.parent.rglob("*"))
            if p.is_file()
        }
        command_line = record["command"]
        at = command_line.index("--out") + 1  # the folder it wrote to: this one, wherever it was trained
        command_line = [*command_line[:at], _repo_relative(root), *command_line[at + 1 :]]
        entry = {
            "kind": record["kind"],
            "files": files,
            "command": command_line,
            "arguments": {**record["arguments"], "out": _repo_relative(root)},
            "seed": record["arguments"]["seed"],
            "data": DATA,
            "trained_on": record.get("data"),
            "steps": record["steps"],
            "seconds": record["seconds"],
            "final_loss": record["final_loss"],
            **({"test_accuracy": record["test_accuracy"]} if "test_accuracy" in record else {}),
            **({"confusion_matrix": record["confusion_matrix"]} if "confusion_matrix" in record else {}),
        }
        previous = old["models"].get(folder, {})
        if previous.get("files") == files and "card" in previous and folder not in measure_again:
            entry["card"] = previous["card"]
        elif cards:
            entry["card"] = model_card(root, folder, record)
        models[folder] = entry
    manifest = {"data": DATA, "models": models}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _repo_relative(root: Path) -> str:
    repo = Path(__file__).resolve().parents[2]
    return str(root.resolve().relative_to(repo)) if root.resolve().is_relative_to(repo) else str(root)


def read_manifest(root: Path = SHIPPED_ROOT) -> dict[str, Any]:
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ShippedModelError(
            f"{path} is missing; the shipped models come with the repository (git checkout it), or retrain "
            "them with FOIL_DEMO_TRAIN=1 make demo"
        )
    return json.loads(path.read_text())


def manifest_verify(root: Path = SHIPPED_ROOT) -> dict[str, Any]:
    """The manifest, after checking that every listed file exists with its sha256; raises
    ``ShippedModelError`` naming every file that differs."""
    manifest = read_manifest(root)
    wrong = []
    for entry in manifest["models"].values():
        for name, expected in entry["files"].items():
            path = root / name
            if not path.is_file():
                wrong.append(f"{name} is missing")
            elif sha256(path) != expected["sha256"]:
                wrong.append(
                    f"{name} has sha256 {sha256(path)[:12]}..., the manifest {expected['sha256'][:12]}..."
                )
    if wrong:
        raise ShippedModelError(
            f"the shipped models under {root} do not match {MANIFEST_NAME}: {'; '.join(wrong)}. Restore them "
            "(git checkout -- explain/shipped) or retrain them with FOIL_DEMO_TRAIN=1 make demo"
        )
    return manifest


def manifest_retrain(out: Path, root: Path = SHIPPED_ROOT, *, say=None) -> dict[str, Any]:
    """Retrain every model of ``root``'s manifest from scratch into ``out`` with its recorded command (the
    same arguments and seed, ``--out`` set to ``out``), in the manifest's order, then build ``out``'s
    manifest. A model already in ``out`` (its ``command.json`` written) is kept: a second run resumes."""
    import subprocess

    manifest = read_manifest(root)
    out.mkdir(parents=True, exist_ok=True)
    for folder, entry in manifest["models"].items():
        if (out / folder / COMMAND_NAME).is_file():
            continue
        command = list(entry["command"])
        command[command.index("--out") + 1] = str(out)
        if say is not None:
            say(f"   retraining {folder}: {' '.join(command)}")
        subprocess.run([sys.executable, *command[1:]], check=True, cwd=Path(__file__).resolve().parents[2])
    return manifest_build(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m explain.shipped.manifest", description=__doc__.splitlines()[0]
    )
    parser.add_argument("action", choices=["build", "verify"])
    parser.add_argument("--root", type=Path, default=SHIPPED_ROOT)
    parser.add_argument("--no-cards", action="store_true", help="hash only (cards are measured later)")
    parser.add_argument(
        "--measure-again", nargs="+", default=[], metavar="FOLDER",
        help="measure these models' cards again though their files did not change (the card's code did)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.action == "build":
        manifest = manifest_build(args.root, cards=not args.no_cards, measure_again=tuple(args.measure_again))
    else:
        manifest = manifest_verify(args.root)
    for folder, entry in manifest["models"].items():
        card = entry.get("card")
        state = (
            "no card"
            if card is None
            else ("passed" if card["passed"] else "FAILED " + "; ".join(card["failures"]))
        )
        sys.stdout.write(f"{folder}: {len(entry['files'])} files, {entry['steps']} steps, card {state}\n")


if __name__ == "__main__":
    main()
