"""A study answered by simulated raters, to see (and test) the whole report without people.

``demo_study_create`` writes a complete, small between-subjects study: a data set of tiny drawn images, class
pairs, a condition per method x setup, learning explanations with automatic metrics, and simulated raters
(``Rater.is_simulated``) whose answers are drawn with known test accuracies (by default those of Table 5 of
Vandenhende et al. 2022). A few raters are made inattentive (failed catch trial, fast answers) and one stops
early, so the declared exclusion rules have something to exclude. Conditions are created directly rather than
through ``condition_add``: the method names label simulated teaching, they need no registered method.
"""

from __future__ import annotations

import io
import math
from datetime import timedelta

import numpy as np
from django.core.files.base import ContentFile
from django.db import transaction
from django.utils import timezone
from PIL import Image as PILImage

from explain.models import Classifier, ClassLabel, Dataset, Explanation, Image
from studies.models import Assignment, Block, ClassPair, Condition, Phase, Rater, Response, Study, Trial
from studies.preregistration import plan_resolve

# Table 5 of Vandenhende et al. (2022): test accuracy per method and setup.
TABLE5 = {
    ("scout", "random"): 0.774,
    ("scout", "consistent"): 0.628,
    ("cve", "random"): 0.767,
    ("cve", "consistent"): 0.643,
    ("ours", "random"): 0.805,
    ("ours", "consistent"): 0.821,
}
CLASS_NAMES = ["sneaker", "ankle boot", "shirt", "t-shirt", "pullover", "coat"]


