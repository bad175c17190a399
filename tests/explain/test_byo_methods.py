"""The generative methods on registered models of the real architectures (small and random, saved by the
test): LDCE-txt on a whole Stable Diffusion directory, LDCE-cls on a cross-attention class-conditional
denoiser, SLC on a Stable Diffusion-shaped autoencoder (3 channels, [-1, 1]). Shapes, determinism, and the
methods' invariants."""

import pytest
import torch
from django.test import override_settings

from explain.nets.autoencoder import encode
from explain.precompute import worker
from explain.services import backbone_register
from tests.explain.byo_models import (  # noqa: F401 (one_torch_thread: an autouse fixture)
    CLASSES,
    SIZE,
    colour_dataset,
    one_torch_thread,
    save_context_denoiser,
    save_stable_diffusion,
    sd_vae,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def birds(tmp_path):
    return colour_dataset("birds", tmp_path)


# Settings that size the computation for a CPU test (the methods' defaults run hundreds of steps).
LDCE_TINY = {"num_inference_steps": 10, "start_step": 3}


def queries(n: int = 2) -> torch.Tensor:
    from tests.explain.byo_models import smooth_images

    return smooth_images(n, torch.Generator().manual_seed(11))


def explain(method, model, x, targets, seed=0):
    return method.explain_batch(model, x, targets, generator=torch.Generator().manual_seed(seed))


def sd_vae_row(birds, tmp_path):
    dataset, classifier = birds
    sd_vae().save_pretrained(tmp_path / "sd" / "vae")
    return backbone_register(
        dataset=dataset, classifier=classifier, kind="autoencoder", path=tmp_path / "sd",
        format_name="diffusers-autoencoder", name="sd vae",
    )  # fmt: skip


@override_settings(FOIL_STABLE_DIFFUSION_PATH="")
def test_ldce_txt_generates_counterfactuals_on_a_registered_stable_diffusion_pipeline(birds, tmp_path):
    dataset, classifier = birds
    row = backbone_register(
        dataset=dataset, classifier=classifier, kind="text_denoiser",
        path=save_stable_diffusion(tmp_path / "pipe"), format_name="diffusers-stable-diffusion", name="sd",
        options={"image_size": "32"},
    )  # fmt: skip
    config = {**LDCE_TINY, "image_size": 32}
    method = worker.build_method("ldce-txt", config, classifier=classifier)
    assert method._unet is worker.load_backbone(row).unet  # the worker's one copy, not a second load
    assert method.class_names == CLASSES
    model = worker.generative_classifier(classifier, device=torch.device("cpu"))
    x = queries()
    first = explain(method, model, x, [1, 2])
    for cf, query in zip(first, x, strict=True):
        assert cf.image.shape == (3, SIZE, SIZE)
        assert cf.timings["nfe_unet"] == LDCE_TINY["start_step"]
        assert abs(cf.image - query.numpy()).mean() > 0  # it changed the image
        assert cf.config["stable_diffusion"] == str(row.path) and cf.config["image_size"] == 32
    again = explain(worker.build_method("ldce-txt", config, classifier=classifier), model, x, [1, 2])
    for a, b in zip(first, again, strict=True):
        assert (a.image == b.image).all()  # deterministic given the generator
    # The batch equals the items explained one after another with the same generator.
    generator = torch.Generator().manual_seed(0)
    single = [
        method.explain_batch(model, x[i : i + 1], [t], generator=generator)[0] for i, t in enumerate([1, 2])
    ]
    for a, b in zip(single, first, strict=True):
        assert torch.allclose(torch.from_numpy(a.image), torch.from_numpy(b.image), atol=1e-5)


def test_ldce_txt_loads_the_settings_directory_once_per_process(birds, tmp_path):
    dataset, classifier = birds
    path = save_stable_diffusion(tmp_path / "pipe")
    with override_settings(FOIL_STABLE_DIFFUSION_PATH=str(path)):
        a = worker.build_method("ldce-txt", {**LDCE_TINY, "image_size": 32}, classifier=classifier)
        b = worker.build_method("ldce-txt", {**LDCE_TINY, "image_size": 32}, classifier=classifier)
    assert a._unet is b._unet and a._vae is b._vae
    assert a.config()["stable_diffusion"] == str(path)


def test_ldce_cls_runs_on_a_cross_attention_class_conditional_denoiser(birds, tmp_path):
    dataset, classifier = birds
    vae = sd_vae_row(birds, tmp_path)
    denoiser = backbone_register(
        dataset=dataset, classifier=classifier, kind="denoiser",
        path=save_context_denoiser(tmp_path / "ldm", len(CLASSES)), format_name="diffusers-unet-conditional",
        name="ldm",
    )  # fmt: skip
    method = worker.build_method(
        "ldce-cls", LDCE_TINY, classifier=classifier, backbones={"denoiser": denoiser, "autoencoder": vae}
    )
    model = worker.generative_classifier(classifier, device=torch.device("cpu"))
    x = queries(3)
    first = explain(method, model, x, [1, 2, 0])
    assert [cf.image.shape for cf in first] == [(3, SIZE, SIZE)] * 3
    assert all(cf.timings["nfe_unet"] == LDCE_TINY["start_step"] for cf in first)
    assert all(0 <= cf.timings["consensus_kept"] <= 1 for cf in first)
    again = explain(method, model, x, [1, 2, 0])
    assert all((a.image == b.image).all() for a, b in zip(first, again, strict=True))
    # The class reaches the network: another target gives another counterfactual from the same noise.
    other = explain(method, model, x[:1], [2])[0]
    assert not (other.image == first[0].image).all()


def test_slc_on_a_stable_diffusion_shaped_autoencoder_edits_only_inside_its_mask(
    birds, tmp_path, monkeypatch
):
    dataset, classifier = birds
    vae = sd_vae_row(birds, tmp_path)
    method = worker.build_method("slc-cpu-tiny", {}, classifier=classifier, backbones={"autoencoder": vae})
    model = worker.generative_classifier(classifier, device=torch.device("cpu"))
    import explain.methods.slc as slc

    decoded = []
    real_decode = slc.decode
    monkeypatch.setattr(slc, "decode", lambda v, z, c: decoded.append(z.detach()) or real_decode(v, z, c))
    x = queries(1)
    cf = explain(method, model, x, [2])[0]
    assert cf.image.shape == (3, SIZE, SIZE)
    with torch.no_grad():
        z = encode(method._vae, x)  # the SD VAE sees the [0, 1] image as [-1, 1]
    edit = (decoded[-1] - z).abs().sum(1)  # the last stage-2 latent minus the query's
    touched = float((edit > 1e-7).float().mean())
    assert 0 < touched <= cf.timings["latent_mask_area"] + 1e-6  # Eq. (5): the edit lives in the mask
    monkeypatch.setattr(slc, "decode", real_decode)
    again = explain(method, model, x, [2])[0]
    assert (again.image == cf.image).all()
