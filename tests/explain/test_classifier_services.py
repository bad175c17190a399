"""Training, registering and evaluating classifiers through the services; images for a class pair; mined pairs
added to a study; the auxiliary model as a Backbone. Real PostgreSQL, real files, a tiny budget."""

from pathlib import Path

import pytest
import torch
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management import call_command

from explain.models import Backbone, Classifier, Prediction
from explain.nets.classifiers import build_classifier
from explain.selectors import auxiliary_model, classifier_model, image_array, mined_pairs
from explain.services import (
    auxiliary_register,
    auxiliary_train,
    classifier_evaluate,
    classifier_register,
    classifier_train,
    dataset_import,
)
from studies.models import ClassPair
from studies.services import study_pairs_add
from tests.explain.data_dirs import write_cub
from tests.factories import StudyFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def fashion():
    return dataset_import(kind="fashion-mnist", limit=12)  # 120 train and 120 test images


@pytest.fixture
def trained(fashion):
    return classifier_train(dataset=fashion, name="tiny", epochs=2, batch_size=32, lr=5e-3, width=4)


def _reference_accuracy(classifier, split):
    rows = Prediction.objects.filter(classifier=classifier, image__split=split)
    return rows.filter(correct=True).count() / rows.count()


def test_training_saves_a_checkpoint_and_stores_evaluation_and_predictions(fashion, trained):
    path = Path(trained.checkpoint_path)
    assert path.is_file() and Path(settings.FOIL_DATA_ROOT) in path.parents
    assert (trained.architecture, trained.split_point, trained.input_size, trained.in_channels) == (
        "small_cnn", "features", 28, 1,
    )  # fmt: skip
    assert trained.provenance["epoch_losses"][-1] < trained.provenance["epoch_losses"][0]
    assert Prediction.objects.filter(classifier=trained).count() == 240
    assert trained.test_accuracy == pytest.approx(_reference_accuracy(trained, "test"))
    assert trained.evaluation["train"]["accuracy"] == pytest.approx(_reference_accuracy(trained, "train"))
    matrix = trained.confusion_matrix
    assert len(matrix) == 10 and sum(map(sum, matrix)) == 120 and all(sum(row) == 12 for row in matrix)
    # The stored predictions are the network's own decisions on the stored images.
    model = classifier_model(trained)
    for prediction in Prediction.objects.filter(classifier=trained).select_related("image")[:5]:
        x = torch.from_numpy(image_array(prediction.image)).float().div(255)[None, None]
        x = (x - trained.normalisation["mean"][0]) / trained.normalisation["std"][0]
        assert int(model(x).argmax()) == prediction.predicted_index

    with pytest.raises(ValidationError, match="A classifier named 'tiny' already exists"):
        classifier_train(dataset=fashion, name="tiny", epochs=1)

    # The same weights as a Lightning checkpoint, registered and evaluated, make the same decisions.
    state = torch.load(trained.checkpoint_path, map_location="cpu", weights_only=True)
    lightning = Path(settings.FOIL_DATA_ROOT) / "l.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 2}, lightning)
    registered = classifier_register(
        dataset=fashion, name="from-lightning", architecture="small_cnn", checkpoint_path=lightning,
        prefix="model.", options={"width": 4}, normalisation=trained.normalisation,
    )  # fmt: skip
    registered = classifier_evaluate(classifier=registered)
    mine = dict(Prediction.objects.filter(classifier=registered).values_list("image_id", "predicted_index"))
    theirs = dict(Prediction.objects.filter(classifier=trained).values_list("image_id", "predicted_index"))
    assert mine == theirs
    assert registered.test_accuracy == pytest.approx(trained.test_accuracy)
    again = classifier_evaluate(classifier=registered)  # evaluating twice replaces, never duplicates
    assert Prediction.objects.filter(classifier=again).count() == 240


def test_register_refuses_a_checkpoint_with_the_wrong_class_count(tmp_path, fashion):
    torch.save(build_classifier("resnet18", 5, in_channels=1).state_dict(), tmp_path / "five.pt")
    with pytest.raises(ValidationError, match="checkpoint has 5 classes, the data set has 10"):
        classifier_register(
            dataset=fashion, name="r18", architecture="resnet18", checkpoint_path=tmp_path / "five.pt"
        )
    with pytest.raises(ValidationError, match="Unknown architecture 'lenet'"):
        classifier_register(
            dataset=fashion, name="x", architecture="lenet", checkpoint_path=tmp_path / "five.pt"
        )
    assert not Classifier.objects.exists()