def _png(seed: int, bright: float) -> ContentFile:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(bright, 40, size=(28, 28)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return ContentFile(buffer.getvalue(), name=f"demo-{seed}.png")


def _expit(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@transaction.atomic
def demo_study_create(
    *,
    title: str = "Simulated machine-teaching study",
    accuracy: dict[tuple[str, str], float] | None = None,
    raters_per_condition: int = 8,
    n_pairs: int = 3,
    pairs_per_rater: int = 2,
    n_test: int = 6,
    n_learning: int = 3,
    rater_sd: float = 0.6,
    seed: int = 0,
) -> Study:
    """Create a closed study answered by simulated raters; returns it. Deterministic given ``seed``."""
    accuracy = accuracy or TABLE5
    if pairs_per_rater > n_pairs:
        raise ValueError(f"pairs_per_rater={pairs_per_rater} is more than the study's n_pairs={n_pairs}")
    rng = np.random.default_rng(seed)
    tag = f"{seed}-{Study.objects.count()}"
    dataset = Dataset.objects.create(
        name=f"simulated-{tag}",
        kind=Dataset.Kind.IMAGE_FOLDER,
        root_path="(drawn by analysis.demo)",
        image_width=28,
        image_height=28,
    )
    labels = [ClassLabel.objects.create(dataset=dataset, index=i, name=n) for i, n in enumerate(CLASS_NAMES)]
    classifier = Classifier.objects.create(
        dataset=dataset,
        name=f"simulated-classifier-{tag}",
        architecture=Classifier.Architecture.SMALL_CNN,
        checkpoint_path="(none: simulated study)",
        split_point="features",
        input_size=28,
    )
    rules = {"failed_catch_trials": 1, "median_rt_below_ms": 300, "incomplete": True}
    launched_at = timezone.now()
    study = Study.objects.create(
        title=title,
        dataset=dataset,
        classifier=classifier,
        n_prelearning=n_test,
        n_learning=n_learning,
        n_test=n_test,
        pairs_per_assignment=pairs_per_rater,
        seed=seed,
        launched_at=launched_at,
        description="Simulated raters (analysis.demo); not a study of people.",
        exclusion_rules=rules,
        preregistration=plan_resolve({}, exclusion_rules=rules, frozen_at=launched_at.isoformat()),
        preregistered_at=launched_at,
    )
    pairs = [
        ClassPair.objects.create(
            study=study,
            class_a=labels[2 * i % 6],
            class_b=labels[(2 * i + 1) % 6],
            mined_by=ClassPair.Mining.MANUAL,
        )
        for i in range(n_pairs)
    ]
    images = {}
    for pair in pairs:
        for side, label in (("A", pair.class_a), ("B", pair.class_b)):
            for i in range(n_test // 2 + 1):
                number = len(images)
                images[(pair.pk, side, i)] = Image.objects.create(
                    dataset=dataset,
                    class_label=label,
                    source_id=f"sim-{tag}-{number}",
                    split=Image.Split.TEST,
                    file=_png(number, 70 if side == "A" else 180),
                )
    conditions = {
        cell: Condition.objects.create(study=study, method=cell[0], setup=cell[1])
        for cell in sorted(accuracy)
    }
    methods = sorted({m for m, _ in accuracy})
    learning = {}
    for pair in pairs:
        for cell, condition in conditions.items():
            quality = methods.index(cell[0]) / max(len(methods) - 1, 1)
            items = []
            for i in range(n_learning):
                number = int(rng.integers(1_000_000))
                items.append(
                    Explanation.objects.create(
                        study=study,
                        pair=pair,
                        condition=condition,
                        key=f"sim-{tag}-{pair.pk}-{condition.pk}-{i}",
                        query_image=images[(pair.pk, "A", 0)],
                        flipped=bool(rng.random() < 0.7 + 0.25 * quality),
                        masks=ContentFile(b"simulated", name="masks.npz"),
                        query_stimulus=_png(number, 70),
                        distractor_stimulus=_png(number + 1, 180),
                        metrics={
                            "near_kp": float(rng.uniform(0.3, 0.6) + 0.2 * quality),
                            "same_kp": float(
                                rng.uniform(0.1, 0.4)
                                + 0.4 * quality
                                + (0.1 if cell[1] == "consistent" else 0)
                            ),
                            "n_edits": int(rng.integers(1, 4)),
                            "cout": float(rng.normal(0.2 + quality, 0.1)),
                        },
                        config={"method": cell[0], "setup": cell[1], "simulated": True, "seed": seed},
                    )
                )
            learning[(pair.pk, condition.pk)] = items

    image_difficulty = {key: rng.normal(0, 0.3) for key in images}
    start = timezone.now() - timedelta(days=1)
    responses = []
    for c_index, (cell, condition) in enumerate(sorted(conditions.items())):
        for r in range(raters_per_condition):
            inattentive = r == raters_per_condition - 1 and c_index % 2 == 0
            quits = r == raters_per_condition - 2 and c_index == 0
            rater = Rater.objects.create(is_simulated=True)
            assignment = Assignment.objects.create(
                rater=rater,
                study=study,
                study_version=study.version,
                provider="direct",
                seed=int(rng.integers(2**31)),
                status=Assignment.Status.STARTED if quits else Assignment.Status.COMPLETED,
                completed_at=None if quits else start + timedelta(minutes=len(responses)),
            )
            ability = rng.normal(0, rater_sd)
            chosen = rng.choice(len(pairs), size=pairs_per_rater, replace=False)
            for position, p_index in enumerate(chosen):
                pair = pairs[p_index]
                block = Block.objects.create(
                    assignment=assignment,
                    position=position,
                    pair=pair,
                    condition=condition,
                    a_on_left=bool(rng.random() < 0.5),
                )
                tests = [(side, i) for side in "AB" for i in range(n_test // 2)]
                order = rng.permutation(len(tests))
                trials = []
                for phase in (Phase.PRE_LEARNING, Phase.TEST):
                    for pos, t in enumerate(order):
                        side, i = tests[t]
                        trials.append(
                            Trial(
                                block=block,
                                phase=phase,
                                position=pos,
                                correct_answer=side,
                                image=images[(pair.pk, side, i)],
                            )
                        )
                    catch_side = "AB"[int(rng.integers(2))]
                    trials.append(
                        Trial(
                            block=block,
                            phase=phase,
                            position=len(tests),
                            correct_answer=catch_side,
                            image=images[(pair.pk, catch_side, n_test // 2)],
                            is_catch=True,
                        )
                    )
                for pos, explanation in enumerate(learning[(pair.pk, condition.pk)]):
                    trials.append(
                        Trial(block=block, phase=Phase.LEARNING, position=pos, explanation=explanation)
                    )
                Trial.objects.bulk_create(trials)
                stops_here = quits and position == len(chosen) - 1  # answers pre-learning, then leaves
                for trial in trials:
                    if stops_here and trial.phase != Phase.PRE_LEARNING:
                        continue
                    rt = int(rng.lognormal(math.log(180 if inattentive else 1400), 0.3))
                    if trial.phase == Phase.LEARNING:
                        answer, rt = "seen", int(rng.lognormal(math.log(4000), 0.3))
                    elif trial.is_catch:
                        answer = (
                            ("B" if trial.correct_answer == "A" else "A")
                            if inattentive
                            else trial.correct_answer
                        )
                    elif inattentive:
                        answer = "AB"[int(rng.integers(2))]
                    elif trial.phase == Phase.PRE_LEARNING:
                        answer = "D" if rng.random() < 0.7 else "AB"[int(rng.integers(2))]
                    else:
                        key = (pair.pk, trial.correct_answer, tests[order[trial.position]][1])
                        p = _expit(
                            math.log(accuracy[cell] / (1 - accuracy[cell])) + ability - image_difficulty[key]
                        )
                        wrong = "B" if trial.correct_answer == "A" else "A"
                        answer = trial.correct_answer if rng.random() < p else wrong
                    responses.append(
                        Response(
                            trial=trial,
                            phase=trial.phase,
                            answer=answer,
                            client_rt_ms=rt,
                            server_rt_ms=rt + int(rng.integers(5, 60)),
                        )
                    )
    Response.objects.bulk_create(responses)
    # Closed once its design is complete: a closed study's pairs and conditions can no longer be added.
    study.status = Study.Status.CLOSED
    study.save(update_fields=["status"])
    return study
