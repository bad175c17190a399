"""Registering a researcher's models from local files (``backbone_register``, ``manage.py register_backbone``,
the admin), each format on a small random model of the real architecture saved by the test, each refusal
with its message, and the planner and worker using what was registered."""

import os
from io import StringIO
from pathlib import Path

import pytest
import torch
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.urls import reverse

from explain.models import Backbone, Dataset, Job
from explain.nets.formats import FORMATS, FormatError, backbone_load
from explain.precompute import study_precompute, worker
from explain.precompute.units import dataset_backbone
from explain.services import backbone_register, job_execute
from explain.services.registration import registrable_kinds
from studies.services import class_pair_add, study_create
from tests.explain.byo_models import (  # noqa: F401 (one_torch_thread: an autouse fixture)
    CLASSES,
    SIZE,
    colour_dataset,
    one_torch_thread,
    save_class_denoiser,
    save_context_denoiser,
    save_stable_diffusion,
    sd_vae,
    trained_vae,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def birds(tmp_path):
    return colour_dataset("birds", tmp_path)


def sd_dir(tmp_path: Path) -> Path:
    """A Stable Diffusion-like directory holding only its vae/ (config without image_range)."""
    sd_vae().save_pretrained(tmp_path / "sd" / "vae")
    return tmp_path / "sd"


def register(birds, **kwargs) -> Backbone:
    dataset, classifier = birds
    return backbone_register(dataset=dataset, classifier=classifier, **kwargs)


def register_sd_vae(birds, tmp_path) -> Backbone:
    return register(
        birds, kind="autoencoder", path=sd_dir(tmp_path), format_name="diffusers-autoencoder", name="sd vae"
    )


# ----------------------------------------------------------------------------------------------------
# What registration finds and records


def test_a_stable_diffusion_vae_registers_with_its_range_and_the_worker_loads_it_so(birds, tmp_path):
    backbone = register_sd_vae(birds, tmp_path)
    config = backbone.config
    assert config["registered"] is True and config["format"] == "diffusers-autoencoder"
    assert config["image_range"] == [-1.0, 1.0]  # Stable Diffusion's, taken from the directory's layout
    assert config["in_channels"] == 3 and config["size"] == SIZE
    assert config["latent_shape"] == [4, SIZE // 4, SIZE // 4] and config["downsampling"] == 4
    assert config["reconstruction_l1"] > 0 and "reconstruction_l1_other_range" in config
    provenance = backbone.provenance
    assert provenance["source"] == "registered" and provenance["found"]["image_range"] == [-1.0, 1.0]
    assert provenance["path"] == str((tmp_path / "sd").resolve())
    assert "vae/config.json" in provenance["files"] and provenance["bytes"] > 0
    assert provenance["checked_with"]["classifier_name"] == "birds cnn"
    assert len(provenance["checked_with"]["images"]) == len(CLASSES)

    vae = worker.load_backbone(backbone)
    assert vae.config.image_range == [-1.0, 1.0]
    assert next(vae.parameters()).dtype == torch.float32
    # The SD VAE sees the classifier's [0, 1] images as [-1, 1]: encode is the network on 2x - 1.
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    from explain.nets.autoencoder import encode

    with torch.no_grad():
        expected = vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        assert torch.allclose(encode(vae, x), expected)


def test_a_declared_range_that_the_model_contradicts_is_refused(birds, tmp_path):
    trained_vae((-1.0, 1.0)).save_pretrained(tmp_path / "vae")
    with pytest.raises(ValidationError) as refusal:
        register(
            birds, kind="autoencoder", path=tmp_path / "vae", format_name="diffusers-autoencoder",
            name="wrong range", options={"image_range": "0,1"},
        )  # fmt: skip
    message = " ".join(refusal.value.messages)
    assert "declared to take images in [0, 1]" in message
    assert "register it with --option image_range=-1,1" in message
    right = register(
        birds, kind="autoencoder", path=tmp_path / "vae", format_name="diffusers-autoencoder",
        name="right range", options={"image_range": "-1,1"},
    )  # fmt: skip
    assert right.config["image_range"] == [-1.0, 1.0]
    assert right.config["reconstruction_l1"] * 2 < right.config["reconstruction_l1_other_range"]


def test_an_autoencoder_without_a_stated_range_is_refused_naming_the_option(birds, tmp_path):
    sd_vae().save_pretrained(tmp_path / "bare")
    with pytest.raises(ValidationError, match=r"does not state the range.*--option image_range=-1,1"):
        register(birds, kind="autoencoder", path=tmp_path / "bare", format_name="diffusers-autoencoder",
                 name="bare")  # fmt: skip


def test_wrong_channels_are_refused(birds, tmp_path):
    sd_vae(in_channels=1).save_pretrained(tmp_path / "grey")
    with pytest.raises(ValidationError, match="takes 1-channel images, and the classifier reads 3-channel"):
        register(
            birds, kind="autoencoder", path=tmp_path / "grey", format_name="diffusers-autoencoder",
            name="grey", options={"image_range": "0,1"},
        )  # fmt: skip


def test_a_truncated_weights_file_is_refused_naming_the_file(birds, tmp_path):
    directory = sd_dir(tmp_path)
    weights = directory / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValidationError, match=r"diffusion_pytorch_model.safetensors is truncated.*copy the"):
        register(birds, kind="autoencoder", path=directory, format_name="diffusers-autoencoder", name="cut")


def test_missing_config_and_parts_are_refused(birds, tmp_path):
    directory = sd_dir(tmp_path)
    (directory / "vae" / "config.json").unlink()
    with pytest.raises(ValidationError, match="has no config.json"):
        register(birds, kind="autoencoder", path=directory, format_name="diffusers-autoencoder", name="a")
    sd = save_stable_diffusion(tmp_path / "pipe")
    for path in sorted((sd / "tokenizer").iterdir()):
        path.unlink()
    (sd / "tokenizer").rmdir()
    with pytest.raises(ValidationError, match=r"lacks tokenizer/ of a Stable Diffusion directory"):
        register(birds, kind="text_denoiser", path=sd, format_name="diffusers-stable-diffusion", name="b")
    with pytest.raises(ValidationError, match=r"does not exist.*nothing is downloaded"):
        register(birds, kind="autoencoder", path=tmp_path / "nowhere", format_name="diffusers-autoencoder",
                 name="c")  # fmt: skip


def test_a_format_of_another_kind_and_unknown_options_are_refused(birds, tmp_path):
    with pytest.raises(
        ValidationError, match="format 'diffusers-autoencoder' holds autoencoder models, not denoiser"
    ):
        register(birds, kind="denoiser", path=tmp_path, format_name="diffusers-autoencoder", name="a")
    with pytest.raises(ValidationError, match="takes no option colour"):
        register(birds, kind="autoencoder", path=sd_dir(tmp_path), format_name="diffusers-autoencoder",
                 name="b", options={"colour": "red"})  # fmt: skip
    with pytest.raises(ValidationError, match="No format registers 'discriminator' models"):
        register(birds, kind="discriminator", path=tmp_path, format_name="x", name="c")
    assert {"autoencoder", "denoiser", "text_denoiser", "bridge", "sae"} <= set(registrable_kinds())


def test_a_denoiser_of_another_class_count_or_without_a_null_class_is_refused(birds, tmp_path):
    register_sd_vae(birds, tmp_path)
    with pytest.raises(ValidationError, match=r"has 5 classes \(and a null class\) and the classifier has 3"):
        register(birds, kind="denoiser", path=save_class_denoiser(tmp_path / "d6", 6),
                 format_name="diffusers-unet", name="six")  # fmt: skip
    with pytest.raises(ValidationError, match=r"as many as the classifier has classes, so no null class"):
        register(birds, kind="denoiser", path=save_class_denoiser(tmp_path / "d3", 3),
                 format_name="diffusers-unet", name="three")  # fmt: skip
    with pytest.raises(ValidationError, match="register it with --format diffusers-unet-conditional"):
        register(birds, kind="denoiser", path=save_context_denoiser(tmp_path / "c", 3),
                 format_name="diffusers-unet", name="context")  # fmt: skip


def test_a_denoiser_needs_the_autoencoder_it_works_in(birds, tmp_path):
    with pytest.raises(ValidationError, match="works in the latent space of an autoencoder"):
        register(birds, kind="denoiser", path=save_class_denoiser(tmp_path / "d", 4),
                 format_name="diffusers-unet", name="d")  # fmt: skip


def test_class_conditional_denoisers_register_in_both_diffusers_layouts(birds, tmp_path):
    vae = register_sd_vae(birds, tmp_path)
    plain = register(birds, kind="denoiser", path=save_class_denoiser(tmp_path / "d", 4),
                     format_name="diffusers-unet", name="unet2d")  # fmt: skip
    context = register(
        birds, kind="denoiser", path=save_context_denoiser(tmp_path / "c", len(CLASSES)),
        format_name="diffusers-unet-conditional", name="context", options={"autoencoder": "sd vae"},
    )  # fmt: skip
    for row, architecture, conditioning in (
        (plain, "UNet2DModel", "class_embeds"),
        (context, "UNet2DConditionModel", "context"),
    ):
        assert row.config["autoencoder"] == vae.pk
        assert row.config["architecture"] == architecture and row.config["conditioning"] == conditioning
        assert row.config["num_classes"] == len(CLASSES) and row.config["latent_shape"] == [4, 4, 4]
        assert row.config["scheduler"]["num_train_timesteps"] == 1000
        assert row.config["options"] == {}  # the autoencoder is recorded by id, not as an option


def test_a_stable_diffusion_pipeline_registers(birds, tmp_path):
    row = register(
        birds, kind="text_denoiser", path=save_stable_diffusion(tmp_path / "pipe"),
        format_name="diffusers-stable-diffusion", name="tiny sd", options={"image_size": "32"},
    )  # fmt: skip
    assert row.config["image_size"] == 32 and row.config["latent_shape"] == [4, 8, 8]
    assert row.config["text_width"] == 16 and row.config["image_range"] == [-1.0, 1.0]
    sd = worker.load_backbone(row)
    assert type(sd.text_encoder).__name__ == "CLIPTextModel" and sd.tokenizer.model_max_length == 16


def test_a_pipeline_whose_text_encoder_does_not_fit_its_unet_is_refused(birds, tmp_path):
    path = save_stable_diffusion(tmp_path / "pipe", text_width=16, unet_width=24)
    with pytest.raises(ValidationError, match="text encoder gives 16-wide states and the unet attends to 24"):
        register(birds, kind="text_denoiser", path=path, format_name="diffusers-stable-diffusion",
                 name="mismatch", options={"image_size": "32"})  # fmt: skip


def test_a_broken_model_leaves_no_row(birds, tmp_path):
    with pytest.raises(ValidationError):
        register(birds, kind="autoencoder", path=tmp_path / "nowhere", format_name="diffusers-autoencoder",
                 name="x")  # fmt: skip
    assert not Backbone.objects.exists()


def test_every_format_names_a_loader_that_exists():
    from explain.nets.formats import _resolve

    for fmt in FORMATS.values():
        assert callable(_resolve(fmt.load)), fmt.name
    with pytest.raises(FormatError, match="there is no format 'nope'"):
        backbone_load("nope", "/tmp")


# ----------------------------------------------------------------------------------------------------
# The command and the admin


def test_the_command_registers_and_refuses_with_the_service_message(birds, tmp_path):
    dataset, classifier = birds
    out = StringIO()
    call_command(
        "register_backbone", "--dataset", "birds", "--kind", "autoencoder", "--path", str(sd_dir(tmp_path)),
        "--format", "diffusers-autoencoder", "--name", "cli vae", "--classifier", classifier.name,
        stdout=out,
    )  # fmt: skip
    assert "Registered 'cli vae' (autoencoder, diffusers-autoencoder) for 'birds'." in out.getvalue()
    assert "image_range [-1.0, 1.0]" in out.getvalue()
    with pytest.raises(CommandError, match="takes 1-channel images"):
        sd_vae(in_channels=1).save_pretrained(tmp_path / "grey")
        call_command(
            "register_backbone", "--dataset", "birds", "--kind", "autoencoder", "--path",
            str(tmp_path / "grey"), "--format", "diffusers-autoencoder", "--name", "grey",
            "--option", "image_range=0,1",
        )  # fmt: skip
    with pytest.raises(CommandError, match="is not KEY=VALUE"):
        call_command(
            "register_backbone", "--dataset", "birds", "--kind", "autoencoder", "--path", "/x",
            "--format", "diffusers-autoencoder", "--name", "n", "--option", "image_range",
        )  # fmt: skip


def test_the_admin_registers_on_a_worker_through_the_same_service(birds, tmp_path, researcher_client):
    dataset, classifier = birds
    page = researcher_client.get(reverse("admin:explain_backbone_register"))
    assert page.status_code == 200 and "diffusers-stable-diffusion" in page.text
    response = researcher_client.post(
        reverse("admin:explain_backbone_register"),
        {
            "dataset": dataset.pk, "kind": "autoencoder", "format_name": "diffusers-autoencoder",
            "path": str(sd_dir(tmp_path)), "name": "admin vae", "classifier": classifier.pk,
            "options": "image_range=-1,1\n",
        },
    )  # fmt: skip
    job = Job.objects.get(kind="backbone_register")
    assert response.status_code == 302 and response.url == reverse("admin:explain_job_change", args=[job.pk])
    assert job.params["options"] == {"image_range": "-1,1"}
    job = job_execute(job_id=job.pk)  # what the worker does with it
    assert job.status == Job.Status.DONE, job.error
    row = Backbone.objects.get(name="admin vae")
    assert row.config["options"] == {"image_range": "-1,1"} and row.config["image_range"] == [-1.0, 1.0]
    bad = researcher_client.post(
        reverse("admin:explain_backbone_register"),
        {"dataset": dataset.pk, "kind": "autoencoder", "format_name": "x", "path": "/x", "name": "admin vae",
         "options": "nonsense"},
    )  # fmt: skip
    assert bad.status_code == 200 and "already exists" in bad.text and "is not key=value" in bad.text


# ----------------------------------------------------------------------------------------------------
# The planner and the worker use what was registered


def test_a_registered_backbone_wins_over_a_newer_trained_one_and_nothing_is_trained(birds, tmp_path):
    dataset, classifier = birds
    registered = register_sd_vae(birds, tmp_path)
    trained = Backbone.objects.create(
        dataset=dataset, kind="autoencoder", name="trained later", path=str(tmp_path / "t"),
        config={"architecture": "AutoencoderKL"},
    )  # fmt: skip
    assert trained.created_at > registered.created_at
    study = study_create(
        title="byo", dataset=dataset, classifier=classifier, methods=["slc"], n_learning=1, seed=1
    )
    labels = list(dataset.classes.order_by("index"))
    class_pair_add(study=study, class_a=labels[0], class_b=labels[1])
    assert dataset_backbone(study, "autoencoder") == registered
    from explain.models import WorkUnit

    study_precompute(study=study, semantic_pool=1)
    planned = set(WorkUnit.objects.filter(plan__isnull=True).values_list("backbone_kind", flat=True))
    assert planned == {"sae"}  # the autoencoder is the registered one; only SLC's SAE is trained


@override_settings(FOIL_STABLE_DIFFUSION_PATH="")
def test_ldce_txt_plans_on_a_registered_pipeline_without_the_setting(birds, tmp_path):
    dataset, classifier = birds
    study = study_create(
        title="txt", dataset=dataset, classifier=classifier, methods=["ldce-txt"], n_learning=1, seed=1
    )
    labels = list(dataset.classes.order_by("index"))
    class_pair_add(study=study, class_a=labels[0], class_b=labels[1])
    with pytest.raises(ValidationError, match="or register a text_denoiser model for data set 'birds'"):
        study_precompute(study=study, semantic_pool=1)
    register(birds, kind="text_denoiser", path=save_stable_diffusion(tmp_path / "pipe"),
             format_name="diffusers-stable-diffusion", name="sd", options={"image_size": "32"})  # fmt: skip
    plan = study_precompute(study=study, semantic_pool=1)
    assert plan.units.exists()


def test_the_worker_holds_one_copy_of_a_model_and_reloads_a_changed_one(birds, tmp_path):
    row = register_sd_vae(birds, tmp_path)
    first = worker.load_backbone(row)
    assert worker.load_backbone(row) is first
    os.utime(row.path, (1, 1))  # the directory changed (e.g. the model was replaced)
    second = worker.load_backbone(row)
    assert second is not first
    assert [k for k in worker._CACHE if k[:2] == ("backbone", row.pk)] == [
        ("backbone", row.pk, row.path, 1.0, "cpu", "torch.float32")
    ]


def test_half_precision_only_on_a_gpu_where_the_method_allows_it():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert worker.backbone_dtype(True, cpu) == torch.float32
    assert worker.backbone_dtype(False, gpu) == torch.float32
    assert worker.backbone_dtype(True, gpu) == torch.float16
    from explain.methods import registered

    assert registered("ldce-txt").declaration.half_precision
    assert not registered("slc").declaration.half_precision


def test_a_format_loads_in_the_dtype_asked_for(tmp_path):
    sd_vae().save_pretrained(tmp_path / "vae")
    vae = backbone_load(
        "diffusers-autoencoder", tmp_path / "vae", {"image_range": "-1,1"}, dtype=torch.float16
    )
    assert next(vae.parameters()).dtype == torch.float16
    x = torch.rand(1, 3, SIZE, SIZE)
    from explain.nets.autoencoder import encode

    z = encode(vae, x)  # the pinned torch has float16 convolutions on the CPU
    assert z.dtype == torch.float32  # the methods see float32 whatever the model's dtype


def test_a_denoiser_the_platform_trains_works_in_the_registered_autoencoders_space(birds, tmp_path):
    from explain.services.backbones import denoiser_train

    dataset, classifier = birds
    vae = register_sd_vae(birds, tmp_path)  # its directory is a Stable Diffusion layout (vae/, [-1, 1])
    denoiser = denoiser_train(
        dataset=dataset, steps=2, batch_size=2, limit_per_class=2, block_out_channels=[16, 32]
    )
    assert denoiser.config["autoencoder"] == vae.pk
    assert Backbone.objects.filter(kind="autoencoder").count() == 1  # found, not trained
    loaded = worker.load_backbone(denoiser)
    assert loaded.unet.config.in_channels == 4 and loaded.unet.config.sample_size == SIZE // 4


@override_settings(FOIL_STABLE_DIFFUSION_PATH="")
def test_the_study_page_offers_ldce_txt_once_a_pipeline_is_registered(birds, tmp_path):
    from studies.selectors import method_unavailable_reason

    assert "or register a text_denoiser model" in method_unavailable_reason("ldce-txt")
    dataset, _ = birds
    Backbone.objects.create(
        dataset=dataset, kind="text_denoiser", name="sd", path=str(tmp_path), config={"registered": True}
    )
    assert method_unavailable_reason("ldce-txt") is None
    assert method_unavailable_reason("ldce-txt", dataset_id=dataset.pk) is None
    other = Dataset.objects.create(name="other birds", kind=dataset.kind, root_path="/nowhere")
    assert "or register a text_denoiser model" in method_unavailable_reason("ldce-txt", dataset_id=other.pk)


def save_bridge(directory: Path, channels: int) -> Path:
    import dataclasses
    import json

    from diffusers import UNet2DModel

    from explain.nets.bridge import SCHEDULE_NAME, BridgeSchedule, bridge_config

    torch.manual_seed(5)
    UNet2DModel(**bridge_config(channels, SIZE, (8, 16), norm_num_groups=8)).save_pretrained(
        directory / "unet"
    )
    (directory / SCHEDULE_NAME).write_text(json.dumps(dataclasses.asdict(BridgeSchedule(num_timesteps=100))))
    return directory


def test_a_bridge_registers_and_one_of_other_channels_is_refused(birds, tmp_path):
    row = register(
        birds, kind="bridge", path=save_bridge(tmp_path / "b", 3), format_name="foil-bridge", name="b"
    )
    assert (
        row.config["in_channels"] == 3 and row.config["size"] == SIZE and row.config["num_timesteps"] == 100
    )
    with pytest.raises(
        ValidationError, match=r"takes 2 channels in and gives 1; for 3-channel images it must"
    ):
        register(
            birds, kind="bridge", path=save_bridge(tmp_path / "g", 1), format_name="foil-bridge", name="g"
        )


def test_an_sae_registers_for_its_classifier_and_one_of_another_width_is_refused(birds, tmp_path):
    from explain.nets.sae import SparseAutoencoder

    dataset, classifier = birds
    SparseAutoencoder(d_in=16).save_pretrained(tmp_path / "sae16")  # the test CNN pools 2 x 8 features
    row = register(birds, kind="sae", path=tmp_path / "sae16", format_name="foil-sae", name="sae")
    assert row.config["classifier"] == classifier.pk and row.config["d_in"] == 16
    study = study_create(
        title="sae", dataset=dataset, classifier=classifier, methods=["slc"], n_learning=1, seed=1
    )
    assert dataset_backbone(study, "sae") == row
    SparseAutoencoder(d_in=32).save_pretrained(tmp_path / "sae32")
    with pytest.raises(
        ValidationError, match="reads 32 features and the classifier's pooled features have 16"
    ):
        register(birds, kind="sae", path=tmp_path / "sae32", format_name="foil-sae", name="sae32")
