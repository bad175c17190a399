"""Products with a fixed weight and a few rows (1 to about 50) at memory speed on the CPU.

MKL's float32 matrix product runs far below the memory's speed when the batch is a few rows and the weight
is large (VGG's 4096 x 4096 layer: 8 rows take 3x the time of 1, as long as 32 rows in oneDNN). torch's
compiled linear layers avoid that with oneDNN's packed weights (``mkldnn::_reorder_linear_weight`` once,
``mkldnn::_linear_pointwise`` per call); the cell search uses the same two ops for the weights it multiplies
by a few rows at every step. Where torch lacks them, or off the CPU, or in another dtype than float32, the
product is ``F.linear`` on the plain weight. Either way it rounds like any float32 matrix product (it differs
from ``F.linear`` in the last bits); the search only shortlists with such products.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn import functional as F

_ONEDNN = torch.backends.mkldnn.is_available()
_PACK = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _ONEDNN else None
_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if _ONEDNN else None


class PackedLinear:
    """``x @ weight.T + bias`` for x of a few rows; ``weight`` (out, in) is packed once here."""

    def __init__(self, weight: torch.Tensor, batch_hint: int = 8):
        """``batch_hint``: the rows per product the packed layout is tuned for (any count works). The packed
        copy replaces the weight: no reference to ``weight`` is kept where it was packed."""
        weight = weight.detach()
        self.weight, self.packed = weight, None
        if _PACK is not None and _LINEAR is not None and weight.dtype == torch.float32:
            if weight.device.type == "cpu":
                try:
                    self.weight, self.packed = None, _PACK(weight.contiguous(), batch_hint)
                except RuntimeError:  # a build whose oneDNN lacks the CPU kernel: the plain product
                    self.weight, self.packed = weight, None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """(B, out) for ``x`` (B, in), float32 where packed."""
        bias = bias.detach() if bias is not None else None
        if self.packed is None:
            return F.linear(x, self.weight, bias)
        return _LINEAR(x.contiguous(), self.packed, bias, "none", [], "")


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packed_linear(layer: nn.Linear, batch_hint: int = 8) -> PackedLinear:
    """``PackedLinear`` of ``layer``'s weight, packed once and kept while the layer lives (again if its weight
    changes)."""
    weight = layer.weight
    key = (weight._version, weight.data_ptr(), weight.device, weight.dtype, batch_hint)
    cached = _CACHE.get(layer)
    if cached is None or cached[0] != key:
        cached = (key, PackedLinear(weight, batch_hint))
        _CACHE[layer] = cached
    return cached[1]
