"""RCSB against the authors' released code (github.com/sobieskibj/rcsb): its region post-processing, its
guidance step and normalisation, its classifier input, its timeline and its output range. Each expected
value is worked out here by hand or with numpy, not by calling the implementation's helpers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from explain.methods.rcsb import (
    RCSB,
    area_cells,
    classifier_view,
    integrated_gradients,
    normalised_attribution,
    space_indices,
    top_cells_region,
)
from explain.nets.bridge import BridgeSchedule, InpaintingBridge
from explain.nets.split import SplitClassifier

from .gen_fixtures import one_thread  # noqa: F401 (autouse fixture)


def cells_of(values: list[list[float]], cell: int) -> torch.Tensor:
    """(1, 1, H, W) attribution, constant ``values[r][c]`` over each ``cell`` x ``cell`` block."""
    grid = torch.tensor(values, dtype=torch.float32)
    return grid.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[None, None]


def test_normalisation_divides_by_the_98_percent_value_and_clips_the_rest_to_one():
    """1023 ones and one 5: the cumulative sum passes 98 % of 1028 (1007.44) inside the ones, so the
    threshold is 1 and the 5 is clipped to 1."""
    attribution = torch.ones(1, 1, 32, 32)
    attribution[0, 0, 3, 7] = 5.0
    got = normalised_attribution(attribution)
    torch.testing.assert_close(got, torch.ones(1, 32, 32))
    # values 1..100 (total 5050): the sum first passes 4949 at 99 (4950), so everything is divided by 99
    ramp = torch.arange(1, 101, dtype=torch.float32).view(1, 1, 10, 10)
    expected = np.minimum(np.arange(1, 101) / 99.0, 1.0).reshape(1, 10, 10)
    np.testing.assert_allclose(normalised_attribution(ramp).numpy(), expected, rtol=1e-6)


def test_region_sums_channels_before_the_absolute_value():
    """Cell 0: +5 in one channel, -5 in the other (sum 0); cell 3: +1 and +1. The release sums the channels
    first, so cell 3 is chosen; |.| per channel first would choose cell 0."""
    attribution = torch.zeros(1, 2, 8, 8)
    attribution[0, 0, :4, :4], attribution[0, 1, :4, :4] = 5.0, -5.0
    attribution[0, :, 4:, 4:] = 1.0
    attribution[0, :, :4, 4:] = 0.1
    region = top_cells_region(attribution, 4, area=0.25)
    expected = torch.zeros(8, 8)
    expected[4:, 4:] = 1
    torch.testing.assert_close(region[0, 0], expected)


def test_region_ranks_cells_after_clipping_the_outliers():
    """32 px, 8 px cells (16 cells), one cell allowed. Cell 0: 63 ones and a 20 (sum 83); cell 5: 64 x 1.2
    (76.8); the others ones. Total 1055.8, 98 % = 1034.68: the ascending sum passes it at the 64th 1.2
    (959 + 76.8 = 1035.8), so everything is divided by 1.2 and the 20 clipped to 1: cell 0 scores
    63 / 1.2 + 1 = 53.5, cell 5 scores 64. Raw sums would pick cell 0."""
    attribution = torch.ones(1, 1, 32, 32)
    attribution[0, 0, 0, 0] = 20.0
    attribution[0, 0, 8:16, 8:16] = 1.2
    region = top_cells_region(attribution, 8, area=0.07)
    expected = torch.zeros(32, 32)
    expected[8:16, 8:16] = 1
    torch.testing.assert_close(region[0, 0], expected)


@pytest.mark.parametrize(("area", "count"), [(0.25, 4), (0.3, 4), (0.5, 8), (0.07, 1)])
def test_region_takes_the_top_cells_that_fit_the_area(area, count):
    """16 cells with distinct positive scores: the release's quantile levels keep the largest top set whose
    share of the cells is at most ``area``: floor(area x 16) cells."""
    scores = torch.randperm(16, generator=torch.Generator().manual_seed(3)).float() + 1
    chosen = area_cells(scores.view(1, 4, 4), area)[0].flatten()
    expected = scores >= scores.sort(descending=True).values[count - 1]
    assert int(expected.sum()) == count
    torch.testing.assert_close(chosen, expected)


def test_region_falls_through_to_every_positive_cell_when_even_the_top_cell_is_too_large():
    """A 2 x 2 grid and area 0.2: one cell is 0.25 > 0.2; the release's loop breaks at its first level and
    takes its lowest (the minimum): every cell, and of those the positive ones."""
    region = top_cells_region(cells_of([[3.0, 1.0], [0.0, 2.0]], 4), 4, area=0.2)
    torch.testing.assert_close(region[0, 0], cells_of([[1.0, 1.0], [0.0, 1.0]], 4)[0, 0])


def test_region_with_fewer_positive_cells_than_the_area_takes_them_all():
    region = top_cells_region(cells_of([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]], 4), 4, area=0.3)
    torch.testing.assert_close(region[0, 0], cells_of([[0, 0, 0], [0, 1, 0], [0, 0, 0]], 4)[0, 0].float())


def test_cells_that_do_not_tile_the_image_are_refused_as_the_release_fails():
    """28 px, 16 px cells: the release's reshape into whole cells fails; ours says so and what fits."""
    attribution = torch.zeros(1, 1, 28, 28)
    attribution[0, 0, 20, 25] = 1.0
    with pytest.raises(
        ValueError, match=r"16-pixel cells do not tile 28 x 28 images.*\(1, 2, 4, 7, 14, 28\)"
    ):
        top_cells_region(attribution, 16, area=0.3)
    with pytest.raises(ValueError, match=r"5-pixel cells do not tile 28 x 30 images.*\(1, 2\)"):
        top_cells_region(torch.zeros(1, 1, 28, 30), 5, area=0.3)
    region = top_cells_region(attribution, 7, area=0.1)  # 7 tiles 28: the bottom-right cell of 4 x 4
    expected = torch.zeros(28, 28)
    expected[14:21, 21:] = 1
    torch.testing.assert_close(region[0, 0], expected)


