"""The shipped models of the embedded default: the manifest matches the files, its retraining commands exist
with those arguments, every card passed and is reproducible, and a denoiser trained on the wrong objective
fails its card."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from explain.nets.quality import THRESHOLDS, backbone_card, denoiser_card, judge
from explain.shipped import train
from explain.shipped.manifest import (
    CARD_TEST_PER_CLASS,
    CARD_TRAIN_PER_CLASS,
    SHIPPED_ROOT,
    ShippedModelError,
    manifest_verify,
    per_class,
    read_manifest,
    sha256,
)

from .gen_fixtures import one_thread

__all__ = ["one_thread"]
MANIFEST = read_manifest()
MODELS = MANIFEST["models"]
NEEDED = {"classifier", "auxiliary", "autoencoder", "denoiser", "bridge", "sae"}


def test_the_manifest_lists_every_shipped_file_with_its_sha256():
    listed = {name for entry in MODELS.values() for name in entry["files"]}
    on_disk = {
        str(p.relative_to(SHIPPED_ROOT))
        for p in SHIPPED_ROOT.rglob("*")
        if p.is_file() and p.parent != SHIPPED_ROOT
    }
    assert listed == on_disk
    for entry in MODELS.values():
        for name, expected in entry["files"].items():
            assert sha256(SHIPPED_ROOT / name) == expected["sha256"], name
    total = sum(f["bytes"] for entry in MODELS.values() for f in entry["files"].values())
    assert total <= 50 * 2**20, f"{total / 2**20:.1f} MB shipped; the limit is 50 MB"
    assert NEEDED <= set(MODELS) and any(e["kind"] == "c3lt_maps" for e in MODELS.values())


def test_verify_names_a_changed_file(tmp_path):
    copy = tmp_path / "fashion-mnist"
    shutil.copytree(SHIPPED_ROOT, copy)
    target = copy / "sae" / "config.json"
    target.write_text(target.read_text() + " ")
    with pytest.raises(ShippedModelError, match=r"sae/config.json has sha256 .* FOIL_DEMO_TRAIN=1"):
        manifest_verify(copy)
    manifest_verify(SHIPPED_ROOT)


@pytest.mark.parametrize("folder", sorted(MODELS))
def test_the_recorded_command_exists_with_those_arguments_and_seed(folder):
    entry = MODELS[folder]
    command = entry["command"]
    assert command[:3] == ["python", "-m", "explain.shipped.train"]
    parsed = vars(train.parser().parse_args(command[3:]))
    parsed["lr"] = parsed["lr"] if parsed["lr"] is not None else train.DEFAULT_LR[parsed["kind"]]
    parsed.pop("threads")
    recorded = entry["arguments"]
    assert {k: parsed[k] for k in recorded} == recorded
    later = set(parsed) - set(recorded)  # options added after the model was trained: at their defaults
    assert all(parsed[k] == train.parser().get_default(k) for k in later), later
    assert parsed["kind"] == entry["kind"] and parsed["seed"] == entry["seed"]
    assert train.folder_name(parsed["kind"], parsed["pair"]) == folder
    assert entry["steps"] > 0 and entry["final_loss"] == pytest.approx(entry["final_loss"])  # not NaN


@pytest.mark.parametrize("folder", sorted(f for f in MODELS if f != "classifier"))
def test_every_shipped_backbone_has_its_card_judged_by_todays_thresholds(folder):
    """A card's verdict is the thresholds in code applied to its figures (change one: rebuild it)."""
    card = MODELS[folder]["card"]
    assert card["images"] >= 100 and card["thresholds"]
    assert judge(card["kind"], card["figures"], card["images"]) == card


def _held_out():
    x_test, y_test = per_class(*train.fashion_mnist("test"), CARD_TEST_PER_CLASS)
    x_train, y_train = per_class(*train.fashion_mnist("train"), CARD_TRAIN_PER_CLASS)
    return x_test, y_test, x_train, y_train


def test_the_autoencoder_card_is_measured_again_from_the_files():
    x_test, y_test, x_train, y_train = _held_out()
    card = backbone_card(
        "autoencoder", str(SHIPPED_ROOT / "autoencoder"),
        classifier=train.pixel_classifier(SHIPPED_ROOT / "classifier"),
        x_test=x_test, y_test=y_test, x_train=x_train, y_train=y_train,
    )  # fmt: skip
    assert card["figures"] == pytest.approx(MODELS["autoencoder"]["card"]["figures"], rel=1e-4)


