"""Each generative backbone trains for a few steps, saves a diffusers-format directory with a training record,
and loads back (from_pretrained, local files only) to the same outputs; methods built from those directories
store the paths in their config."""

from __future__ import annotations

import json

import pytest
import torch

from explain.methods.c3lt import C3LT
from explain.methods.ldce import LDCE, LDCETxt
from explain.methods.rcsb import RCSB
from explain.methods.slc import SLC
from explain.nets.autoencoder import autoencoder_config, decode, encode, load_autoencoder, train_autoencoder
from explain.nets.bridge import bridge_config, load_bridge, train_bridge
from explain.nets.c3lt_maps import apply_n, load_c3lt_maps, train_c3lt_maps
from explain.nets.diffusion import denoiser_config, load_denoiser, train_denoiser
from explain.nets.discriminator import load_discriminator
from explain.nets.sae import load_sae, train_sae

from .gen_fixtures import (
    SIZE,
    images,
    one_thread,  # noqa: F401 (autouse fixture)
    tiny_classifier,
    tiny_maps,
    tiny_vae,
)


class Progress:
    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))


def check_record(path, kind: str, steps: int, progress: Progress) -> None:
    record = json.loads((path / "training.json").read_text())
    assert record["kind"] == kind and record["steps"] == steps
    assert len(record["loss_every_step"]) == steps
    assert all(isinstance(v, float) and v == v for v in record["loss_every_step"])
    assert progress.calls[0] == (0, steps) and progress.calls[-1] == (steps, steps)


def test_autoencoder_round_trip(tmp_path):
    x, progress = images(12), Progress()
    cfg = autoencoder_config(block_out_channels=(8, 16), norm_num_groups=8, sample_size=SIZE)
    vae = train_autoencoder(x, tmp_path, 3, batch_size=4, config=cfg, progress=progress)
    check_record(tmp_path, "autoencoder", 3, progress)
    loaded = load_autoencoder(tmp_path)
    assert loaded.config.scaling_factor == pytest.approx(vae.config.scaling_factor)
    assert loaded.config.scaling_factor != 1.0  # set from the trained latents' spread
    with torch.no_grad():
        torch.testing.assert_close(decode(loaded, encode(loaded, x)), decode(vae, encode(vae, x)))
    method = SLC(autoencoder=tmp_path)
    assert method.config()["autoencoder"] == str(tmp_path)
    json.dumps(method.config())


def test_denoiser_round_trip(tmp_path):
    z, labels, progress = torch.randn(10, 4, 8, 8), torch.arange(10) % 4, Progress()
    cfg = denoiser_config(4, 4, 8, (16, 32), norm_num_groups=8)
    denoiser = train_denoiser(
        z, labels, tmp_path, 2, num_classes=4, batch_size=5, config=cfg, progress=progress
    )
    check_record(tmp_path, "latent_denoiser", 2, progress)
    loaded = load_denoiser(tmp_path)
    assert loaded.null_class == 4
    t = torch.tensor([10, 500])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eps(z[:2], t, labels[:2]), denoiser.eps(z[:2], t, labels[:2]))
    (tmp_path / "vae").mkdir()
    tiny_vae().save_pretrained(tmp_path / "vae")
    method = LDCE(autoencoder=tmp_path / "vae", denoiser=tmp_path)
    assert method.config()["denoiser"] == str(tmp_path)
    with pytest.raises(ValueError, match="labels must lie in 0..3"):
        train_denoiser(z, labels + 1, tmp_path / "bad", 1, num_classes=4, config=cfg)


