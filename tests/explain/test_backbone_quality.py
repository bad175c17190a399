"""A backbone trained by the platform carries its quality card, measured on the data set's held-out images."""

import uuid

import numpy as np
import pytest
import torch
from django.core.files.base import ContentFile

from explain.data.idx import load_fashion_mnist
from explain.models import Image
from explain.precompute import worker
from explain.services.backbones import autoencoder_train, backbone_quality
from tests.explain.precompute_helpers import fashion_slice, png, trained_checkpoint

pytestmark = pytest.mark.django_db


@pytest.fixture
def slice_with_test_images(tmp_path):
    worker.cache_clear()
    torch.set_num_threads(1)
    dataset, classifier, a, b = fashion_slice(
        name="cardslice", per_class=12, checkpoint=trained_checkpoint(tmp_path)
    )
    images, targets = load_fashion_mnist()["test"]
    for label in (a, b):
        for i in np.flatnonzero(targets == label.index)[:6]:
            image = Image(dataset=dataset, class_label=label, source_id=f"test-{i}", split="test")
            image.file.save(f"{uuid.uuid4().hex}.png", ContentFile(png(images[i])), save=False)
            image.save()
    return dataset, classifier


def test_a_trained_autoencoder_carries_its_card_judged_by_the_classifier(slice_with_test_images):
    dataset, classifier = slice_with_test_images
    backbone = autoencoder_train(
        dataset=dataset, steps=3, batch_size=4, limit_per_class=12, block_out_channels=[8, 16]
    )
    card = backbone.provenance["quality"]
    assert card["kind"] == "autoencoder" and card["images"] == 12
    assert card["classifier"] == classifier.pk and card["classifier_name"] == classifier.name
    assert {t["figure"] for t in card["thresholds"]} == {"psnr_db", "accuracy_drop"}
    assert not card["passed"] and card["failures"][0].startswith("psnr_db = ")  # 3 steps reconstruct nothing
    assert card["figures"]["accuracy_original"] > 0.5  # the slice's classifier on held-out Coats/Pullovers
    # Measured again (e.g. with another classifier), the card is replaced, with the same figures here.
    again = backbone_quality(backbone=backbone, classifier=classifier)
    assert again.provenance["quality"]["figures"] == pytest.approx(card["figures"])


def test_a_registered_backbone_is_judged_by_its_card_and_refused_unless_the_study_accepts_it(
    slice_with_test_images, tmp_path
):
    """Registration measures the kind's card with the functions a trained backbone's uses; the planner
    then refuses a study on a registered model that failed it, naming the model and the figure, unless the
    study accepts it with a reason."""
    from django.core.exceptions import ValidationError

    from explain.models import ClassLabel
    from explain.nets.autoencoder import autoencoder_config, train_autoencoder
    from explain.precompute import study_precompute
    from explain.services import backbone_register
    from studies.services import class_pair_add, study_create
    from tests.explain.precompute_helpers import CLASS_A, CLASS_B

    dataset, classifier = slice_with_test_images
    images, _ = load_fashion_mnist()["train"]
    x = torch.from_numpy(images[:16].astype(np.float32) / 255.0).unsqueeze(1)
    config = autoencoder_config(1, block_out_channels=(8, 16), sample_size=28, norm_num_groups=8)
    train_autoencoder(x, tmp_path / "weak", 3, batch_size=4, config=config)  # 3 steps: reconstructs nothing
    row = backbone_register(
        dataset=dataset, classifier=classifier, kind="autoencoder", path=tmp_path / "weak",
        format_name="diffusers-autoencoder", name="weak researcher autoencoder",
    )  # fmt: skip
    card = row.provenance["quality"]
    assert card["kind"] == "autoencoder" and card["images"] == 12 and card["classifier"] == classifier.pk
    assert not card["passed"] and card["failures"][0].startswith("psnr_db = ")
    assert row.config["registered"] is True  # the registered row itself, not a trained one

    study = study_create(
        title="registered", dataset=dataset, classifier=classifier, methods=["ldce-cls"], n_learning=1
    )
    labels = {label.index: label for label in ClassLabel.objects.filter(dataset=dataset)}
    class_pair_add(study=study, class_a=labels[CLASS_A], class_b=labels[CLASS_B])
    with pytest.raises(ValidationError, match=r"weak researcher autoencoder: psnr_db = .*needs >= 20"):
        study_precompute(study=study, semantic_pool=1)
    plan = study_precompute(study=study, semantic_pool=1, quality_override="pilot with the lab's autoencoder")
    assert plan.quality_override == {"reason": "pilot with the lab's autoencoder"}


def test_a_registered_backbone_without_held_out_images_is_left_unjudged_with_the_reason(tmp_path):
    """Where the data set has no test split the card cannot be measured: it says why, and gates nothing."""
    from explain.nets.autoencoder import autoencoder_config, train_autoencoder
    from explain.quality_gate import card_failures
    from explain.services import backbone_register
    from tests.explain.precompute_helpers import fashion_slice, trained_checkpoint

    dataset, classifier, _, _ = fashion_slice(
        name="notest", per_class=4, checkpoint=trained_checkpoint(tmp_path)
    )
    images, _ = load_fashion_mnist()["train"]
    x = torch.from_numpy(images[:8].astype(np.float32) / 255.0).unsqueeze(1)
    config = autoencoder_config(1, block_out_channels=(8, 16), sample_size=28, norm_num_groups=8)
    train_autoencoder(x, tmp_path / "ae", 2, batch_size=4, config=config)
    row = backbone_register(
        dataset=dataset, classifier=classifier, kind="autoencoder", path=tmp_path / "ae",
        format_name="diffusers-autoencoder", name="unjudged autoencoder",
    )  # fmt: skip
    assert row.provenance["quality"] == {
        "missing": "data set 'notest' has no test images to measure the model on"
    }
    assert card_failures(row) == []