def _random_small_cnn() -> Path:
    path = Path(settings.FOIL_DATA_ROOT) / "random-small-cnn.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_classifier("small_cnn", 10, in_channels=1, width=4).state_dict(), path)
    return path


def test_mined_pairs_from_the_confusion_matrix_are_added_to_a_study(fashion, capsys):
    trained = classifier_register(
        dataset=fashion, name="tiny", architecture="small_cnn", checkpoint_path=_random_small_cnn(),
        options={"width": 4},
    )  # fmt: skip
    trained.confusion_matrix = [[0] * 10 for _ in range(10)]
    for c in range(10):
        trained.confusion_matrix[c][c] = 10
    trained.confusion_matrix[4][6] = 7  # Coat -> Shirt
    trained.confusion_matrix[6][2] = 3  # Shirt -> Pullover
    trained.save(update_fields=["confusion_matrix"])
    pairs = mined_pairs(classifier=trained, method="most_confused")
    assert [(p["class_a"].name, p["class_b"].name) for p in pairs] == [
        ("Coat", "Shirt"),
        ("Shirt", "Pullover"),
    ]
    assert pairs[0]["score"] == pytest.approx(7 / 17)
    study = StudyFactory(dataset=fashion, classifier=trained)
    assert len(study_pairs_add(study=study, pairs=pairs)) == 2
    assert study_pairs_add(study=study, pairs=pairs) == []  # already there
    stored = ClassPair.objects.get(study=study, class_a__name="Coat")
    assert stored.mined_by == "most_confused" and stored.confusion_score == pytest.approx(7 / 17)
    call_command("mine_pairs", "--classifier", "tiny", "--method", "top_k", "--k", "1")
    assert "Coat" in capsys.readouterr().out


def test_nearest_pairs_by_cub_attributes(tmp_path):
    dataset = dataset_import(kind="cub-200-2011", path=write_cub(tmp_path / "cub"), name="CUB")
    torch.save(build_classifier("resnet18", 3).state_dict(), tmp_path / "r18.pt")
    classifier = classifier_register(
        dataset=dataset, name="r18", architecture="resnet18", checkpoint_path=tmp_path / "r18.pt"
    )
    pairs = mined_pairs(classifier=classifier, method="attributes")
    assert len(pairs) == 3 and all(p["class_a"] != p["class_b"] for p in pairs)
    with pytest.raises(ValidationError, match="no confusion matrix yet"):
        mined_pairs(classifier=classifier, method="top_k")


def test_auxiliary_model_trained_on_the_data_set(fashion):
    backbone = auxiliary_train(dataset=fashion, epochs=2, batch_size=40, width=4, dim=8)
    assert backbone.kind == Backbone.Kind.AUXILIARY and Path(backbone.path).is_file()
    assert len(backbone.provenance["epoch_losses"]) == 2
    cells = auxiliary_model(backbone).cells(torch.zeros(2, 1, 28, 28))
    assert cells.shape == (2, 8, 7, 7)
    with pytest.raises(ValidationError, match="already exists"):
        auxiliary_train(dataset=fashion, epochs=1, batch_size=40)


def test_resnet50_auxiliary_gets_the_part_clustering_check_on_cub(tmp_path):
    from torchvision import models as tv

    dataset = dataset_import(kind="cub-200-2011", path=write_cub(tmp_path / "cub"), name="CUB")
    torch.save(tv.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    backbone = auxiliary_register(dataset=dataset, name="r50", path=tmp_path / "r50.pth")
    check = backbone.provenance["part_clustering"]
    assert check["images"] == 3 and check["n_parts"] == 3 and 0 < check["accuracy"] <= 1
    torch.save({"nothing": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValidationError, match="no ResNet-50 keys"):
        auxiliary_register(dataset=dataset, name="bad", path=tmp_path / "bad.pth")


def test_register_classifier_command(tmp_path, fashion, capsys):
    from django.core.management.base import CommandError

    torch.save(build_classifier("small_cnn", 10, in_channels=1).state_dict(), tmp_path / "cnn.pt")
    call_command(
        "register_classifier", "--dataset", "Fashion-MNIST", "--name", "cmd", "--architecture", "small_cnn",
        "--checkpoint", str(tmp_path / "cnn.pt"),
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "Registered 'cmd' (small_cnn, split after features)" in out and "test: accuracy" in out
    assert Prediction.objects.filter(classifier__name="cmd").count() == 240
    with pytest.raises(CommandError, match="missing keys 'conv1.weight'"):
        call_command(
            "register_classifier", "--dataset", "Fashion-MNIST", "--name", "bad",
            "--architecture", "resnet18",
            "--checkpoint", str(tmp_path / "cnn.pt"),
        )  # fmt: skip
