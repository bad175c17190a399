"""Stimuli per minute of the precompute pipeline on the embedded default (Fashion-MNIST, built-in CNN, CVE).

Columns, side by side in one run:
- "1 worker (Redis, PostgreSQL)": a real `celery worker --pool=solo` process runs the study's work units; time
  from planning to the study being ready; stimuli kept per minute (the semantic setup explains 3 candidates
  per kept stimulus, so units per minute are reported too).
- "compute only": the same explanations and renderings in this process without database, broker or storage
  (what the pipeline adds is the difference).
- "compute only, GPU": the same on CUDA, when a GPU is present.

    .venv/bin/python bench/bench_precompute.py                 # CPU, with a worker (needs PostgreSQL + Redis)
    .venv/bin/python bench/bench_precompute.py --compute-only  # no database or broker (e.g. a GPU machine)

The worker part creates its rows in the configured database (DATABASE_URL) and deletes them afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLASS_A, CLASS_B = 4, 2  # Coat vs Pullover


def train_cnn(path: Path, steps: int, data: Path) -> float:
    from explain.data.idx import load_fashion_mnist
    from explain.nets.small_cnn import SmallCNN

    images, labels = load_fashion_mnist(data)["train"]
    keep = np.flatnonzero(np.isin(labels, (CLASS_A, CLASS_B)))[:4000]
    x = torch.from_numpy(images[keep].astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels[keep])
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, in_channels=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(len(x), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x[:1000]).argmax(1) == y[:1000]).float().mean())
    torch.save(model.state_dict(), path)
    return accuracy


def candidate_pairs(n: int, data: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    from explain.data.idx import load_fashion_mnist

    images, labels = load_fashion_mnist(data)["train"]
    a = np.flatnonzero(labels == CLASS_A)[4000 : 4000 + n]
    b = np.flatnonzero(labels == CLASS_B)[4000 : 4000 + n]
    return [(images[i], images[j]) for i, j in zip(a, b, strict=True)]


def django_without_database() -> None:
    """Django's app registry with no database: ``explain.precompute.worker`` imports the model classes (not
    rows), so the compute-only run needs Django installed but no settings module, database or broker."""
    import django
    from django.conf import settings

    if not settings.configured and "DJANGO_SETTINGS_MODULE" not in os.environ:
        apps = ["django.contrib.contenttypes", "django.contrib.auth", "explain", "studies"]
        settings.configure(INSTALLED_APPS=apps, DATABASES={}, BASE_DIR=ROOT)
    django.setup()


def compute_only(checkpoint: Path, pairs, device: str) -> tuple[float, int]:
    """Seconds and flipped stimuli for explaining and rendering ``pairs`` in this process on ``device``."""
    django_without_database()
    from explain.methods.cve import CVE
    from explain.nets.small_cnn import SmallCNN
    from explain.precompute.worker import explain_arrays

    model = SmallCNN(num_classes=10, in_channels=1)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    split = model.eval().to(device).split()

    def to_input(pixels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(pixels.astype(np.float32) / 255.0)[None, None].to(device)

    kept = 0
    explain_arrays(
        model=split,
        method=CVE(),
        query=pairs[0][0],
        distractor=pairs[0][1],
        to_input=to_input,
        class_a=CLASS_A,
        class_b=CLASS_B,
        seed=0,
        blur_sigma=8.0,
    )  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i, (query, distractor) in enumerate(pairs):
        result = explain_arrays(
            model=split,
            method=CVE(),
            query=query,
            distractor=distractor,
            to_input=to_input,
            class_a=CLASS_A,
            class_b=CLASS_B,
            seed=i,
            blur_sigma=8.0,
        )
        kept += result.unexplainable is None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, kept


def with_worker(checkpoint: Path, n_learning: int) -> tuple[float, int, int]:
    """Seconds from planning to ready, stimuli kept, and units run, with one real worker process."""
    import subprocess

    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    django.setup()
    from django.conf import settings
    from django.core.files.base import ContentFile
    from django.core.management import call_command
    from django.db import connection

    from explain.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
    from explain.models import Classifier, ClassLabel, Dataset, Image, WorkUnit
    from explain.precompute import study_precompute
    from studies.management.commands.demo import database_ensure
    from studies.models import Study
    from studies.services import class_pair_add, study_create
    from tests.explain.precompute_helpers import png

    database_ensure()  # the database named in DATABASE_URL, created when missing
    call_command("migrate", verbosity=0)
    tag = uuid.uuid4().hex[:8]
    dataset = Dataset.objects.create(
        name=f"bench-{tag}", kind="fashion-mnist", root_path="/usr/share/datasets"
    )
    labels = [
        ClassLabel.objects.create(dataset=dataset, index=i, name=n)
        for i, n in enumerate(FASHION_MNIST_CLASSES)
    ]
    images, targets = load_fashion_mnist()["train"]
    for cls in (CLASS_A, CLASS_B):
        for i in np.flatnonzero(targets == cls)[4000 : 4000 + 8 * n_learning]:
            image = Image(dataset=dataset, class_label=labels[cls], source_id=f"train-{i}", split="train")
            image.file.save(f"{uuid.uuid4().hex}.png", ContentFile(png(images[i])), save=False)
            image.save()
    classifier = Classifier.objects.create(
        dataset=dataset,
        name=f"bench-{tag}",
        architecture="small_cnn",
        checkpoint_path=str(checkpoint),
        split_point="features",
        input_size=28,
        in_channels=1,
        options={"width": 64},
    )
    study = study_create(
        title=f"bench-{tag}", dataset=dataset, classifier=classifier, methods=["cve"], n_learning=n_learning
    )
    class_pair_add(study=study, class_a=labels[CLASS_A], class_b=labels[CLASS_B])

    queue = f"bench-{tag}"
    db = connection.settings_dict
    url = f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FOIL_DEVICE": "cpu", "DATABASE_URL": url}
    env["FOIL_BROKER_NAMESPACE"] = (
        settings.FOIL_BROKER_NAMESPACE
    )  # the sender's, whatever the database's name
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-worker-{tag}.log", "w")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config.celery_app",
            "worker",
            "-Q",
            queue,
            "--pool=solo",
            "-n",
            f"{queue}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel=warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(8)  # let the worker import torch and connect before the clock starts
        start = time.perf_counter()
        plan = study_precompute(study=study, queue=queue)
        while Study.objects.get(pk=study.pk).status != Study.Status.READY:
            if plan.units.exclude(status__in=WorkUnit.TERMINAL).count() == 0:
                break
            time.sleep(0.25)
        seconds = time.perf_counter() - start
        kept = study.explanations.count()
        units = plan.units.count()
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        log.close()
        study.delete()
        classifier.delete()
        dataset.images.all().delete()
        dataset.delete()
    return seconds, kept, units


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--compute-only", action="store_true", help="skip the worker (no database or broker)")
    parser.add_argument("--n-learning", type=int, default=10, help="stimuli per condition (default 10)")
    parser.add_argument("--train-steps", type=int, default=80)
    parser.add_argument(
        "--data", type=Path, default=None, help="folder of the Fashion-MNIST IDX files (default: Debian's)"
    )
    parser.add_argument("--devices", default=None, help="comma list for compute only (default: cpu, cuda)")
    args = parser.parse_args()
    from explain.data.idx import FASHION_MNIST_ROOT

    data = args.data or FASHION_MNIST_ROOT
    torch.set_num_threads(1)
    checkpoint = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-small-cnn-{uuid.uuid4().hex[:8]}.pt"
    accuracy = train_cnn(checkpoint, args.train_steps, data)
    print(f"built-in CNN (width 64), {args.train_steps} steps on Coat vs Pullover: accuracy {accuracy:.3f}")

    rows = []
    if not args.compute_only:
        seconds, kept, units = with_worker(checkpoint, args.n_learning)
        rows.append(("1 worker (Redis, PostgreSQL), CPU", seconds, kept, units))
    pairs = candidate_pairs(2 * args.n_learning, data)
    devices = args.devices.split(",") if args.devices else ["cpu", "cuda"]
    for device in devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            print("no CUDA device: GPU column left out")
            continue
        seconds, kept = compute_only(checkpoint, pairs, device)
        name = "CPU" if device == "cpu" else f"GPU ({torch.cuda.get_device_name(0)})"
        rows.append((f"compute only, {name}", seconds, kept, len(pairs)))

    print(f"\nCVE on Fashion-MNIST 28 px (7 x 7 cells), one torch thread on CPU, torch {torch.__version__}")
    print(f"{'setting':<48} {'seconds':>8} {'stimuli':>8} {'units':>6} {'stimuli/min':>12} {'units/min':>10}")
    for name, seconds, kept, units in rows:
        rates = f"{60 * kept / seconds:>12.1f} {60 * units / seconds:>10.1f}"
        print(f"{name:<48} {seconds:>8.1f} {kept:>8} {units:>6} {rates}")
    checkpoint.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
