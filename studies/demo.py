"""The demo study of `make demo`: the embedded Fashion-MNIST, a classifier the platform trains, class pairs
mined from its confusions, every runnable method x {random, semantically consistent}, precomputed by a worker.

Each step reuses what a previous run made, so a second `make demo` is ready in minutes. Budgets size the work:
"full" for the real demo, "tiny" for the test that runs the same path inside `make test`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from tqdm import tqdm

from explain.methods import declarations
from explain.models import Classifier, Dataset
from explain.precompute import plan_progress, training_summary
from explain.selectors import mined_pairs
from explain.services import classifier_train, dataset_import, shipped_bridge_register, shipped_models_prepare
from studies.models import Condition, Study
from studies.services import study_create, study_launch, study_pairs_add

Say = Callable[[str], None]


@dataclass(frozen=True)
class DemoBudget:
    """How much work the demo does; every number is a knob of the step it names."""

    name: str
    images_per_class: int | None  # imported per split and class (None: all 70,000)
    classifier_epochs: int
    classifier_images_per_class: int | None  # training images per class (None: all imported)
    n_pairs: int
    n_prelearning: int
    n_learning: int
    n_test: int
    min_learning_seconds: float
    semantic_pool: int
    backbone_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    shipped: bool = False  # use the classifier and backbones shipped in explain/shipped/ (no training)
    # Where the classifier is trained (not shipped): register the shipped inpainting bridge all the same (it
    # depends on no classifier). RCSB's released guidance acts only through the bridge's x0_hat, and a bridge
    # trained for seconds carries none: on one, the tiny demo's Sandal -> Sneaker never passed p 0.26.
    shipped_bridge: bool = False
    # Why the demo study may run on backbones that fail their quality card (printed in the report beside the
    # conditions that used one): the planner refuses them otherwise.
    quality_override: str = ""


BUDGETS = {
    "full": DemoBudget(
        name="full",
        images_per_class=2000,
        classifier_epochs=3,
        classifier_images_per_class=None,
        n_pairs=3,
        n_prelearning=10,
        n_learning=10,
        n_test=10,
        min_learning_seconds=1.0,
        semantic_pool=2,
        shipped=True,
        backbone_params={
            "auxiliary": {"epochs": 3, "limit": 500},
            "autoencoder": {
                "steps": 200,
                "batch_size": 32,
                "limit_per_class": 300,
                "block_out_channels": [16, 32],
            },
            "denoiser": {
                "steps": 200,
                "batch_size": 32,
                "limit_per_class": 300,
                "block_out_channels": [16, 32],
            },
            "bridge": {
                "steps": 200,
                "batch_size": 32,
                "limit_per_class": 300,
                "block_out_channels": [16, 32],
            },
            "sae": {"steps": 300, "batch_size": 128, "limit_per_class": 300},
            "c3lt_maps": {"steps": 150, "batch_size": 16, "limit_per_class": 300},
        },
    ),
    "tiny": DemoBudget(
        name="tiny",
        images_per_class=100,
        classifier_epochs=4,
        classifier_images_per_class=None,
        n_pairs=1,
        n_prelearning=2,
        n_learning=2,
        n_test=2,
        min_learning_seconds=0.0,
        semantic_pool=2,
        quality_override="the tiny budget tests the path: backbones trained for seconds fail their cards",
        shipped_bridge=True,
        backbone_params={
            "auxiliary": {"epochs": 1, "width": 8, "dim": 16},
            "autoencoder": {
                "steps": 60,
                "batch_size": 8,
                "limit_per_class": 12,
                "block_out_channels": [8, 16],
            },
            "denoiser": {"steps": 5, "batch_size": 8, "limit_per_class": 12, "block_out_channels": [16, 32]},
            "sae": {"steps": 20, "batch_size": 16, "limit_per_class": 12},
            "c3lt_maps": {"steps": 40, "batch_size": 8, "limit_per_class": 12, "width": 16},
        },
    ),
}

DATASET_NAME = "Fashion-MNIST"


@contextmanager
def step(say: Say, what: str) -> Iterator[None]:
    """Say what starts and how long it took."""
    say(f"-> {what}")
    start = time.monotonic()
    yield
    load = os.getloadavg()[0]
    say(f"   {what}: done in {time.monotonic() - start:.1f} s (load average {load:.1f})")


def tqdm_progress(desc: str, unit: str = "it") -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A ``progress(done, total)`` callback drawing a terminal bar, and a function that closes it."""
    bar = tqdm(desc=desc, unit=unit, leave=True)

    def progress(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    return progress, bar.close


def demo_methods(budget: DemoBudget) -> tuple[list[str], list[str]]:
    """The names the demo runs here, one per registered method: the method's variant declared for this budget
    (fewer steps than the papers: CPU minutes, not GPU hours) or else the method at its paper defaults. Left
    out, by name: the methods whose required settings (a local Stable Diffusion directory) are not set."""
    runnable, skipped = [], []
    for declared in declarations():
        if not all(getattr(settings, s, None) for s in declared.settings.values()):
            skipped.append(declared.name)
            continue
        budgeted = [v.name for v in declared.variants if v.demo_budget == budget.name]
        runnable.append(budgeted[0] if budgeted else declared.name)
    return runnable, skipped


def demo_dataset(*, budget: DemoBudget) -> Dataset:
    """The embedded Fashion-MNIST, imported once (a second run adds nothing)."""
    progress, close = tqdm_progress("importing Fashion-MNIST", "image")
    try:
        return dataset_import(
            kind=Dataset.Kind.FASHION_MNIST,
            name=DATASET_NAME,
            limit=budget.images_per_class,
            progress=progress,
        )
    finally:
        close()


def demo_classifier(*, dataset: Dataset, budget: DemoBudget) -> Classifier:
    """The built-in CNN trained on the data set, reused when a previous run trained it."""
    name = f"{dataset.name} built-in CNN ({budget.name} demo)"
    found = Classifier.objects.filter(name=name, dataset=dataset).first()
    if found is not None and found.confusion_matrix:
        return found
    progress, close = tqdm_progress("training the classifier", "batch")
    try:
        return classifier_train(
            dataset=dataset,
            name=name,
            epochs=budget.classifier_epochs,
            limit=budget.classifier_images_per_class,
            progress=progress,
        )
    finally:
        close()


def demo_shipped_models(*, dataset: Dataset, say: Say) -> Classifier:
    """The shipped classifier and backbones, registered for the data set after their checksums are verified;
    with FOIL_DEMO_TRAIN=1, the same models retrained from scratch (their manifest's commands and seeds)."""
    return shipped_models_prepare(dataset=dataset, retrain=settings.FOIL_DEMO_TRAIN, say=say)


def demo_models(*, dataset: Dataset, budget: DemoBudget, say: Say) -> Classifier:
    """The classifier (and the models registered beside it) the budget runs on: the shipped ones, or the
    built-in CNN trained here and, where the budget says so, the shipped bridge (checksums verified)."""
    if budget.shipped:
        with step(say, "shipped models (checksums verified; FOIL_DEMO_TRAIN=1 retrains them)"):
            return demo_shipped_models(dataset=dataset, say=say)
    with step(say, "classifier (the built-in CNN)"):
        classifier = demo_classifier(dataset=dataset, budget=budget)
    if budget.shipped_bridge:
        with step(say, "shipped inpainting bridge (checksums verified)"):
            shipped_bridge_register(dataset=dataset, say=say)
    return classifier


def demo_pairs(*, classifier: Classifier, n: int) -> list[dict[str, Any]]:
    """The ``n`` most confused class pairs (the most-confused class of each class, as Vandenhende et al.),
    one direction per unordered pair, most confused first."""
    seen: set[frozenset[int]] = set()
    chosen = []
    for pair in sorted(mined_pairs(classifier=classifier, method="most_confused"), key=lambda p: -p["score"]):
        both = frozenset((pair["class_a"].pk, pair["class_b"].pk))
        if both not in seen:
            seen.add(both)
            chosen.append(pair)
    if len(chosen) < n:
        raise ValidationError(
            f"the classifier's confusions give {len(chosen)} class pairs; the demo needs {n}"
        )
    return chosen[:n]


def demo_study(*, classifier: Classifier, budget: DemoBudget, methods: list[str]) -> Study:
    """The demo study (a draft the first time; the existing one on later runs)."""
    title = f"Fashion-MNIST demo ({budget.name})"
    found = Study.objects.filter(title=title, classifier=classifier).first()
    if found is not None:
        return found
    study = study_create(
        title=title,
        description=(
            "Which counterfactual explanation teaches people to tell confusable garments apart? Built by "
            "`make demo` on the embedded Fashion-MNIST."
        ),
        dataset=classifier.dataset,
        classifier=classifier,
        methods=methods,
        setups=(Condition.Setup.RANDOM, Condition.Setup.CONSISTENT),
        n_prelearning=budget.n_prelearning,
        n_learning=budget.n_learning,
        n_test=budget.n_test,
        min_learning_seconds=budget.min_learning_seconds,
        completion_code="FOIL-DEMO",
        exclusion_rules={"incomplete": True},
        seed=2022,
    )
    study_pairs_add(study=study, pairs=demo_pairs(classifier=classifier, n=budget.n_pairs))
    return study


def demo_precompute(*, study: Study, budget: DemoBudget, timeout: float, say: Say) -> Study:
    """Plan the study's precompute, let the worker(s) do it, and follow it until it is ready."""
    from explain.precompute import study_precompute

    study.refresh_from_db()
    if study.status in {Study.Status.READY, Study.Status.LIVE, Study.Status.CLOSED}:
        return study
    study_precompute(
        study=study,
        backbone_params=budget.backbone_params or None,
        semantic_pool=budget.semantic_pool,
        quality_override=budget.quality_override or None,
    )
    deadline = time.monotonic() + timeout
    with tqdm(desc="precomputing (worker)", unit="unit") as bar:
        while True:
            progress = plan_progress(study=study)
            bar.total = progress["total"]
            bar.set_postfix_str(training_summary(progress), refresh=False)  # steps and time left of models
            bar.update(progress["finished"] - bar.n)
            if progress["state"] != "running":
                break
            if time.monotonic() > deadline:
                raise ValidationError(
                    f"the precompute of {study.title!r} did not finish within {timeout:.0f} s "
                    f"({progress['finished']} of {progress['total']} units); the worker goes on: run "
                    "`make demo` again to follow it"
                )
            time.sleep(1.0)
    study.refresh_from_db()
    if study.status != Study.Status.READY:
        failures = "; ".join(f"{u.key}: {u.error.splitlines()[0]}" for u in progress["failures"][:3])
        short = ", ".join(
            f"{r['method']}/{r['setup']} has {r['stimuli']} of {r['need']}, {r['replaced']} replaced"
            for r in progress["conditions"]
            if r["stimuli"] < r["need"]
        )
        raise ValidationError(
            f"the precompute of {study.title!r} stopped ({progress['state']}). "
            + (f"Short of stimuli: {short}. " if short else "")
            + (f"Failures: {failures}. " if failures else "")
            + f"See /research/studies/{study.pk}/precompute/ to retry, then run `make demo` again."
        )
    for row in progress["conditions"]:
        say(
            f"   {row['method']:>9} / {row['setup']:<8} {row['stimuli']:>3} stimuli, "
            f"{row['replaced']} image pairs replaced"
        )
    return study


def demo_prepare(*, budget: DemoBudget, say: Say, precompute_timeout: float = 3600) -> Study:
    """Every step of the demo up to a live study, each reused when a previous run did it."""
    methods, skipped = demo_methods(budget)
    if skipped:
        say(f"   (left out: {', '.join(skipped)} — FOIL_STABLE_DIFFUSION_PATH enables it)")
    with step(say, "embedded data set (Fashion-MNIST)"):
        dataset = demo_dataset(budget=budget)
    classifier = demo_models(dataset=dataset, budget=budget, say=say)
    say(f"   classifier test accuracy {classifier.test_accuracy:.3f}")
    with step(say, "study: mined class pairs x every method x {random, consistent}"):
        study = demo_study(classifier=classifier, budget=budget, methods=methods)
        pairs = ", ".join(str(p) for p in study.pairs.select_related("class_a", "class_b"))
        say(f"   {study.conditions.count()} conditions on the pairs {pairs}")
    with step(say, "precompute through the Celery worker (models, then explanations)"):
        study = demo_precompute(study=study, budget=budget, timeout=precompute_timeout, say=say)
    if study.status != Study.Status.LIVE:
        study = study_launch(study=study)
    return study
