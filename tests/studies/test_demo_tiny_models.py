"""The tiny demo's models (`make test` runs the tiny demo): the classifier trained here and, beside it, the
shipped inpainting bridge, registered after its checksums; RCSB's conditions run on that bridge and the
precompute trains none."""

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import pytest

from explain.methods import registered
from explain.models import Backbone, WorkUnit
from explain.precompute import study_precompute
from explain.precompute.units import method_backbones
from explain.services import dataset_import, shipped_bridge_register
from explain.shipped.manifest import SHIPPED_ROOT, ShippedModelError, read_manifest
from studies.demo import BUDGETS, demo_methods, demo_models
from studies.services import class_pair_add, study_create

pytestmark = pytest.mark.django_db


def test_the_tiny_demo_runs_rcsb_on_the_shipped_bridge_beside_its_trained_classifier():
    tiny = BUDGETS["tiny"]
    assert tiny.shipped_bridge and not tiny.shipped and "bridge" not in tiny.backbone_params
    assert "rcsb-cpu-tiny" in demo_methods(tiny)[0]
    budget = dataclasses.replace(tiny, images_per_class=30)
    dataset = dataset_import(kind="fashion-mnist", name="Fashion-MNIST", limit=30)
    said = []
    classifier = demo_models(dataset=dataset, budget=budget, say=said.append)
    assert classifier.provenance.get("source") != "shipped"  # trained here
    bridge = Backbone.objects.get(dataset=dataset, kind="bridge")
    assert Path(bridge.path).resolve() == (SHIPPED_ROOT / "bridge").resolve()
    card = read_manifest()["models"]["bridge"]["card"]
    assert bridge.provenance["quality"] == card and card["passed"]
    assert any(line.strip().startswith(bridge.name) for line in said), said
    assert Backbone.objects.filter(dataset=dataset).count() == 1  # the bridge alone
    demo_models(dataset=dataset, budget=budget, say=said.append)
    assert Backbone.objects.filter(dataset=dataset).count() == 1  # once

    # two classes of which the barely trained classifier gets training images right (the planner's candidates)
    right = Counter(
        p.image.class_label
        for p in classifier.predictions.filter(correct=True, image__split="train").select_related(
            "image__class_label"
        )
    )
    (a, _), (b, _) = right.most_common(2)
    study = study_create(
        title="tiny", dataset=dataset, classifier=classifier, methods=["rcsb-cpu-tiny"], n_learning=1
    )
    pair = class_pair_add(study=study, class_a=a, class_b=b)
    plan = study_precompute(study=study, backbone_params=budget.backbone_params, semantic_pool=1)
    assert not WorkUnit.objects.filter(plan__isnull=True).exists()  # no bridge to train
    assert not plan.units.filter(status=WorkUnit.Status.PENDING).exists()
    assert method_backbones(study, pair, "rcsb-cpu-tiny") == {"bridge": bridge}
    assert registered("rcsb-cpu-tiny").declaration.name == "rcsb"


def test_a_shipped_bridge_that_differs_from_the_manifest_is_refused(tmp_path):
    root = tmp_path / "shipped"
    root.mkdir()
    for entry in SHIPPED_ROOT.iterdir():  # the bridge copied, the rest linked
        if entry.name == "bridge":
            shutil.copytree(entry, root / entry.name)
        else:
            (root / entry.name).symlink_to(entry)
    weights = next((root / "bridge").rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    dataset = dataset_import(kind="fashion-mnist", name="Fashion-MNIST", limit=5)
    with pytest.raises(ShippedModelError, match=r"bridge/.*safetensors has sha256"):
        shipped_bridge_register(dataset=dataset, root=root)
    assert not Backbone.objects.filter(dataset=dataset).exists()
