"""Cheap upper bounds on a candidate's score through an MLP tail, for the cell search's branch and bound.

The tail is ``ReLU -> Linear(W2) -> ReLU -> Linear(W3)`` (VGG's head after its first layer, eval Dropouts
removed); its input is the first layer's pre-activation h1 of a candidate. For the current feature map
(h1_0, a1 = ReLU(h1_0), h2_0 = W2 a1_0 + b2, z_0 = W3 ReLU(h2_0) + b3) and a candidate with
delta = ReLU(h1) - a1_0 and Delta = W2 delta, exactly (real arithmetic):

1. S(z) = z_t - logsumexp(z) is concave, so S(z) <= S(z_0) + v . (z - z_0) with v = e_t - softmax(z_0);
2. v . (z - z_0) = w . (ReLU(h2_0 + Delta) - ReLU(h2_0)) with w = W3^T v;
3. per unit k, ReLU(h + Delta_k) - ReLU(h) = m_k Delta_k + s_k with m_k = [h2_0,k > 0] and a switch term
   s_k >= 0 that is nonzero only if Delta_k crosses -h2_0,k: s_k = max(0, -Delta_k - |h|) for an active unit,
   max(0, Delta_k - |h|) for an inactive one;
4. so S(z) <= S(z_0) + g . delta + sum_{w_k > 0} w_k s_k with g = W2^T (m * w) (the linear part, one dot
   product of length 4096 per candidate), and units with w_k <= 0 dropped (their terms are <= 0);
5. s_k only needs an interval for Delta_k on the units with w_k > 0. Where this CPU has fast int8 products
   (``int8_products_fast``: AVX512-VNNI or AMX, whose ``torch._int_mm`` is several times float32's speed), an
   int8 product Delta^_k = sW_k s_c (Wq_k . deltaq_c) (exact int32 accumulation, per-row and per-candidate
   scales) with |Delta_k - Delta^_k| <= ||W2_k - sW_k Wq_k|| ||delta_c|| + ||sW_k Wq_k|| ||delta_c - s_c
   deltaq_c|| (Cauchy-Schwarz), i.e. about a quarter of the exact product's cost on half its rows. Elsewhere
   (e.g. AVX2 only, where ``torch._int_mm`` is a slow generic loop, 20x float32's time) a float32 product on
   those rows, with the rounding bound |fl(W2_k . delta) - W2_k . delta| <= gamma_n ||W2_k|| ||delta||,
   gamma_n = n u / (1 - n u) for any order of summation (Higham, Accuracy and Stability, Eq. 3.5), doubled:
   half the exact product's cost, and a tighter interval. Either way, the inputs where no candidate of a
   chunk has a nonzero delta (first-layer units inactive at the anchor and in every candidate: about 40% on
   VGG-16 heads) add exactly 0 and are left out of that product; the part of W2 (or of Wq) a step's product
   uses is kept for the next steps, which gather only the inputs new to them (``_Gathered``). Memory: W2
   transposed and a buffer of its size are kept with the layer (about 130 MB for VGG-16's 4096 x 4096
   layer in float32; Wq transposed and its buffer, 32 MB, in int8).

The bound is within a few hundredths of the exact score on VGG-16 heads (the switch terms are few), so most
candidates fall below the best exact score and never run the 4096 x 4096 layer in float32. It holds in real
arithmetic; the caller adds a slack for float32 rounding (``cell_search``'s margin).
"""

from __future__ import annotations

import functools
import math
import time
import weakref

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from explain.methods.packed import packed_linear

_INT_MM = getattr(torch, "_int_mm", None)
_UNIT_ROUNDOFF = 2.0**-24  # float32


