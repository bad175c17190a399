"""The CompVis / latent-diffusion LDM format (what LDCE-cls uses): a tiny random LDM written in the original
checkpoint layout with its YAML, converted to diffusers, checked against plain reference implementations of
the original networks, run through LDCE-cls, and refused when broken."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml

from explain.methods.ldce import LDCE
from explain.nets.autoencoder import decode, encode
from explain.nets.formats import compvis_ldm
from explain.nets.formats.common import FormatError
from explain.nets.formats.compvis_ldm import convert_compvis_ldm, load_compvis_ldm

from .gen_fixtures import NUM_CLASSES, images, one_thread, tiny_classifier  # noqa: F401
from .openai_reference import ReferenceKL, ReferenceUNet, ReferenceVQ, randomize

DDCONFIG = {
    "double_z": False,
    "z_channels": 3,
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
}


def ldm_config(
    conditioning: str = "crossattn", first_stage: str = "vq", classes: int = NUM_CLASSES + 1
) -> dict:
    """The structure of latent-diffusion's models/ldm/cin256-v2/config.yaml, tiny."""
    unet = {
        "image_size": 8,
        "in_channels": 3,
        "out_channels": 3,
        "model_channels": 32,
        "attention_resolutions": [2, 1],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_heads": 2,
    }
    params = {
        "linear_start": 0.0015,
        "linear_end": 0.0195,
        "num_timesteps_cond": 1,
        "timesteps": 1000,
        "first_stage_key": "image",
        "cond_stage_key": "class_label",
        "image_size": 8,
        "channels": 3,
        "use_ema": False,
        "scale_factor": 0.8,
    }
    if conditioning == "crossattn":
        unet |= {"use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 16}
        params |= {
            "conditioning_key": "crossattn",
            "cond_stage_config": {
                "target": "ldm.modules.encoders.modules.ClassEmbedder",
                "params": {"n_classes": classes, "embed_dim": 16, "key": "class_label"},
            },
        }
    else:  # label_emb, with the legacy AttentionBlock and per-head channels
        del unet["num_heads"]
        unet |= {"num_classes": classes, "num_head_channels": 16, "use_scale_shift_norm": True}
        params |= {"conditioning_key": "adm", "cond_stage_config": "__is_unconditional__"}
    if first_stage == "vq":
        stage = {
            "target": "ldm.models.autoencoder.VQModelInterface",
            "params": {
                "embed_dim": 3,
                "n_embed": 64,
                "ddconfig": DDCONFIG,
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        }
    else:
        stage = {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": 3,
                "ddconfig": DDCONFIG | {"double_z": True},
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        }
    params |= {
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": stage,
    }
    return {
        "model": {
            "base_learning_rate": 1e-4,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": params,
        }
    }


def write_ldm(tmp_path, conditioning="crossattn", first_stage="vq", ema=False, seed=0, config=None):
    """A random LDM saved as latent diffusion saves one: {"state_dict": ...} with the original key names and
    the schedule's buffers, and its YAML. Returns (ckpt, yaml, references)."""
    cfg = config or ldm_config(conditioning, first_stage)
    params = cfg["model"]["params"]
    unet = randomize(ReferenceUNet(**params["unet_config"]["params"]), seed)
    stage_params = params["first_stage_config"]["params"]
    if first_stage == "vq":
        stage = ReferenceVQ(stage_params["ddconfig"], stage_params["n_embed"], stage_params["embed_dim"])
    else:
        stage = ReferenceKL(stage_params["ddconfig"], stage_params["embed_dim"])
    randomize(stage, seed + 1)
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in stage.state_dict().items()}
    references = {"unet": unet, "stage": stage}
    if conditioning == "crossattn":
        n = params["cond_stage_config"]["params"]["n_classes"]
        table = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed + 2))
        state["cond_stage_model.embedding.weight"] = table
        references["embedding"] = table
    betas = (
        torch.linspace(params["linear_start"] ** 0.5, params["linear_end"] ** 0.5, 1000, dtype=torch.float64)
        ** 2
    )
    state["betas"] = betas.float()
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    if ema:
        shadow = randomize(copy.deepcopy(unet), seed + 3)
        for k, v in shadow.state_dict().items():
            state["model_ema." + ("diffusion_model." + k).replace(".", "")] = v
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int)
        references["ema"] = shadow
        params["use_ema"] = True
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 10}, ckpt)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    return ckpt, config_path, references


@pytest.mark.parametrize("conditioning", ["crossattn", "label_emb"])
def test_converted_unet_equals_the_original_network(tmp_path, conditioning):
    ckpt, config, ref = write_ldm(tmp_path, conditioning)
    vae, denoiser = load_compvis_ldm(ckpt, config, cache_dir=tmp_path / "cache")
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 411, 999])
    labels = torch.tensor([0, 2, NUM_CLASSES])  # NUM_CLASSES is the null class
    with torch.no_grad():
        ours = denoiser.eps(z, t, labels)
        if conditioning == "crossattn":
            theirs = ref["unet"](z, t, context=ref["embedding"][labels][:, None])
        else:
            theirs = ref["unet"](z, t, y=labels)
    assert denoiser.null_class == NUM_CLASSES and denoiser.num_classes == NUM_CLASSES
    assert type(denoiser.unet).__name__ == (
        "UNet2DConditionModel" if conditioning == "crossattn" else "UNet2DModel"
    )
    assert theirs.abs().mean() > 0.1  # the comparison is not between two zero outputs
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("first_stage", ["vq", "kl"])
def test_converted_first_stage_equals_the_original_network(tmp_path, first_stage):
    ckpt, config, ref = write_ldm(tmp_path, first_stage=first_stage)
    vae, _ = load_compvis_ldm(ckpt, config, cache_dir=tmp_path / "cache")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z = encode(vae, x)  # images in [0, 1]; the first stage sees [-1, 1], latents scaled by 0.8
        torch.testing.assert_close(z, ref["stage"].encode(2 * x - 1) * 0.8, rtol=1e-4, atol=1e-4)
        back = decode(vae, z)
        torch.testing.assert_close(back, (ref["stage"].decode(z / 0.8) + 1) / 2, rtol=1e-4, atol=1e-4)
    assert vae.config.image_range == [-1.0, 1.0] and vae.config.scaling_factor == 0.8