def test_the_denoiser_saves_the_moving_average_of_its_weights(tmp_path):
    """Decay 0 averages nothing (the last weights, as without averaging); decay 0.9 keeps a blend of the
    earlier steps' weights, so it saves other weights from the same seeded run."""
    z, labels = torch.randn(10, 4, 8, 8), torch.arange(10) % 4
    cfg = denoiser_config(4, 4, 8, (16, 32), norm_num_groups=8)

    def saved(name: str, ema_decay: float | None) -> dict[str, torch.Tensor]:
        train_denoiser(
            z, labels, tmp_path / name, 3, num_classes=4, batch_size=5, config=cfg, ema_decay=ema_decay,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        return load_denoiser(tmp_path / name).unet.state_dict()

    last, zero, averaged = saved("last", None), saved("zero", 0.0), saved("ema", 0.9)
    for key, value in last.items():
        torch.testing.assert_close(zero[key], value)
    assert any(not torch.allclose(averaged[k], v) for k, v in last.items())
    record = json.loads((tmp_path / "ema" / "training.json").read_text())
    assert record["hyperparameters"]["ema_decay"] == 0.9
    with pytest.raises(ValueError, match="ema_decay must lie in"):
        train_denoiser(z, labels, tmp_path / "bad", 1, num_classes=4, config=cfg, ema_decay=1.0)


def test_bridge_round_trip(tmp_path):
    x, progress = images(8), Progress()
    cfg = bridge_config(1, SIZE, (8, 16), norm_num_groups=8)
    bridge = train_bridge(x, tmp_path, 2, batch_size=4, config=cfg, progress=progress)
    check_record(tmp_path, "inpainting_bridge", 2, progress)
    loaded = load_bridge(tmp_path)
    assert loaded.schedule == bridge.schedule
    region = torch.zeros(2, 1, SIZE, SIZE)
    region[:, :, 4:8, 4:8] = 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.x0_hat(x[:2], 300, region), bridge.x0_hat(x[:2], 300, region))
    assert RCSB(bridge=tmp_path).config()["bridge"] == str(tmp_path)


def test_bridge_schedule_is_i2sb_symmetric():
    from explain.nets.bridge import BridgeSchedule

    s = BridgeSchedule(num_timesteps=100).tensors()
    torch.testing.assert_close(s["std_fwd"], s["std_bwd"].flip(0))
    torch.testing.assert_close(s["mu_x0"] + s["mu_x1"], torch.ones(100))
    assert s["mu_x0"][0] > 0.99 and s["mu_x1"][-1] > 0.99  # x_0 at the start, x_1 at the end


def test_sae_round_trip(tmp_path):
    features, progress = torch.rand(40, 8), Progress()
    sae = train_sae(features, tmp_path, 5, batch_size=16, progress=progress)
    check_record(tmp_path, "sae", 5, progress)
    loaded = load_sae(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.h_enc(features), sae.h_enc(features))
    with pytest.raises(ValueError, match=r"\(N >= 1, d\)"):
        train_sae(torch.rand(4, 2, 2), tmp_path / "bad", 1)


def test_c3lt_maps_round_trip(tmp_path):
    x, progress, vae, model = images(8), Progress(), tiny_vae(), tiny_classifier()
    flags = [p.requires_grad for p in model.f.parameters()]
    maps = train_c3lt_maps(vae, model, x[:4], x[4:], 0, 1, tmp_path, 2, batch_size=2, progress=progress)
    assert [p.requires_grad for p in model.f.parameters()] == flags  # the classifier is left as it was
    check_record(tmp_path, "c3lt_maps", 2, progress)
    record = json.loads((tmp_path / "training.json").read_text())
    assert set(record["parts_last_10pct"]) == {"cls", "prx", "prx_l1", "cyc", "adv"}  # Eq. (11)'s terms
    loaded = load_c3lt_maps(tmp_path)
    assert (loaded.class_a, loaded.class_b, loaded.n) == (0, 1, 1)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.g(z), maps.g(z))
        torch.testing.assert_close(loaded.h(z), maps.h(z))
    assert load_discriminator(tmp_path / "discriminator")(x[:2]).shape == (2,)
    (tmp_path / "vae").mkdir()
    vae.save_pretrained(tmp_path / "vae")
    assert C3LT(autoencoder=tmp_path / "vae", maps=tmp_path).config()["maps"] == str(tmp_path)