@functools.cache
def int8_products_fast() -> bool:
    """Whether this CPU's exact int8 products run at under half float32's time (measured once per process on
    a (128, 1024) x (1024, 256) product, one thread, the best of five): then the bounds use them, else
    float32. One thread: the kernels' speed decides, not how fast a second thread wakes up (on a loaded
    machine, or with OMP_WAIT_POLICY=passive, that dominates a product this small)."""
    if _INT_MM is None:
        return False
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (128, 1024), dtype=torch.int8, generator=generator)
    b = torch.randint(-127, 128, (256, 1024), dtype=torch.int8, generator=generator).t()
    af, bf = a.float(), b.float()
    try:
        _INT_MM(a, b)
    except RuntimeError:
        return False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {"int8": [], "float32": []}
        for _ in range(5):
            for name, product in (("int8", lambda: _INT_MM(a, b)), ("float32", lambda: af @ bf)):
                start = time.perf_counter()
                product()
                times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return min(times["int8"]) < 0.5 * min(times["float32"])


def mlp_tail(rest: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """(L2, L3) when ``rest`` is ``nn.Sequential(ReLU, [Dropout], Linear, ReLU, [Dropout], Linear)`` with
    its Dropouts in eval mode, else None."""
    if not isinstance(rest, nn.Sequential):
        return None
    kept = [
        m for m in rest if not (isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and not m.training))
    ]
    if [type(m) for m in kept] != [nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]:
        return None
    return kept[1], kept[3]