def test_integrated_gradients_use_gauss_legendre_points():
    """A cubic logit sum(x^3): IG from zero is x * int_0^1 3 a^2 x^2 da = x^3, which two Gauss-Legendre points
    integrate exactly (degree <= 3); a two-point midpoint sum would give 0.9375 x^3."""

    class Cubic(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return torch.stack([(z**3).flatten(1).sum(1), torch.zeros(len(z))], 1)

    model = SplitClassifier(f=nn.Identity(), g=Cubic())
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    got = integrated_gradients(model, x, torch.zeros(2, dtype=torch.long), 2)
    torch.testing.assert_close(got, x**3, rtol=1e-5, atol=1e-6)


def test_classifier_view_is_the_release_min_max_rescaling_in_either_bridge_range():
    rng = np.random.default_rng(0)
    dark = rng.uniform(0.1, 0.9, (1, 1, 4, 4)).astype(np.float32)  # min < 0.5: rescaled by min and max
    bright = rng.uniform(0.6, 0.9, (1, 1, 4, 4)).astype(np.float32)  # min >= 0.5: passed on in [-1, 1] units
    expected_dark = (dark - dark.min()) / (dark.max() - dark.min())
    expected_bright = 2 * bright - 1
    for low, high in ((0.0, 1.0), (-1.0, 1.0)):
        images = torch.from_numpy(np.concatenate([dark, bright])) * (high - low) + low
        got = classifier_view(images, (low, high)).numpy()
        np.testing.assert_allclose(got[0:1], expected_dark, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[1:2], expected_bright, rtol=1e-5, atol=1e-6)


def test_timeline_is_i2sb_space_indices_of_the_start_step():
    """tau 0.6 of 1000 steps, N = 100: 101 times from 0 to 599, each within half a step of k x 5.99."""
    times = space_indices(600, 101)
    assert len(times) == 101 and times[0] == 0 and times[-1] == 599
    for k, t in enumerate(times):
        assert abs(t - k * 5.99) <= 0.5
    assert space_indices(1000, 26)[-1] == 999
    with pytest.raises(ValueError, match="steps do not fit"):
        space_indices(5, 10)


class ZeroNet(nn.Module):
    """A bridge network that predicts nothing: x0_hat = x_t."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(out_channels=1, get=lambda key, default=None: default)

    def forward(self, inputs: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=torch.zeros_like(inputs[:, :1]))


def linear_classifier() -> SplitClassifier:
    torch.manual_seed(0)
    g = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    nn.init.normal_(g[1].weight, std=0.3)
    return SplitClassifier(f=nn.Identity(), g=g.eval())


@pytest.mark.parametrize("image_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_one_guidance_step_is_s_over_the_whole_image_norm_in_minus_one_one_units(image_range):
    """One step from t_1 = 1 to t_0 = 0 (tau 2 / 1000) with x0_hat = x_t: Adam's first direction is
    sign(g) everywhere, its norm over the whole image sqrt(64) = 8, so inside R the image moves by
    bar mu_0 s / 8 in [-1, 1] units, bar mu_0 s / 16 in [0, 1] units, whatever the bridge's range; outside R
    nothing moves. (Masking before the norm would divide by sqrt(16) = 4.)"""
    schedule = BridgeSchedule(num_timesteps=1000)
    bridge = InpaintingBridge(unet=ZeroNet(), schedule=schedule, image_range=image_range)
    x = 0.25 + 0.5 * torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = linear_classifier()
    runs = {}
    for s in (0.0, 0.5):
        method = RCSB(
            bridge=bridge, steps=1, tau=0.002, s=s, cell_size=4, area=0.3, ig_steps=2, smooth_samples=1
        )
        runs[s] = method.explain_batch(model, x, [1, 2], generator=torch.Generator().manual_seed(7))
    betas = np.linspace(1e-4**0.5, (1.0 / 1000) ** 0.5, 1000) ** 2
    betas = np.concatenate([betas[:500], np.flip(betas[:500])])
    sigma2 = np.cumsum(betas)
    mu_bar = sigma2[0] / sigma2[1]  # the OT-ODE step's weight of x_1 from step 1 to step 0
    for still, moved in zip(runs[0.0], runs[0.5], strict=True):
        inside = moved.query_mask == 1
        assert inside.mean() == pytest.approx(0.25)  # one of four cells
        change = np.abs(moved.image[0] - still.image[0])
        np.testing.assert_allclose(change[inside], mu_bar * 0.5 / 16, rtol=1e-4)
        np.testing.assert_array_equal(change[~inside], 0.0)


def test_the_result_is_clamped_to_the_image_range():
    bridge = InpaintingBridge(unet=ZeroNet(), schedule=BridgeSchedule(), image_range=(-1.0, 1.0))
    x = 0.25 + 0.5 * torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    method = RCSB(bridge=bridge, steps=3, tau=0.01, s=500.0, cell_size=4, ig_steps=2, smooth_samples=1)
    results = method.explain_batch(linear_classifier(), x, [1, 2], generator=torch.Generator().manual_seed(7))
    for r in results:
        inside = r.query_mask == 1
        assert r.image.min() >= 0.0 and r.image.max() <= 1.0
        assert np.isin(r.image[0][inside], [0.0, 1.0]).mean() > 0.9  # pushed past the range, then clamped
        assert math.isfinite(float(r.image.sum()))


def test_the_plain_name_runs_at_the_release_defaults_and_the_demo_variant_changes_only_cells_and_area():
    """scripts/run.sh and the imagenet_cava configs: s 1.5, start_step 600 of 1000, nfe 100, cell 16,
    area 0.3; Captum: 50 IG steps; noise_tunnel: 5 samples (Captum's default), stdevs 0.05; Adam at
    PyTorch's."""
    from explain.methods import registered

    config = RCSB(bridge=InpaintingBridge(unet=ZeroNet(), schedule=BridgeSchedule())).config()
    expected = {"steps": 100, "tau": 0.6, "s": 1.5, "cell_size": 16, "area": 0.3, "ig_steps": 50}
    expected |= {"smooth_samples": 5, "smooth_sigma": 0.05, "adam_betas": [0.9, 0.999], "adam_eps": 1e-8}
    assert {k: config[k] for k in expected} == expected
    demo = registered("rcsb-28px")
    assert demo.config() == {"cell_size": 4, "area": 0.4}
    assert demo.variant.demo_budget == "full"


def test_the_tiny_demo_variant_departs_only_for_its_cpu_budget():
    """rcsb-cpu-tiny (the tiny demo in make test) keeps s and tau as released: the shipped bridge it runs on
    carries the guidance (tests/studies/test_demo_tiny_models.py), so no larger step stands in for it."""
    from explain.methods import registered

    tiny = registered("rcsb-cpu-tiny")
    assert tiny.config() == {"steps": 10, "area": 0.5, "cell_size": 4, "ig_steps": 4, "smooth_samples": 1}
    assert tiny.variant.demo_budget == "tiny"


def test_rcsb_at_the_release_defaults_refuses_28_pixel_images_before_its_attributions():
    """rcsb-28px's reason: the release's 16-pixel cells do not tile 28 pixels; RCSB refuses the batch before
    the 250 attribution passes, and 4-pixel cells (the variant's) tile it exactly (7 x 7)."""
    from explain.methods.rcsb import cell_grid, cell_scores

    calls = []

    class Counted(nn.Identity):
        def forward(self, x):
            calls.append(len(x))
            return x

    g = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3)).eval()
    counted = SplitClassifier(f=Counted(), g=g)
    bridge = InpaintingBridge(unet=ZeroNet(), schedule=BridgeSchedule(), image_range=(0.0, 1.0))
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"16-pixel cells do not tile 28 x 28 images.*rcsb-28px"):
        RCSB(bridge=bridge).explain_batch(counted, x, [1, 2], generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1  # the query's own prediction (the batch's check), no attribution pass
    results = RCSB(
        bridge=bridge, steps=1, tau=0.002, cell_size=4, ig_steps=2, smooth_samples=1
    ).explain_batch(counted, x, [1, 2], generator=torch.Generator().manual_seed(0))
    assert len(results) == 2 and len(calls) > 1
    even = torch.ones(1, 28, 28)
    assert cell_grid((28, 28), 4) == (7, 7) and cell_scores(even, 4).unique().tolist() == [16.0]