def test_a_denoiser_trained_to_predict_the_clean_latent_fails_its_card():
    """The shipped denoiser, trained on for 30 steps with the wrong objective (the clean latent as target
    instead of the noise), fails its card on the denoising loss, where the shipped one is within the bar."""
    from explain.nets.autoencoder import encode, load_autoencoder
    from explain.nets.diffusion import load_denoiser

    x_test, y_test, x_train, y_train = _held_out()
    vae = load_autoencoder(SHIPPED_ROOT / "autoencoder")
    denoiser = load_denoiser(SHIPPED_ROOT / "denoiser")
    with torch.no_grad():
        z0 = encode(vae, x_train)
    g = torch.Generator().manual_seed(0)
    alphas = denoiser.scheduler.alphas_cumprod
    optimiser = torch.optim.AdamW(denoiser.unet.parameters(), lr=1e-3)
    denoiser.unet.train()
    for _ in range(30):
        index = torch.randint(0, len(z0), (32,), generator=g)
        t = torch.randint(0, 1000, (32,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0[index] + (1 - a).sqrt() * torch.randn(z0[index].shape, generator=g)
        loss = torch.nn.functional.mse_loss(denoiser.eps(z_t, t, y_train[index]), z0[index])  # wrong target
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    denoiser.unet.eval()
    classifier = train.pixel_classifier(SHIPPED_ROOT / "classifier")
    card = denoiser_card(
        denoiser, vae, classifier, x_test[:200], y_test[:200], samples_per_class=2, sample_steps=5
    )
    assert not card["passed"]
    assert any(f.startswith("eps_mse_mean = ") for f in card["failures"]), card["failures"]
    bar = next(t.value for t in THRESHOLDS["denoiser"] if t.figure == "eps_mse_mean")
    assert MODELS["denoiser"]["card"]["figures"]["eps_mse_mean"] <= bar  # the shipped one learnt the noise


def test_the_shipped_classifier_config_matches_its_manifest():
    config = json.loads((SHIPPED_ROOT / "classifier" / "config.json").read_text())
    assert (
        config["architecture"] == "small_cnn"
        and config["options"]["width"] == MODELS["classifier"]["arguments"]["width"]
    )
    assert MODELS["classifier"]["test_accuracy"] > 0.88


# What a run of a recorded command writes besides the weights and that does not depend on how long it
# trained: the folders' configs and schedules (less the values measured from the trained weights), and of
# training.json what describes the run rather than its losses.
RUN_INDEPENDENT = ("kind", "hyperparameters", "classes", "cycle_layers")
MEASURED = {"scaling_factor"}  # the autoencoder's, 1 / std of its trained latents
DEPENDS_ON = {"denoiser": ["autoencoder"], "sae": ["classifier"], "c3lt_maps": ["autoencoder", "classifier"]}


def _layout(folder, kind: str) -> dict[str, object]:
    """Every JSON file but command.json (training.json only in its run-independent part), and every weight
    file's tensor names and shapes: what a changed default, schedule or architecture would change."""
    from safetensors import safe_open

    layout: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.suffix == ".json" and path.name != "command.json":
            content = json.loads(path.read_text())
            if path.name == "training.json":
                content = {k: content[k] for k in RUN_INDEPENDENT if k in content}
                content.get("hyperparameters", {}).pop("steps", None)
            elif (
                name == "config.json"
                and (folder / "training.json").is_file()
                and "block_out_channels" in content
            ):
                # an autoencoder trained here without image_range in its config is read as [0, 1]
                content.setdefault("image_range", [0.0, 1.0])
            layout[name] = {k: v for k, v in content.items() if k not in MEASURED}
        elif path.suffix == ".safetensors":
            with safe_open(path, "pt") as weights:
                layout[name] = {k: list(weights.get_slice(k).get_shape()) for k in weights.keys()}
    return layout


@pytest.mark.slow
@pytest.mark.parametrize(
    "folder", sorted(f for f in MODELS if MODELS[f]["kind"] not in ("classifier", "auxiliary"))
)
def test_the_recorded_command_run_again_writes_the_shipped_configs_and_layout(folder, tmp_path, one_thread):
    """FOIL_DEMO_TRAIN=1 retrains with the recorded commands: run for two steps, each must write the configs,
    schedules and weight shapes that ship. A default changed since (the bridge's beta_max once was) fails."""
    entry = MODELS[folder]
    argv = list(entry["command"][3:])
    argv[argv.index("--out") + 1] = str(tmp_path)
    argv[argv.index("--steps") + 1] = "2"
    for needed in DEPENDS_ON.get(entry["kind"], []):
        (tmp_path / needed).symlink_to(SHIPPED_ROOT / needed)
    train.main(argv)
    shipped, again = _layout(SHIPPED_ROOT / folder, entry["kind"]), _layout(tmp_path / folder, entry["kind"])
    assert sorted(again) == sorted(shipped)
    for name in shipped:
        assert again[name] == shipped[name], name
