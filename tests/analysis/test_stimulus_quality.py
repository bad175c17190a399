"""Stimulus quality per condition beside human accuracy: figures vs plain computations, cards, override."""

import hashlib

import numpy as np
import pandas as pd
import pytest

from analysis.stimulus_quality import stimulus_quality, stimulus_quality_table
from explain.models import Backbone, PrecomputePlan
from tests.factories import ClassPairFactory, ConditionFactory, ExplanationFactory

pytestmark = pytest.mark.django_db

WEAK = {
    "kind": "bridge", "figures": {"inpaint_l1_ratio": 1.3, "inpainted_accuracy": 0.9}, "passed": False,
    "failures": ["inpaint_l1_ratio = 1.3, needs <= 0.9"], "images": 40,
    "thresholds": [{"figure": "inpaint_l1_ratio", "op": "<=", "value": 0.9, "reason": "r"}],
}  # fmt: skip


def test_quality_per_condition_with_cards_and_the_override_beside_the_weak_one():
    pair = ClassPairFactory()
    study = pair.study
    bridge = Backbone.objects.create(
        dataset=study.dataset, kind="bridge", name="weak bridge", path="/x", provenance={"quality": WEAK}
    )
    good = {**WEAK, "kind": "autoencoder", "passed": True, "failures": []}
    autoencoder = Backbone.objects.create(
        dataset=study.dataset, kind="autoencoder", name="good ae", path="/y", provenance={"quality": good}
    )
    rcsb = ConditionFactory(study=study, method="rcsb")
    c3lt = ConditionFactory(study=study, method="c3lt")
    rng = np.random.default_rng(0)
    metrics = []
    for i in range(5):
        m = {"flipped": i != 0, "cout": float(rng.random()), "l1": float(rng.random()), "nfe": 100,
             "region_area": float(rng.random())}  # fmt: skip
        metrics.append(m)
        ExplanationFactory(
            pair=pair, condition=rcsb, metrics=m, flipped=m["flipped"],
            config={"method": "rcsb", "backbones": {"bridge": bridge.pk}},
        )  # fmt: skip
    ExplanationFactory(
        pair=pair, condition=c3lt, metrics={"flipped": True, "l1": 0.1, "region_area": 0.3, "nfe": 1},
        config={"method": "c3lt", "backbones": {"autoencoder": autoencoder.pk}},
    )  # fmt: skip
    PrecomputePlan.objects.create(study=study, quality_override={"reason": "interface pilot"})

    table = stimulus_quality(study=study).set_index("method")
    row = table.loc["rcsb"]
    assert row["stimuli"] == 5 and row["flip_rate"] == pytest.approx(0.8)
    assert row["cout"] == pytest.approx(np.mean([m["cout"] for m in metrics]))
    areas = [m["region_area"] for m in metrics]
    assert row["region_area_q50"] == pytest.approx(np.median(areas))
    assert row["region_area_q25"] == pytest.approx(np.percentile(areas, 25))
    assert row["backbone_cards"] == "weak bridge: FAILED (inpaint_l1_ratio 1.3 (<= 0.9))"
    assert row["weak_backbones"] == "weak bridge" and row["quality_override"] == "interface pilot"
    assert table.loc["c3lt", "weak_backbones"] == "" and table.loc["c3lt", "quality_override"] == ""
    assert table.loc["c3lt", "backbone_cards"].startswith("good ae: passed")

    accuracy = pd.DataFrame([{"method": "rcsb", "setup": "random", "accuracy": 0.61}])
    merged = stimulus_quality_table(stimulus_quality(study=study), accuracy).set_index("method")
    assert merged.loc["rcsb", "human_accuracy"] == 0.61 and np.isnan(merged.loc["c3lt", "human_accuracy"])


def test_the_models_appendix_lists_the_backbones_the_explanations_used_by_id(tmp_path):
    """The worker stores backbones by id: the appendix finds them, and the autoencoder a C3LT map was trained
    with, with how each came to the platform, and leaves out a backbone no explanation used."""
    from analysis.selectors import model_provenance

    pair = ClassPairFactory()
    study = pair.study
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"weights")
    autoencoder = Backbone.objects.create(
        dataset=study.dataset, kind="autoencoder", name="ae", path=str(weights),
        provenance={"source": "shipped"},
    )  # fmt: skip
    maps = Backbone.objects.create(
        dataset=study.dataset, kind="c3lt_maps", name="maps", path="/absent",
        config={"autoencoder": autoencoder.pk}, provenance={"source": "trained"},
    )  # fmt: skip
    Backbone.objects.create(dataset=study.dataset, kind="bridge", name="unused bridge", path="/z")
    ExplanationFactory(
        pair=pair, condition=ConditionFactory(study=study, method="c3lt"),
        config={"method": "c3lt", "backbones": {"c3lt_maps": maps.pk}},
    )  # fmt: skip
    table = model_provenance(study=study).set_index("name")
    assert list(table["role"]) == ["classifier", "backbone", "backbone"]
    assert table.loc["ae", "source"] == "shipped" and table.loc["maps", "source"] == "trained"
    assert table.loc["ae", "sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert "unused bridge" not in table.index


@pytest.mark.django_db
def test_the_provenance_appendix_gives_one_row_per_setting_not_per_stimulus():
    from analysis.selectors import condition_provenance
    from explain.models import Explanation
    from tests.studies.builders import data_guards_off, live_study

    study = live_study(n_pairs=1, n_learning=3)
    condition = study.conditions.order_by("pk").first()
    made = list(Explanation.objects.filter(study=study, condition=condition).order_by("pk"))
    with data_guards_off():  # the worker's unit and batch differ per stimulus; the third has another lambda
        for n, e in enumerate(made):
            e.config = {"method": "cve", "lambda": 0.4 if n < 2 else 0.8, "work_unit": f"u{n}",
                        "batch": [f"u{n}", "u9"], "seed": n}  # fmt: skip
            e.save(update_fields=["config"])
    rows = condition_provenance(study=study)
    rows = rows[(rows["method"] == condition.method) & (rows["setup"] == condition.setup)]
    assert sorted(rows["explanations"]) == [1, 2]
    assert not rows["settings"].str.contains("work_unit|batch|u9").any()
    assert rows["settings"].str.contains("lambda=0.8").sum() == 1
