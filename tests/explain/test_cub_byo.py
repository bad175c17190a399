"""A CUB study on a researcher's own models, end to end at 224 px, small: a CUB-layout folder written here,
a VGG-16 registered through ``register_classifier`` (random convolutions; its last layer set to the
nearest-class-mean classifier of its features, so that it classifies the written birds), a tiny random
Stable Diffusion and its VAE registered through ``register_backbone``, pairs mined by attributes, LDCE-txt
precomputed by a real Celery worker on the registered pipeline, and the stimuli in the gallery. Random
generative models flip some pairs only, so the study is not expected to become ready."""

import io
import uuid

import pytest
import torch
from django.contrib.auth import get_user_model
from django.core.files.storage import default_storage
from django.core.management import call_command
from django.urls import reverse
from PIL import Image as PILImage

from explain.models import Backbone, Classifier, Explanation, WorkUnit
from explain.services import classifier_evaluate, dataset_import
from studies.services import study_create
from tests.explain.byo_models import save_stable_diffusion, sd_vae
from tests.explain.data_dirs import write_cub
from tests.explain.precompute_helpers import Worker

pytestmark = pytest.mark.slow

METHOD = "ldce-txt-cpu-tiny"


def fit_head_to_class_means(classifier: Classifier) -> None:
    """Set the VGG-16's last linear layer to the nearest-class-mean rule on its (random) penultimate features
    of the training images, read through the platform's own input pipeline, and save it in place."""
    from explain.nets.classifiers import to_input
    from explain.selectors import classifier_model
    from explain.services.datasets import _load_split

    net = classifier_model(classifier).eval()
    images, arrays = _load_split(classifier.dataset, "train")
    x = to_input(arrays, in_channels=3, normalisation=classifier.normalisation, input_size=224)
    with torch.no_grad():
        features = net.classifier[:-1](torch.flatten(net.avgpool(net.features(x)), 1))
    labels = torch.tensor([image.class_label.index for image in images])
    means = torch.stack([features[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
    last = net.classifier[-1]
    last.weight.data.copy_(means)
    last.bias.data.copy_(-0.5 * (means**2).sum(1))
    torch.save(net.state_dict(), classifier.checkpoint_path)


def test_a_cub_study_runs_on_registered_models_at_224_px(transactional_db, client, tmp_path):
    torch.set_num_threads(1)
    root = write_cub(tmp_path / "CUB_200_2011", images_per_class=4)
    dataset = dataset_import(kind="cub-200-2011", path=root, name="CUB small")

    torch.manual_seed(0)
    import torchvision

    checkpoint = tmp_path / "vgg16_cub.pt"
    torch.save(torchvision.models.vgg16(num_classes=3).state_dict(), checkpoint)
    call_command(
        "register_classifier", "--dataset", "CUB small", "--name", "vgg", "--architecture", "vgg16",
        "--checkpoint", str(checkpoint), "--no-evaluate", stdout=io.StringIO(),
    )  # fmt: skip
    classifier = Classifier.objects.get(name="vgg")
    assert classifier.input_size == 224
    fit_head_to_class_means(classifier)
    classifier = classifier_evaluate(classifier=classifier)
    assert classifier.evaluation["train"]["accuracy"] == 1.0, classifier.evaluation

    pipeline = save_stable_diffusion(tmp_path / "sd")
    sd_vae().save_pretrained(tmp_path / "sd-vae")
    for kind, fmt, path, options in (
        ("text_denoiser", "diffusers-stable-diffusion", pipeline, ["--option", "image_size=64"]),
        ("autoencoder", "diffusers-autoencoder", tmp_path / "sd-vae", ["--option", "image_range=-1,1"]),
    ):
        call_command(
            "register_backbone", "--dataset", "CUB small", "--classifier", "vgg", "--kind", kind,
            "--format", fmt, "--path", str(path), "--name", f"cub {kind}", *options, stdout=io.StringIO(),
        )  # fmt: skip
    vae = Backbone.objects.get(name="cub autoencoder")
    assert vae.config["size"] == 224 and vae.config["latent_shape"] == [4, 56, 56]

    study = study_create(
        title="CUB byo", dataset=dataset, classifier=classifier, methods=[METHOD], setups=("random",),
        n_learning=1, seed=2,
    )  # fmt: skip
    call_command(
        "mine_pairs", "--classifier", "vgg", "--method", "attributes", "--study", str(study.pk),
        stdout=io.StringIO(),
    )  # fmt: skip
    assert study.pairs.exists()

    queue = f"test-cub-{uuid.uuid4().hex[:8]}"
    worker = Worker(queue, tmp_path / "worker.log", extra_env={"FOIL_STABLE_DIFFUSION_PATH": ""})
    worker.start()
    try:
        out = io.StringIO()
        call_command("precompute", str(study.pk), "--queue", queue, "--wait", "--timeout", "420", stdout=out)
    finally:
        worker.stop()
    assert "State: finished" in out.getvalue(), out.getvalue() + worker.log_path.read_text()[-3000:]
    # Random models flip some pairs and not others; every unit either stored a flipped counterfactual or
    # says it did not flip, and none failed.
    units = WorkUnit.objects.filter(plan__study=study)
    assert not units.filter(status=WorkUnit.Status.FAILED).exists(), list(units.values("key", "error"))
    for unit in units.filter(status=WorkUnit.Status.UNEXPLAINABLE):
        assert "did not flip the decision to class B" in unit.outcome["reason"], unit.outcome
    explanations = list(Explanation.objects.filter(study=study))
    assert explanations, "\n".join(str(u.outcome) for u in units)
    for explanation in explanations:
        assert explanation.flipped and explanation.config["method"] == METHOD
        assert explanation.config["stable_diffusion"] == Backbone.objects.get(name="cub text_denoiser").path
        with default_storage.open(explanation.query_stimulus.name, "rb") as fh:
            assert PILImage.open(io.BytesIO(fh.read())).size == (224, 224)

    staff = get_user_model().objects.create_user(username="r", password="a-long-test-password", is_staff=True)
    client.force_login(staff)
    page = client.get(reverse("explain:gallery", args=[study.pk])).content.decode()
    for explanation in explanations:
        assert f'id="explanation-{explanation.pk}"' in page
        image = client.get(reverse("explain:explanation_file", args=[explanation.pk, "counterfactual"]))
        assert image.status_code == 200 and image["Content-Type"] == "image/png"
