"""A tiny embedded-default slice for the precompute tests: Fashion-MNIST rows and a briefly trained CNN."""

import dataclasses
import io
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from django.conf import settings
from django.core.files.base import ContentFile
from django.db import connection
from PIL import Image as PILImage

from explain.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from explain.methods import Registered, registry
from explain.models import Classifier, ClassLabel, Dataset, Image
from explain.nets.small_cnn import SmallCNN

ROOT = Path(__file__).resolve().parents[2]
CLASS_A, CLASS_B = 4, 2  # Coat vs Pullover: confusable, so a few cell edits flip the decision
WIDTH = (
    16  # a narrow CNN trains in seconds on the 2-core machine; the loader reads the width from the state_dict
)


_TRAINED: dict[tuple, Path] = {}


def trained_checkpoint(directory: Path) -> Path:
    """The test CNN, trained once per test process (each training takes about 15 s here)."""
    key = (CLASS_A, CLASS_B, WIDTH)
    if key not in _TRAINED or not _TRAINED[key].is_file():
        path = directory / "small_cnn.pt"
        accuracy = train_small_cnn(path)
        assert accuracy > 0.75, f"the test classifier trained to only {accuracy:.2f}"
        _TRAINED[key] = path
    return _TRAINED[key]


def train_small_cnn(path: Path, *, classes: tuple[int, ...] = (CLASS_A, CLASS_B), steps: int = 120) -> float:
    """Train the built-in CNN for a few seconds on two classes; save its state_dict; return train accuracy."""
    images, labels = load_fashion_mnist()["train"]
    keep = np.flatnonzero(np.isin(labels, classes))[:3000]
    x = torch.from_numpy(images[keep].astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels[keep])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is ten times faster than two
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, in_channels=1, width=WIDTH)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x[:1000]).argmax(1) == y[:1000]).float().mean())
    torch.set_num_threads(threads)
    torch.save(model.state_dict(), path)
    return accuracy


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def fashion_slice(
    *, name: str, per_class: int, checkpoint: Path
) -> tuple[Dataset, Classifier, ClassLabel, ClassLabel]:
    """A Fashion-MNIST data set with ``per_class`` training images of the two classes, and the CNN on it."""
    dataset = Dataset.objects.create(
        name=name, kind=Dataset.Kind.FASHION_MNIST, root_path="/usr/share/datasets/fashion-mnist",
        image_width=28, image_height=28,
    )  # fmt: skip
    labels = [
        ClassLabel.objects.create(dataset=dataset, index=i, name=n)
        for i, n in enumerate(FASHION_MNIST_CLASSES)
    ]
    images, targets = load_fashion_mnist()["train"]
    for cls in (CLASS_A, CLASS_B):
        for i in np.flatnonzero(targets == cls)[3000 : 3000 + per_class]:  # not among the training images
            image = Image(dataset=dataset, class_label=labels[cls], source_id=f"train-{i}", split="train")
            image.file.save(f"{uuid.uuid4().hex}.png", ContentFile(png(images[i])), save=False)
            image.save()
    classifier = Classifier.objects.create(
        dataset=dataset, name=f"{name} cnn", architecture="small_cnn", checkpoint_path=str(checkpoint),
        split_point="features", input_size=28, in_channels=1, options={"width": WIDTH},
    )  # fmt: skip
    return dataset, classifier, labels[CLASS_A], labels[CLASS_B]


class Worker:
    """A real ``celery worker`` process on the test database and Redis, on a queue of its own."""

    def __init__(self, queue: str, log_path: Path, extra_env: dict[str, str] | None = None):
        db = connection.settings_dict
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "DATABASE_URL": f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
            # the test database's name differs from the one these settings were made with
            "FOIL_BROKER_NAMESPACE": settings.FOIL_BROKER_NAMESPACE,
            "FOIL_TEST_MEDIA_ROOT": str(settings.MEDIA_ROOT),
            "FOIL_DEVICE": "cpu",
            "OMP_NUM_THREADS": "1",
            **(extra_env or {}),
        }
        self.queue, self.log_path = queue, log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = self.log_path.open("a")
        start_mark = self.log_path.stat().st_size
        command = [sys.executable, "-m", "celery", "-A", "config.celery_app", "worker", "-Q", self.queue]
        command += ["--pool=solo", "-n", f"{uuid.uuid4().hex[:8]}@%h", "--loglevel=info"]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while "ready." not in self.log_path.read_text()[start_mark:]:
            assert self.process.poll() is None, f"the worker exited early:\n{self.log_path.read_text()}"
            assert time.monotonic() < deadline, (
                f"the worker did not start in 60 s:\n{self.log_path.read_text()}"
            )
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, no acknowledgement, nothing handed back to the broker."""
        self.process.kill()
        self.process.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
            self.log.close()


def redeclare(monkeypatch, method: str, **changes) -> None:
    """Run one test with ``method`` declared with ``changes`` (e.g. a test variant); the registry is restored
    after the test."""
    names = registry()
    entry = names[method]
    declared = dataclasses.replace(entry.declaration, **changes)
    monkeypatch.setitem(names, method, Registered(method, declared, None, entry.defaults))
    for variant in declared.variants:
        monkeypatch.setitem(names, variant.name, Registered(variant.name, declared, variant, entry.defaults))