def test_missing_directories_are_named(tmp_path):
    for load in (load_autoencoder, load_denoiser, load_bridge, load_sae, load_c3lt_maps):
        with pytest.raises(FileNotFoundError, match="nowhere"):
            load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not a local Stable Diffusion directory"):
        LDCETxt(stable_diffusion=tmp_path, class_names=["a", "b"])


def test_training_refuses_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="steps must be >= 1, not 0"):
        train_autoencoder(images(2), tmp_path, 0)
    with pytest.raises(ValueError, match=r"\(N >= 1, C, H, W\)"):
        train_bridge(torch.rand(3, 16, 16), tmp_path, 1)
    with pytest.raises(ValueError, match="both 2"):
        train_c3lt_maps(tiny_vae(), tiny_classifier(), images(2), images(2), 2, 2, tmp_path, 1)


def test_an_autoencoder_states_its_range_and_channels_and_images_are_converted(tmp_path):
    """A Stable Diffusion-like VAE (3 channels, [-1, 1]) gets grey [0, 1] images repeated and rescaled, and
    gives them back in [0, 1] as grey (the channel mean); one that does not state its range is refused."""
    from explain.nets.autoencoder import new_autoencoder

    torch.manual_seed(0)
    cfg = autoencoder_config(in_channels=3, block_out_channels=(8, 16), norm_num_groups=8, sample_size=SIZE)
    sd_like = new_autoencoder({**cfg, "image_range": [-1.0, 1.0]}).eval()
    x = images(3)  # (3, 1, SIZE, SIZE) in [0, 1]
    with torch.no_grad():
        z = encode(sd_like, x)
        expected_z = sd_like.encode(x.repeat(1, 3, 1, 1) * 2 - 1).latent_dist.mean
        torch.testing.assert_close(z, expected_z * sd_like.config.scaling_factor)
        raw = sd_like.decode(z / sd_like.config.scaling_factor).sample
        torch.testing.assert_close(decode(sd_like, z, 1), ((raw + 1) / 2).mean(1, keepdim=True))
        assert decode(sd_like, z).shape[1] == 3
    cfg_grey = autoencoder_config(block_out_channels=(8, 16), norm_num_groups=8, sample_size=SIZE)
    grey = new_autoencoder(cfg_grey)
    with pytest.raises(ValueError, match="1-channel images but these have 3"):
        encode(grey, x.repeat(1, 3, 1, 1))
    sd_like.save_pretrained(tmp_path / "sd")
    config_path = tmp_path / "sd" / "config.json"
    stated = json.loads(config_path.read_text())
    assert stated["image_range"] == [-1.0, 1.0]
    del stated["image_range"]
    config_path.write_text(json.dumps(stated))
    with pytest.raises(ValueError, match=r'add "image_range": \[-1.0, 1.0\]'):
        load_autoencoder(tmp_path / "sd")
    assert load_autoencoder(tmp_path / "sd", image_range=[-1, 1]).config.image_range == [-1.0, 1.0]
    with pytest.raises(ValueError, match="image_range"):
        new_autoencoder({k: v for k, v in cfg.items() if k != "image_range"})


def test_matryoshka_loss_averages_the_nested_prefix_reconstructions():
    from explain.nets.sae import SparseAutoencoder, matryoshka_reconstruction

    torch.manual_seed(0)
    sae, x = SparseAutoencoder(d_in=8, expansion=4), torch.rand(10, 8)
    a = sae.h_enc(x)
    expected = []
    for m in (2, 4, 8, 16, 32):  # 1/16 .. 1 of 32 latents: zero the rest, decode with h_dec
        kept = torch.cat([a[:, :m], torch.zeros_like(a[:, m:])], dim=1)
        expected.append(((sae.h_dec(kept) - x) ** 2).sum(-1).mean())
    got = matryoshka_reconstruction(sae, a, x, (0.0625, 0.125, 0.25, 0.5, 1.0))
    torch.testing.assert_close(got, torch.stack(expected).mean())
    with pytest.raises(ValueError, match="prefixes"):
        train_sae(x, "unused", 1, batch_size=4, prefixes=(0.5, 0.25, 1.0))


