"""oneDNN's packed weights for products with few rows (explain.methods.packed): the same products as
F.linear to float32 rounding, the plain product where packing is unavailable, and searches through them
(the first layer's per-cell blocks, VGG's tail) that choose the plain loops' edits either way."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from explain.methods import packed
from explain.methods.cell_search import CellBlocks
from explain.methods.packed import PackedLinear, packed_linear
from tests.explain.cell_models import (  # noqa: F401 (single_thread: an autouse fixture)
    a_target,
    images,
    single_thread,
    tiny_aux,
)
from tests.explain.test_cell_bounds import assert_reference_edits, wide_model

FRESH = [int.from_bytes(os.urandom(4), "little") for _ in range(2)]  # new inputs on every run


@pytest.mark.parametrize("seed", [0, 1, *FRESH])
def test_packed_products_equal_plain_ones_to_rounding(seed):
    generator = torch.Generator().manual_seed(seed)
    out, inp = [(300, 70), (64, 512), (17, 5)][seed % 3]
    weight = torch.randn(out, inp, generator=generator)
    bias = torch.randn(out, generator=generator)
    product = PackedLinear(weight)
    assert product.packed is not None or packed._PACK is None  # packed where torch has oneDNN
    for rows in (1, 2, 7, 8, 9, 50):
        x = torch.randn(rows, inp, generator=generator)
        exact = F.linear(x.double(), weight.double(), bias.double())
        scale = (x.abs().double() @ weight.abs().double().t()).max()
        for got in (product(x, bias), product(x) + bias):
            assert got.shape == (rows, out) and got.dtype == torch.float32
            assert float((got.double() - exact).abs().max()) <= 1e-5 * float(scale) + 1e-6


def test_without_onednn_the_plain_product_runs(monkeypatch):
    monkeypatch.setattr(packed, "_PACK", None)
    weight = torch.randn(40, 30)
    product = PackedLinear(weight)
    x = torch.randn(5, 30)
    assert product.packed is None and torch.equal(product(x), F.linear(x, weight))
    assert PackedLinear(weight.double()).packed is None  # float32 only


def test_packed_weights_are_kept_while_unchanged_and_rebuilt_after_an_edit():
    layer = nn.Linear(30, 20)
    first = packed_linear(layer)
    assert packed_linear(layer) is first
    with torch.no_grad():
        layer.weight.mul_(2)
    again = packed_linear(layer)
    assert again is not first
    x = torch.randn(3, 30)
    torch.testing.assert_close(again(x, layer.bias), layer(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "weight_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float64)],
)
def test_cell_blocks_multiply_each_cell_by_its_own_block(dtype, weight_dtype):
    generator = torch.Generator().manual_seed(3)
    d, hw, out = 6, 9, 11
    weight = torch.randn(out, d * hw, generator=generator)
    blocks = CellBlocks(weight.to(weight_dtype), dtype, d, hw)  # the search's dtype, whatever the layer's
    rows = torch.randn(4, d, generator=generator)
    for i in range(hw):
        x = torch.zeros(4, d, hw)
        x[:, :, i] = rows  # Flatten orders the inputs c * hw + i
        expected = x.reshape(4, -1) @ weight.t()
        got = blocks.product(i, rows.to(dtype))
        assert got.dtype == dtype
        tolerance = 1e-5 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("seed", [*range(20, 23), *FRESH])
def test_searches_choose_the_reference_edits_with_and_without_packing(monkeypatch, pack, seed):
    if not pack:
        monkeypatch.setattr(packed, "_PACK", None)
    model, aux = wide_model(seed), tiny_aux(seed)  # fresh modules: nothing packed is cached for them
    assert_reference_edits(model, aux, seed)