def test_schedule_is_the_checkpoints(tmp_path):
    ckpt, config, _ = write_ldm(tmp_path)
    _, denoiser = load_compvis_ldm(ckpt, config, cache_dir=tmp_path / "cache")
    stored = torch.load(ckpt, weights_only=True)["state_dict"]["alphas_cumprod"]
    torch.testing.assert_close(denoiser.scheduler.alphas_cumprod.float(), stored)
    denoiser.scheduler.set_timesteps(500)
    assert (
        denoiser.scheduler.timesteps[-1] == 1 and denoiser.scheduler.timesteps[0] == 999
    )  # LDCE's DDIM grid


def test_ema_weights_are_used_when_present(tmp_path):
    ckpt, config, ref = write_ldm(tmp_path, ema=True)
    z, t, labels = torch.randn(1, 3, 8, 8), torch.tensor([500]), torch.tensor([1])
    context = ref["embedding"][labels][:, None]
    _, ema = load_compvis_ldm(ckpt, config, cache_dir=tmp_path / "cache")
    _, raw = load_compvis_ldm(ckpt, config, cache_dir=tmp_path / "cache", weights="model")
    with torch.no_grad():
        torch.testing.assert_close(
            ema.eps(z, t, labels), ref["ema"](z, t, context=context), rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(
            raw.eps(z, t, labels), ref["unet"](z, t, context=context), rtol=1e-4, atol=1e-4
        )


def test_converted_once_and_cached(tmp_path, monkeypatch):
    ckpt, config, _ = write_ldm(tmp_path)
    first = convert_compvis_ldm(ckpt, config, cache_dir=tmp_path / "cache")

    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(compvis_ldm, "read_checkpoint", fail)
    assert convert_compvis_ldm(ckpt, config, cache_dir=tmp_path / "cache").root == first.root
    assert (first.denoiser / "class_embeddings.safetensors").is_file()
    assert (first.autoencoder / "config.json").is_file()


def test_ldce_cls_runs_on_the_converted_model(tmp_path):
    ckpt, config, _ = write_ldm(tmp_path)
    vae, denoiser = load_compvis_ldm(ckpt, config, num_classes=NUM_CLASSES, cache_dir=tmp_path / "cache")
    method = LDCE(autoencoder=vae, denoiser=denoiser, num_inference_steps=10, start_step=3)
    model, x = tiny_classifier(), images(2, seed=3)
    first = method.explain(model, x[:1], 2, generator=torch.Generator().manual_seed(5))
    again = method.explain(model, x[:1], 2, generator=torch.Generator().manual_seed(5))
    other = method.explain(model, x[:1], 2, generator=torch.Generator().manual_seed(6))
    assert first.image.shape == (1, 16, 16) and np.isfinite(first.image).all()
    np.testing.assert_array_equal(first.image, again.image)
    assert not np.array_equal(first.image, other.image)  # the abduction noise matters


def test_refuses_a_truncated_checkpoint(tmp_path):
    ckpt, config, _ = write_ldm(tmp_path)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated"):
        convert_compvis_ldm(ckpt, config, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("compvis-ldm-*"))  # no half-written cache


def test_refuses_a_missing_config(tmp_path):
    ckpt, config, _ = write_ldm(tmp_path)
    config.unlink()
    with pytest.raises(FormatError, match="no YAML config.*config.yaml"):
        convert_compvis_ldm(ckpt, cache_dir=tmp_path / "cache")


def test_refuses_a_class_count_that_differs_from_the_classifiers(tmp_path):
    ckpt, config, _ = write_ldm(tmp_path)
    with pytest.raises(FormatError, match=f"{NUM_CLASSES} classes and the null class.*classifier has 10"):
        load_compvis_ldm(ckpt, config, num_classes=10, cache_dir=tmp_path / "cache")


def test_refuses_wrong_channels(tmp_path):
    cfg = ldm_config()
    cfg["model"]["params"]["first_stage_config"]["params"]["embed_dim"] = 4
    ckpt, config, _ = write_ldm(tmp_path, config=cfg)
    with pytest.raises(FormatError, match="3 to 3 channels but its first stage makes 4-channel latents"):
        convert_compvis_ldm(ckpt, config, cache_dir=tmp_path / "cache")


def test_refuses_a_config_of_another_model(tmp_path):
    ckpt, config, _ = write_ldm(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(FormatError, match="does not fit the architecture.*shape mismatch"):
        convert_compvis_ldm(ckpt, config, cache_dir=tmp_path / "cache")


def test_refuses_a_text_conditional_model(tmp_path):
    ckpt, config, _ = write_ldm(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["params"]["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.BERTEmbedder"}
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(FormatError, match="not class-conditional"):
        convert_compvis_ldm(ckpt, config, cache_dir=tmp_path / "cache")