def test_a_matryoshka_sae_reconstructs_from_its_first_latents_better_than_a_plain_one(tmp_path):
    """The nested objective is what trains the first latents to carry the coarse structure on their own."""
    from explain.nets.sae import matryoshka_reconstruction

    g = torch.Generator().manual_seed(1)
    features = torch.rand(256, 4, generator=g) @ torch.randn(4, 8, generator=g)  # rank-4 data
    errors = {}
    for name, prefixes in (("plain", (1.0,)), ("matryoshka", (0.0625, 0.125, 0.25, 0.5, 1.0))):
        sae = train_sae(features, tmp_path / name, 300, batch_size=64, lr=1e-2, prefixes=prefixes)
        with torch.no_grad():
            errors[name] = float(matryoshka_reconstruction(sae, sae.h_enc(features), features, (0.125,)))
    assert errors["matryoshka"] < 0.7 * errors["plain"], errors


def test_c3lt_maps_are_the_releases_two_layer_net_with_norm_preserving_steps():
    """T = Linear(D, D), ReLU, Linear(D, D) on the flattened code; a step z + T(z) is rescaled to the norm of
    the code the walk started from (also at the second step)."""
    from torch import nn

    from explain.nets.c3lt_maps import LatentMap, apply_n

    g = tiny_maps().g
    assert [type(m) for m in g.net] == [nn.Linear, nn.ReLU, nn.Linear]
    assert g.net[0].in_features == g.net[0].out_features == g.net[2].out_features == 4 * 8 * 8
    assert LatentMap(12, width=5).net[0].out_features == 5
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    norm = z.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    with torch.no_grad():
        one = z + g.net(z.flatten(1)).view_as(z)
        one = one * norm / one.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        two = one + g.net(one.flatten(1)).view_as(z)
        two = two * norm / two.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        torch.testing.assert_close(apply_n(g, z, 1), one)
        torch.testing.assert_close(apply_n(g, z, 2), two)
    assert not torch.allclose(one, z)  # default initialisation: the untrained map moves the code


def test_c3lt_cycle_term_is_the_releases():
    """Eq. (6) as released: the mean of the L1 of f's ReLU outputs (the tiny f: one ReLU, at 1) and the pixel
    L1 (on [-1, 1]), then the mean of that and the latent L1; nested Sequentials are walked in order."""
    from torch import nn

    from explain.nets.c3lt_maps import apply_n, c3lt_loss, cycle_layers
    from explain.nets.discriminator import Discriminator

    vae, model, x = tiny_vae(), tiny_classifier(), images(3)
    assert cycle_layers(model.f) == [1]
    nested = nn.Sequential(nn.Identity(), nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1)))
    assert cycle_layers(nested) == [2]
    assert cycle_layers(nn.Identity()) == [-1] and cycle_layers(nn.Sequential(nn.Conv2d(1, 1, 1))) == [-1]
    maps = tiny_maps()
    with torch.no_grad():
        _, parts, _, x_cyc = c3lt_loss(
            x, 1, maps.g, maps.h, vae, model, Discriminator(in_channels=1), n=1, alpha=0.1, beta=0.1, gamma=0
        )
        z_x = encode(vae, x)
        z_cyc = apply_n(maps.h, apply_n(maps.g, z_x, 1), 1)
        relu = (model.f[1](model.f[0](x_cyc)) - model.f[1](model.f[0](x))).abs().mean()
        perceptual = (relu + 2 * (x_cyc - x).abs().mean()) / 2  # pixels on [-1, 1]
        expected = (perceptual + (z_x - z_cyc).abs().mean()) / 2
    assert parts["cyc"] == pytest.approx(float(expected), rel=1e-5)