class TailBound:
    """Upper bounds on log softmax(tail(h1))[target] for many first-layer pre-activations h1 (module
    docstring). ``begin`` once per step, then ``upper`` per chunk of candidates. CPU, float32."""

    _quantized: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    # W2 (or Wq) transposed, and a buffer of its size for the products' submatrix (``_Gathered``), kept while
    # the layer lives (a fresh 30 MB buffer page-faults at every step)
    _transposed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, l2: nn.Linear, l3: nn.Linear, int8: bool | None = None):
        """``int8``: the switch terms' intervals from int8 products (True) or float32 ones (False); None:
        int8 where this CPU runs them fast (``int8_products_fast``)."""
        self.l2, self.l3 = l2, l3
        self.int8 = int8_products_fast() if int8 is None else int8
        weight = l2.weight.detach()
        key = (weight._version, weight.device)
        quantized = _kept(self._quantized, l2, key, lambda: self._quantize(weight))
        self.q_transposed, self.row_scale, self.row_error, self.row_norm, self.exact_norm = quantized
        self.w2, self.w3 = packed_linear(l2), packed_linear(l3)  # the products of ``forward``
        self.gathered, self._token = None, object()

    @staticmethod
    def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-row int8 weights Wq, transposed: (in, out); their scales s_k, and (rounded up)
        ||W_k - s_k Wq_k||, ||s_k Wq_k|| and ||W_k||."""
        exact = weight.double()
        scale = exact.abs().amax(dim=1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(exact / scale[:, None]).clamp(-127, 127)
        error = (exact - q * scale[:, None]).norm(dim=1)
        norm = (q * scale[:, None]).norm(dim=1)
        up = 1 + 1e-6
        exact_norm = exact.norm(dim=1) * up
        transposed = q.t().contiguous().to(torch.int8)
        return transposed, scale.float(), (error * up).float(), (norm * up).float(), exact_norm.float()

    def forward(self, h1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tail on (B, out1) pre-activations, as the head computes it: (ReLU(h1), h2, logits)."""
        with torch.no_grad():
            a1 = F.relu(h1)
            h2 = self.w2(a1, self.l2.bias)
            return a1, h2, self.w3(F.relu(h2), self.l3.bias)

    def anchor(self, hidden: torch.Tensor, point: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """Make ``hidden`` (out1,) the next step's anchor and return its logits; ``point`` is its
        (a1, h2, logits) when already computed (the chosen candidate's, from the step that chose it)."""
        if point is None:
            point = tuple(t[0] for t in self.forward(hidden[None]))
        self._anchor = (hidden, *point)
        return point[2]

    def begin(self, hidden: torch.Tensor, target: int) -> None:
        """The step's anchor: the current map's first-layer pre-activation ``hidden`` (out1,)."""
        w2, w3 = self.l2.weight.detach(), self.l3.weight.detach()
        if getattr(self, "_anchor", (None,))[0] is not hidden:
            self.anchor(hidden)
        _, self.a1, h2, z = self._anchor
        self.base = float(torch.log_softmax(z, dim=-1)[target])
        v = -torch.softmax(z, dim=-1)
        v[target] += 1
        w = w3.t() @ v  # (out2,): the tangent's weight on each unit of the second layer
        active = h2 > 0
        self.g = w2.t() @ torch.where(active, w, torch.zeros_like(w))
        units = (w > 0).nonzero().squeeze(1)
        self.units = len(units)
        # W2's rows of ``columns`` (a superset of these units kept from step to step, ``_Gathered``), in int8
        # or float32, unsigned: the sign multiplies the products (exact), and the units of ``columns`` that
        # are not among these get weight 0 (their terms are dropped, as above).
        if self.gathered is None or self.gathered.owner[0] is not self._token:
            key = (w2._version, w2.device, self.int8)
            source = _kept(self._transposed, self.l2, key, self._gather_source)
            self.gathered = _Gathered(*source)
            self.gathered.owner[0] = self._token
        columns = self.gathered.select(units, w)
        self.signs = torch.where(active[columns], -1.0, 1.0)[None]
        positive = torch.where(w[columns] > 0, w[columns], torch.zeros_like(w[columns]))
        if self.int8:
            # The switch term of unit k is max(0, sign_k Delta_k - |h2_0,k|), sign -1 if active, +1 if
            # not. With Delta^_k = scale_k step_c (Wq_k . deltaq_c) and the error bound err_ck, it is at
            # most scale_k max(0, step_c sign_k products_ck + (err_ck - |h2_0,k|) / scale_k): scale_k goes
            # into the weights of the sum.
            scale = self.row_scale[columns]
            self.w = positive * scale
            self.offset = -h2[columns].abs()[None] / scale  # (1, columns)
            self.errors = torch.stack([self.row_error[columns], self.row_norm[columns]]) / scale
            return
        self.w = positive
        self.offset = -h2[columns].abs()[None]  # (1, columns)
        gamma = w2.shape[1] * _UNIT_ROUNDOFF / (1 - w2.shape[1] * _UNIT_ROUNDOFF)
        self.errors = (2 * gamma * self.exact_norm[columns])[None]  # (1, columns): per unit of ||delta||

    def _gather_source(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """For ``_Gathered``: W2 transposed (in, out), in float32 or its int8 copy Wq, a buffer of its size, a
        spare buffer for the gathers, and the buffers' owner."""
        source = self.q_transposed if self.int8 else self.l2.weight.detach().t().contiguous()
        spare = torch.empty(_Gathered.block * source.shape[1], dtype=source.dtype)
        return source, torch.empty(source.numel(), dtype=source.dtype), spare, [None]

    def upper(self, h1: torch.Tensor) -> torch.Tensor:
        """(B,) upper bounds on the target's log-probability for first-layer pre-activations ``h1`` (B, out1);
        ``h1`` is overwritten."""
        if self.units == 0:
            return torch.mv(h1.relu_().sub_(self.a1), self.g).add_(self.base)
        bound, size, delta, weights = self._deltas(h1)
        if not self.int8:  # sign_k Delta^_k - |h2_0,k| + the rounding bound of the float32 product
            sizes = (size * (1 + 1e-4))[:, None]  # rounded up: a float32 norm
            products = torch.mm(delta, weights)
            switch = products.mul_(self.signs).add_(self.offset).addmm_(sizes, self.errors)
            return bound.add_(torch.mv(switch.relu_(), self.w))
        step = _quantization_step(delta)
        quantized = torch.div(delta, step).round_().clamp_(-127, 127)
        residual = torch.linalg.vector_norm(torch.addcmul(delta, quantized, step, value=-1), dim=1)
        products = _int8_products(quantized.to(torch.int8), weights).float().mul_(self.signs)  # exact
        sizes = torch.stack([size, residual], dim=1) * (1 + 1e-4)  # rounded up: float32 norms
        switch = torch.addmm(self.offset, sizes, self.errors).addcmul_(products, step)
        return bound.add_(torch.mv(switch.relu_(), self.w))

    def _deltas(
        self, h1: torch.Tensor, shrink: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For ``upper`` and ``refine`` (``h1`` overwritten): the bound's linear part (B,), ||delta|| (B,),
        delta on the gathered rows and those rows of the switch terms' weights (``_Gathered.rows``)."""
        h1 = h1.relu_()
        # the inputs where some candidate's delta may be nonzero: active at the anchor or in some candidate
        # (a column maximum: one pass, where testing delta != 0 takes several)
        used = (self.a1 > 0).logical_or_(h1.amax(dim=0) > 0).nonzero().squeeze(1)
        delta = h1.sub_(self.a1)
        bound = torch.mv(delta, self.g).add_(self.base)
        size = torch.linalg.vector_norm(delta, dim=1)
        # only those enter the product (the others add exactly 0): about 40% are left out on VGG-16 heads
        rows, weights = self.gathered.rows(used, shrink=shrink)
        return bound, size, delta.index_select(1, rows), weights

    def refine(self, h1: torch.Tensor) -> torch.Tensor:
        """Tighter upper bounds than ``upper`` for a few candidates, with int8 intervals (float32 ones are
        tight already: ``upper``). Each candidate's delta is quantized twice, delta = s_c q_c + s'_c q'_c +
        r_c (q' the int8 rounding of the first residual, s' its step), so Delta^_k = sW_k (s_c Wq_k . q_c +
        s'_c Wq_k . q'_c) and the delta term of the error bound becomes ||sW_k Wq_k|| ||r_c||, about 127
        times smaller; the weights' term ||W2_k - sW_k Wq_k|| ||delta_c|| stays. On VGG-16 heads the bound's
        excess over the score about halves, for a second int8 product on these rows only. The residuals are
        computed in float64, where delta - s q is exact. ``h1`` (B, out1) is overwritten."""
        if not self.int8 or self.units == 0:
            return self.upper(h1)
        bound, size, delta, weights = self._deltas(h1, shrink=False)
        step = _quantization_step(delta)
        quantized = torch.div(delta, step).round_().clamp_(-127, 127)
        rest = delta.double() - quantized.double() * step.double()  # exact: |rest| <= step / 2
        step2 = (rest.abs().amax(dim=1, keepdim=True) / 127).float()  # a float32 step, used as such below
        step2 = torch.where(step2 > 0, step2, torch.ones_like(step2))
        quantized2 = torch.div(rest, step2.double()).round_().clamp_(-127, 127)
        residual = torch.linalg.vector_norm(rest - quantized2 * step2.double(), dim=1).float()
        both = torch.cat([quantized, quantized2.float()]).to(torch.int8)
        products = _int8_products(both, weights).float().mul_(self.signs)  # exact
        count = len(delta)
        sizes = torch.stack([size, residual], dim=1) * (1 + 1e-4)  # rounded up: float32 norms
        switch = torch.addmm(self.offset, sizes, self.errors)
        switch.addcmul_(products[:count], step).addcmul_(products[count:], step2)
        return bound.add_(torch.mv(switch.relu_(), self.w))


def _quantization_step(delta: torch.Tensor) -> torch.Tensor:
    """(B, 1): each candidate's int8 quantization step, its largest |delta| / 127 (1 where delta is 0). The
    inputs left out of a gathered delta are exactly 0 there, so the step is that of the whole delta."""
    step = torch.maximum(delta.amax(dim=1), delta.amin(dim=1).neg_()) / 127
    return torch.where(step > 0, step, torch.ones_like(step))[:, None]


class _Gathered:
    """``source[rows][:, columns]`` of a fixed (in, out) matrix (W2 or Wq transposed), kept from step to step
    of a search: the second layer's units with w_k > 0 barely change from step to step (0 to 2 of about 2,000
    on VGG-16 heads) nor do the inputs where some candidate's delta is not 0 (about 60 of 2,400 come and go),
    so a step gathers only the new inputs instead of copying half of W2 twice. ``columns`` is a superset of
    the step's units (the others get weight 0) and ``rows`` of the step's inputs (delta is 0 on the others);
    either is gathered again from scratch when it would hold more than ``waste`` of them in excess. The buffer
    is shared by the bounds of one layer: ``owner`` says whose submatrix it holds."""

    waste = 0.1
    block = 256  # rows gathered at once (through the spare buffer)

    def __init__(self, source: torch.Tensor, buffer: torch.Tensor, spare: torch.Tensor, owner: list):
        self.source, self.buffer, self.spare, self.owner = source, buffer, spare, owner
        self.columns = None

    def select(self, units: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """The columns for a step whose units are ``units`` (increasing): the kept ones if they hold them all
        with little excess, else (and no rows yet) ``units`` and, given the weights ``w`` (units: w > 0), the
        next units by weight, half the excess allowed: a unit whose w comes close to 0 often turns positive at
        a later step."""
        if self.columns is not None and len(self.columns) <= (1 + self.waste) * len(units):
            kept = torch.zeros(self.source.shape[1], dtype=torch.bool, device=units.device)
            kept[self.columns] = True
            if bool(kept[units].all()):
                return self.columns
        if w is not None and len(units):
            count = min(len(w), int((1 + self.waste / 2) * len(units)))
            near = torch.topk(torch.nan_to_num(w, nan=-math.inf), count).indices
            units = torch.cat([units, near]).unique()  # increasing
        self.columns = units
        self.row_list = units.new_empty(0)
        self.kept_rows = torch.zeros(self.source.shape[0], dtype=torch.bool, device=units.device)
        return self.columns

    def rows(self, used: torch.Tensor, shrink: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, source[rows][:, columns]) with ``rows`` holding every input of ``used``; ``shrink``: False
        keeps the rows however many are in excess (a few candidates' product, between the whole chunks')."""
        width = len(self.columns)
        new = used[~self.kept_rows[used]]
        if shrink and len(self.row_list) + len(new) > (1 + self.waste) * len(used):
            self.row_list, new = used.new_empty(0), used  # too many rows left from earlier steps: afresh
            self.kept_rows.zero_()
        out = self.source.shape[1]
        # source's rows, then their columns, into the buffer; numpy's take gathers columns several times
        # faster than torch's index_select (4x for int8), clip: the indices are valid, and out is not buffered
        source, columns = self.source.numpy(), self.columns.numpy()
        for first in range(0, len(new), self.block):
            some = new[first : first + self.block].numpy()
            begin = (len(self.row_list) + first) * width
            whole = np.take(
                source, some, axis=0, out=self.spare[: len(some) * out].view(-1, out).numpy(), mode="clip"
            )
            np.take(
                whole,
                columns,
                axis=1,
                out=self.buffer[begin : begin + len(some) * width].view(-1, width).numpy(),
                mode="clip",
            )
        if len(new):
            self.row_list = torch.cat([self.row_list, new])
            self.kept_rows[new] = True
        return self.row_list, self.buffer[: len(self.row_list) * width].view(len(self.row_list), width)


def _kept(cache: weakref.WeakKeyDictionary, layer: nn.Module, key: tuple, build):
    """``build()``'s result, kept in ``cache`` while ``layer`` lives and built again when ``key`` changes."""
    cached = cache.get(layer)
    if cached is None or cached[0] != key:
        cached = cache[layer] = (key, build())
    return cached[1]


def _int8_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B, K) int8 @ b (K, N) int8 with exact int32 accumulation (K * 127^2 < 2^31 for K < 133,000)."""
    if _INT_MM is not None and a.device.type == "cpu":
        try:
            return _INT_MM(a, b)
        except RuntimeError:  # a build without the CPU kernel: the exact products in float64 instead
            pass
    return (a.double() @ b.double()).round().to(torch.int32)
