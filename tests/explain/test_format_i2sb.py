"""The I2SB checkpoint format (what RCSB uses): a tiny random ADM written as an I2SB run writes it
(``latest.pt`` with ``net`` and torch_ema's ``ema``, ``options.pkl``), converted to the inpainting bridge,
checked against a reference implementation of the ADM and against I2SB's schedule, run through RCSB, and
refused when broken."""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from explain.methods.rcsb import RCSB
from explain.nets.formats import i2sb
from explain.nets.formats.common import FormatError
from explain.nets.formats.i2sb import convert_i2sb, load_i2sb
from explain.nets.split import SplitClassifier

from .gen_fixtures import one_thread  # noqa: F401
from .openai_reference import ReferenceUNet, randomize

# guided-diffusion create_model arguments of a tiny ADM with I2SB's choices (scale-shift norm, resblock
# up/down sampling, heads of a fixed size)
ADM = {
    "image_size": 16,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2",
    "attention_resolutions": "8",
    "num_head_channels": 16,
    "learn_sigma": False,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
}
INTERVAL, BETA_MAX, T0, T1 = 100, 0.3, 1e-4, 1.0


def reference_adm(cond_x1: bool, seed: int) -> ReferenceUNet:
    unet = ReferenceUNet(
        in_channels=6 if cond_x1 else 3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=(2,),  # 16 // 8
        channel_mult=(1, 2),
        num_head_channels=16,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    return randomize(unet, seed)


def write_run(tmp_path: Path, cond_x1: bool = True, seed: int = 0, adm: dict | None = None) -> dict:
    """An I2SB run directory: latest.pt as Runner.train saves it, options.pkl as Runner pickles its opt."""
    net, ema = reference_adm(cond_x1, seed), reference_adm(cond_x1, seed + 1)
    state = {f"diffusion_model.{k}": v for k, v in net.state_dict().items()}
    optimizer = torch.optim.AdamW(net.parameters(), lr=5e-5)
    torch.save(
        {
            "net": state,
            "ema": {
                "decay": 0.99,
                "num_updates": 7,
                "shadow_params": [p.detach().clone() for p in ema.parameters()],
                "collected_params": None,
            },
            "optimizer": optimizer.state_dict(),
            "sched": None,
        },
        tmp_path / "latest.pt",
    )
    opt = argparse.Namespace(
        name="inpaint-tiny",
        corrupt="inpaint-freeform2030",
        interval=INTERVAL,
        beta_max=BETA_MAX,
        t0=T0,
        T=T1,
        cond_x1=cond_x1,
        image_size=16,
        ot_ode=True,
        ema=0.99,
        device="cuda:0",
        ckpt_path=Path("/results/inpaint-tiny"),
        log_dir=Path(".log"),
    )
    with open(tmp_path / "options.pkl", "wb") as handle:
        pickle.dump(opt, handle)
    (tmp_path / "adm.json").write_text(json.dumps(adm or ADM))
    return {"net": net, "ema": ema}


def i2sb_std_fwd(interval: int, beta_max: float) -> np.ndarray:
    """I2SB's runner: make_beta_schedule(n, linear_end=beta_max / n), the first half mirrored, then
    std_fwd = sqrt(cumsum(betas)) (Diffusion.__init__)."""
    betas = np.linspace(1e-4**0.5, (beta_max / interval) ** 0.5, interval, dtype=np.float64) ** 2
    betas = np.concatenate([betas[: interval // 2], np.flip(betas[: interval // 2])])
    return np.sqrt(np.cumsum(betas))


@pytest.mark.parametrize("cond_x1", [True, False])
def test_bridge_network_equals_the_original_adm_with_i2sb_time_and_ema(tmp_path, cond_x1):
    run = write_run(tmp_path, cond_x1)
    bridge = load_i2sb(tmp_path, cache_dir=tmp_path / "cache")
    g = torch.Generator().manual_seed(1)
    x_t, x1 = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    region = torch.zeros(2, 1, 16, 16)
    n = 37
    noise_level = torch.linspace(T0, T1, INTERVAL)[n] * INTERVAL  # Image256Net.forward
    with torch.no_grad():
        ours = bridge.x0_hat(x_t, n, region, x1)
        inputs = torch.cat([x_t, x1], 1) if cond_x1 else x_t
        sigma = float(i2sb_std_fwd(INTERVAL, BETA_MAX)[n])
        theirs = x_t - sigma * run["ema"](inputs, noise_level.repeat(2))  # compute_pred_x0, EMA weights
        raw = x_t - sigma * run["net"](inputs, noise_level.repeat(2))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert (ours - raw).abs().max() > 1e-2  # the EMA weights, not the raw ones
    assert bridge.conditioning == ("x1" if cond_x1 else "none") and bridge.image_range == (-1.0, 1.0)


def test_schedule_is_i2sbs(tmp_path):
    write_run(tmp_path)
    bridge = load_i2sb(tmp_path, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(
        bridge.coefficient("std_fwd", torch.arange(INTERVAL), torch.zeros(INTERVAL)).numpy(),
        i2sb_std_fwd(INTERVAL, BETA_MAX),
        rtol=1e-5,
    )


def rgb_classifier(seed: int = 0) -> SplitClassifier:
    torch.manual_seed(seed)
    f = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1)
    )
    g = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return SplitClassifier(f=f.eval(), g=g.eval())


def test_rcsb_on_the_converted_bridge_keeps_everything_outside_its_region(tmp_path):
    write_run(tmp_path)
    bridge = load_i2sb(tmp_path, image_channels=3, cache_dir=tmp_path / "cache")
    method = RCSB(bridge=bridge, steps=4, ig_steps=3, smooth_samples=1, cell_size=4, s=5.0)
    model = rgb_classifier()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    results = method.explain_batch(model, x, [1, 2], generator=torch.Generator().manual_seed(2))
    again = method.explain_batch(model, x, [1, 2], generator=torch.Generator().manual_seed(2))
    for query, r, r2 in zip(x, results, again, strict=True):
        assert r.image.shape == (3, 16, 16) and np.isfinite(r.image).all()
        np.testing.assert_array_equal(r.image, r2.image)
        outside = np.broadcast_to(r.query_mask == 0, r.image.shape)
        assert outside.any() and (~outside).any()
        np.testing.assert_array_equal(r.image[outside], query.numpy()[outside])  # exactly
        assert np.abs(r.image[~outside] - query.numpy()[~outside]).max() > 1e-3  # inside, it moved


def test_converted_once_and_cached(tmp_path, monkeypatch):
    write_run(tmp_path)
    first = convert_i2sb(tmp_path, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(i2sb, "read_checkpoint", lambda *a, **k: pytest.fail("converted again"))
    assert convert_i2sb(tmp_path / "latest.pt", cache_dir=tmp_path / "cache") == first


def test_refuses_a_truncated_checkpoint(tmp_path):
    write_run(tmp_path)
    data = (tmp_path / "latest.pt").read_bytes()
    (tmp_path / "latest.pt").write_bytes(data[:1000])
    with pytest.raises(FormatError, match="truncated"):
        convert_i2sb(tmp_path, cache_dir=tmp_path / "cache")


def test_refuses_a_missing_options_file(tmp_path):
    write_run(tmp_path)
    (tmp_path / "options.pkl").unlink()
    with pytest.raises(FormatError, match="no options.pkl.*copy the options.pkl"):
        convert_i2sb(tmp_path, cache_dir=tmp_path / "cache")


def test_refuses_options_holding_other_objects(tmp_path):
    write_run(tmp_path)
    with open(tmp_path / "options.pkl", "wb") as handle:
        pickle.dump(argparse.Namespace(interval=10, hook=np.random.default_rng), handle)
    with pytest.raises(FormatError, match="not I2SB's options pickle"):
        convert_i2sb(tmp_path, cache_dir=tmp_path / "cache")


def test_refuses_wrong_channels(tmp_path):
    write_run(tmp_path)
    with pytest.raises(FormatError, match="makes 3-channel images but the data set's have 1"):
        load_i2sb(tmp_path, image_channels=1, cache_dir=tmp_path / "cache")


def test_refuses_an_adm_config_of_another_model(tmp_path):
    write_run(tmp_path, adm=ADM | {"num_channels": 64})
    with pytest.raises(FormatError, match="does not fit the architecture.*shape mismatch"):
        convert_i2sb(tmp_path, cache_dir=tmp_path / "cache")


def test_refuses_options_that_disagree_with_the_network(tmp_path):
    write_run(tmp_path, cond_x1=False, adm=ADM | {"in_channels": 6})
    with pytest.raises(
        FormatError, match="takes 6 channels but I2SB's network with cond_x1=False gives it 3"
    ):
        convert_i2sb(tmp_path, cache_dir=tmp_path / "cache")