def test_c3lt_proximity_is_the_releases_on_the_papers_image_scale():
    """Eq. (5) as released: (L1 + 10 L_smth + L_entr) / 12 on the mask (x' - x)^2 normalised to [0, 1] per
    image; its L1 on the paper's [-1, 1] images: 2 |x - x'| of our [0, 1] images."""
    from explain.nets.c3lt_maps import c3lt_loss
    from explain.nets.discriminator import Discriminator

    vae, model, x, maps = tiny_vae(), tiny_classifier(), images(3), tiny_maps()
    with torch.no_grad():
        _, parts, x_prime, _ = c3lt_loss(
            x, 1, maps.g, maps.h, vae, model, Discriminator(in_channels=1), n=1, alpha=0.1, beta=0.1, gamma=0
        )
    on_paper_scale = ((2 * x - 1) - (2 * x_prime - 1)).abs().mean()
    assert float(on_paper_scale) > 0.01
    assert parts["prx_l1"] == pytest.approx(float(on_paper_scale), rel=1e-5)
    m = (x_prime - x).pow(2)[:, 0]
    lo, hi = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
    m = (m - lo) / (hi - lo)
    dy, dx = (m[:, 1:] - m[:, :-1]) ** 2, (m[:, :, 1:] - m[:, :, :-1]) ** 2
    smooth = (dy.mean((1, 2)) + dx.mean((1, 2))) / 2
    entropy = torch.minimum(m, 1 - m).mean()
    expected = (on_paper_scale + 10 * smooth.mean() + entropy) / 12
    assert parts["prx"] == pytest.approx(float(expected), rel=1e-4)


def test_c3lt_discriminator_is_trained_first_and_frozen_while_the_maps_train(tmp_path):
    """The release's discriminator is its GAN's, never updated by the maps' training: with the same seed,
    2 and 5 map steps leave the same discriminator (and different maps)."""
    vae, model, x = tiny_vae(), tiny_classifier(), images(8)
    saved = {}
    for steps in (2, 5):
        maps = train_c3lt_maps(
            vae, model, x[:4], x[4:], 0, 1, tmp_path / str(steps), steps, batch_size=2, discriminator_steps=3
        )
        saved[steps] = (load_discriminator(tmp_path / str(steps) / "discriminator"), maps)
    for a, b in zip(saved[2][0].parameters(), saved[5][0].parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(saved[2][1].g.net[0].weight, saved[5][1].g.net[0].weight)
    record = json.loads((tmp_path / "5" / "training.json").read_text())
    assert record["hyperparameters"]["discriminator_steps"] == 3


def test_c3lt_trained_on_a_toy_pair_cycles_back_near_the_start(tmp_path):
    """Trained on a toy pair (dark and bright images), h(g(z)) returns near z: its error is a small fraction
    of what the same training gives without the cycle term (beta = 0). The release's cycle loss is a mean of
    its terms, so 50 steps show it with a strong weight (beta = 10)."""
    vae, model = tiny_vae(), tiny_classifier()
    g = torch.Generator().manual_seed(3)
    a = torch.rand(32, 1, SIZE, SIZE, generator=g) * 0.3
    b = 0.7 + torch.rand(32, 1, SIZE, SIZE, generator=g) * 0.3
    errors = {}
    for beta in (10.0, 0.0):
        maps = train_c3lt_maps(
            vae,
            model,
            a,
            b,
            0,
            1,
            tmp_path / str(beta),
            50,
            batch_size=8,
            beta=beta,
            lr=1e-2,
            discriminator_steps=10,
        )
        with torch.no_grad():
            z = encode(vae, a[:8])
            errors[beta] = float((apply_n(maps.h, apply_n(maps.g, z, 1), 1) - z).abs().mean())
    assert errors[10.0] < 0.35 * errors[0.0], errors
