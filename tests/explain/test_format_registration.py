"""The papers' checkpoint formats registered through ``backbone_register`` (one entry each in
``explain.nets.formats.FORMATS``), on the byo test data set (3 classes, RGB, 16 px), and the worker loading
what was registered."""

from __future__ import annotations

import json

import pytest
import torch
from django.core.exceptions import ValidationError
from torch import nn

from explain.nets.formats import FORMATS
from explain.precompute import worker
from explain.services import backbone_register
from tests.explain.byo_models import CLASSES, colour_dataset
from tests.explain.test_format_compvis_ldm import ldm_config, write_ldm
from tests.explain.test_format_i2sb import write_run

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("FOIL_CONVERTED_MODELS", str(tmp_path / "converted"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    worker.cache_clear()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def birds(tmp_path):
    (tmp_path / "data").mkdir()
    return colour_dataset("birds", tmp_path / "data")


def register(birds, **kwargs):
    dataset, classifier = birds
    return backbone_register(dataset=dataset, classifier=classifier, **kwargs)


def test_each_checkpoint_format_has_its_entry():
    assert FORMATS["compvis-ldm"].kind == "denoiser"
    assert FORMATS["compvis-ldm-autoencoder"].kind == "autoencoder"
    assert FORMATS["i2sb"].kind == "bridge" and FORMATS["i2sb"].check
    assert FORMATS["c3lt-generator"].kind == "autoencoder"


def test_a_compvis_ldm_registers_as_autoencoder_and_denoiser(birds, tmp_path):
    (tmp_path / "ldm").mkdir()
    ckpt, _, _ = write_ldm(tmp_path / "ldm", config=ldm_config(classes=len(CLASSES) + 1))
    vae = register(birds, kind="autoencoder", path=ckpt, format_name="compvis-ldm-autoencoder", name="ldm vq")
    assert vae.config["architecture"] == "LatentDiffusionVQ" and vae.config["image_range"] == [-1.0, 1.0]
    assert vae.config["latent_shape"] == [3, 8, 8]
    denoiser = register(
        birds,
        kind="denoiser",
        path=ckpt,
        format_name="compvis-ldm",
        name="ldm",
        options={"autoencoder": "ldm vq"},
    )
    assert denoiser.config["conditioning"] == "context" and denoiser.config["num_classes"] == len(CLASSES)
    assert denoiser.config["scheduler"]["beta_schedule"] == "scaled_linear"
    loaded = worker.load_backbone(denoiser)
    assert loaded.class_embeddings.shape == (len(CLASSES) + 1, 16)


def test_a_compvis_ldm_of_another_class_count_is_refused(birds, tmp_path):
    (tmp_path / "ldm").mkdir()
    ckpt, _, _ = write_ldm(tmp_path / "ldm", config=ldm_config(classes=11))
    register(birds, kind="autoencoder", path=ckpt, format_name="compvis-ldm-autoencoder", name="ldm vq")
    with pytest.raises(ValidationError, match="10 classes .*and the classifier has 3"):
        register(
            birds,
            kind="denoiser",
            path=ckpt,
            format_name="compvis-ldm",
            name="ldm",
            options={"autoencoder": "ldm vq"},
        )


def test_a_compvis_ldm_without_its_config_is_refused(birds, tmp_path):
    (tmp_path / "ldm").mkdir()
    ckpt, config, _ = write_ldm(tmp_path / "ldm")
    config.unlink()
    with pytest.raises(ValidationError, match="no YAML config"):
        register(birds, kind="autoencoder", path=ckpt, format_name="compvis-ldm-autoencoder", name="ldm vq")


def test_an_i2sb_run_registers_as_a_bridge(birds, tmp_path):
    (tmp_path / "run").mkdir()
    write_run(tmp_path / "run")
    bridge = register(birds, kind="bridge", path=tmp_path / "run", format_name="i2sb", name="i2sb")
    assert bridge.config["conditioning"] == "x1" and bridge.config["image_range"] == [-1.0, 1.0]
    assert bridge.config["noise_levels"] == [1e-4, 1.0] and bridge.config["num_timesteps"] == 100
    assert worker.load_backbone(bridge).schedule.beta_max == 0.3


def test_an_i2sb_run_with_a_truncated_checkpoint_is_refused(birds, tmp_path):
    (tmp_path / "run").mkdir()
    write_run(tmp_path / "run")
    data = (tmp_path / "run" / "latest.pt").read_bytes()
    (tmp_path / "run" / "latest.pt").write_bytes(data[:5000])
    with pytest.raises(ValidationError, match="truncated"):
        register(birds, kind="bridge", path=tmp_path / "run", format_name="i2sb", name="i2sb")


def rgb_pair(directory, latent: int = 6):
    """A 16 px RGB generator and encoder saved as TorchScript, and their generator.json."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, latent, 8))
    generator = nn.Sequential(
        nn.ConvTranspose2d(latent, 8, 8), nn.ReLU(), nn.ConvTranspose2d(8, 3, 4, 2, 1), nn.Tanh()
    )
    directory.mkdir()
    torch.jit.save(torch.jit.trace(encoder.eval(), torch.randn(1, 3, 16, 16)), directory / "E.pt")
    torch.jit.save(torch.jit.trace(generator.eval(), torch.randn(1, latent, 1, 1)), directory / "G.pt")
    manifest = {"format": "torchscript", "generator": "G.pt", "encoder": "E.pt",
                "latent_shape": [latent, 1, 1], "image_channels": 3, "image_size": 16,
                "image_range": [-1, 1]}  # fmt: skip
    (directory / "generator.json").write_text(json.dumps(manifest))


def test_a_c3lt_generator_registers_as_the_autoencoder_c3lt_maps_through(birds, tmp_path):
    rgb_pair(tmp_path / "gan")
    pair = register(
        birds, kind="autoencoder", path=tmp_path / "gan", format_name="c3lt-generator", name="gan"
    )
    assert pair.config["architecture"] == "GeneratorPair" and pair.config["latent_shape"] == [6, 1, 1]
    assert pair.config["image_range"] == [-1.0, 1.0]
    assert worker.load_backbone(pair).config.latent_channels == 6


def test_a_c3lt_generator_of_grey_images_is_refused_for_rgb_data(birds, tmp_path):
    rgb_pair(tmp_path / "gan")
    manifest = json.loads((tmp_path / "gan" / "generator.json").read_text())
    (tmp_path / "gan" / "generator.json").write_text(json.dumps(manifest | {"image_channels": 1}))
    with pytest.raises(ValidationError, match="does not take 1-channel"):
        register(birds, kind="autoencoder", path=tmp_path / "gan", format_name="c3lt-generator", name="gan")
