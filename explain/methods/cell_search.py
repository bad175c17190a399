"""The greedy cell-replacement search shared by CVE and the semantic method: exact, and fast where g allows.

Each step scores every allowed candidate (query cell i, distractor cell J) by

    score(i, J) = log softmax(g(f(I) with cell i replaced by cell J))[target] + extra(i, J)

(Eq. 2; Eq. 4 where ``extra`` is the semantic term) and applies the best one. Candidates are never reused
(Eq. 1 replaces cells through a permutation P and a gating vector a; the authors' released search removes
every pair that shares a cell with an applied edit): each query cell is replaced at most once and each
distractor cell taken at most once, so the search ends at min(hw, m) edits at most.

Tie rule (CVE and the semantic method share it, and their reference tests are written with it): among
candidates with exactly equal float32 scores the lowest index ``k = i * m + J`` wins, where m is the number of
distractor cells (distractor n's cell j is J = n * hw + j): the lowest query cell, then the lowest distractor
cell. (The authors' code takes ``torch.argmax``'s pick, which is not specified on ties.)

Fast: a ``HeadScorer`` computes g's logits for a chunk of candidates exploiting g's structure,

- ``Flatten -> Linear -> rest`` (VGG's MLP head): replacing cell i changes the first linear layer's output by
  W1[:, :, i] (f'_J - f_i), a rank-d update, instead of a full product with the hw * d input;
- ``AdaptiveAvgPool2d(1) -> Flatten -> [Dropout] -> Linear -> rest``: the pooled vector changes by
  (f'_J - f_i) / hw, so all candidates of a step are one broadcast sum of two precomputed products;
- ``Bottleneck x R -> AdaptiveAvgPool2d(1) -> Flatten -> rest`` (ResNet-50's head): a changed cell reaches
  only the (2R + 1)^2 cells around it, recomputed for a whole chunk of candidates at once
  (``BottleneckScorer``);
- anything else: g itself on a chunk of edited feature maps.

Branch and bound (VGG's head, CPU, float32): before scoring, every candidate's score is bounded from above
(``explain.methods.cell_bounds``: the tangent of the concave log-softmax, the exact linear part of the second
layer and int8 intervals for the units that may switch); candidates are scored in the order of their bounds
and only while a bound can still reach the shortlist (within twice the margin of the best score found). On
the benchmarks' random VGG-16 heads about 1% of the candidates are scored, so the 4096 x 4096 layer runs on
few; the bounds cost about a sixth of that layer on half its rows and 60% of its inputs (int8). The few
candidates about to be scored get a tighter bound first (int8 intervals: their deltas quantized twice, half
the excess over the score), and are scored only if it still reaches: with ten distractors a third as many
are scored. The bounds exceed the scores by much the same amount from step to step, so after the first step
the first round scores every candidate within 1.25 times the largest excess seen so far of the highest
bound: the tail usually runs once per step.

On the CPU in float32 the products with a few rows and a fixed weight (the first layer's per-cell blocks,
the tail's layers) use oneDNN's packed weights (``explain.methods.packed``): a search with one distractor is
then mostly memory traffic, one pass over the first layer and two over the 4096 x 4096 layer per step.

Exact: rounding makes these logits differ from g's in the last bits, so the fast scores only shortlist. Every
candidate within ``margin`` of the best fast score is scored again the plain way, g on one edited feature map,
and the winner is chosen among those exact scores with the reference's tie rule. The margin is far above the
fast path's rounding error (fp32), or above reduced precision's error (``precision="bfloat16"``/"float16"),
so the chosen edits are the plain loop's. When the shortlist is a single candidate in float32 (the usual
case) it is the plain loop's choice already: its fast score is kept (equal to the plain loop's to float32
rounding) and g runs only if its fast logits leave the flip undecided (within the margin).

A leading ``AdaptiveAvgPool2d`` to the grid's own size (VGG's, at 224 px) copies its input and is skipped.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import Bottleneck

from explain.methods.base import Counterfactual, Edit, cells_to_mask
from explain.methods.cell_bounds import TailBound, mlp_tail
from explain.methods.packed import PackedLinear

_BOTTLENECK_FORWARD = Bottleneck.forward
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# margin = ATOL + RTOL * (largest |logit| of the best candidate), per precision of the fast scores.
_MARGINS = {"float32": (1e-3, 1e-5), "bfloat16": (5e-2, 3e-2), "float16": (2e-2, 5e-3)}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, not {precision!r}")


@dataclass
class SearchResult:
    edits: list[Edit]
    scores: list[float]
    flipped: bool
    rescored: int  # candidates scored again exactly, over all steps (diagnostics)
    candidates: int = 0  # candidates considered, over all steps (diagnostics)
    evaluated: int = 0  # of those, scored by the fast scorer (the rest were bounded out; diagnostics)


class HeadScorer:
    """g's logits for single-cell replacements of a current (d, hw) feature matrix."""

    kind = "generic"
    chunk_bytes = 256 * 2**20  # the edited feature maps of one chunk stay under this

    def __init__(self, g: nn.Module, dtype: torch.dtype):
        self.g = g
        self.dtype = dtype

    def max_chunk(self, d: int, hw: int) -> int:
        """The most candidates per chunk: g's input for them stays under ``chunk_bytes``."""
        return max(1, self.chunk_bytes // (d * hw * torch.finfo(self.dtype).bits // 8))

    def start(self, current: torch.Tensor, distractor_cells: torch.Tensor, grid: tuple[int, int]) -> None:
        """Begin a search: ``current`` (d, hw) query features, ``distractor_cells`` (m, d)."""
        self.current = current
        self.distractor_cells = distractor_cells
        self.grid = grid

    def prepare(self, candidates: torch.Tensor) -> None:
        """The search will only ever score (a subset of) these candidates, k = i * m + J."""

    def update(self, i: int, j: int) -> None:
        """Cell i of the current features now holds distractor cell j (``current`` is already updated)."""

    def current_logits(self) -> torch.Tensor | None:
        """g's logits for the current map by the fast path, or None (the search then runs g itself)."""
        return None

    def begin_bounds(self, target: int) -> bool:
        """Prepare ``upper_bounds`` for this step (the current map and ``target``); False: none here."""
        return False

    def upper_bounds(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """(B,) upper bounds, in real arithmetic, on log softmax(g(candidate))[target] (``begin_bounds``)."""
        raise NotImplementedError

    def logits(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits of g for the B candidates (i[b], j[b])."""
        d, _ = self.current.shape
        batch = self.current.to(self.dtype).unsqueeze(0).repeat(len(i), 1, 1)  # (B, d, hw)
        batch[torch.arange(len(i), device=i.device), :, i] = self.distractor_cells.to(self.dtype)[j]
        with torch.autocast(self.current.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.g(batch.reshape(len(i), d, *self.grid)).float()


class CellBlocks:
    """The first layer's weight split by input cell: ``product(i, rows)`` is rows (M, d) times block i's
    transpose, W1[:, :, i] (out, d), for the rank-d updates of ``LinearFirstScorer``. In float32 each block
    is a ``PackedLinear`` (a pass over all blocks with a few rows each then costs little more than reading
    them); otherwise the blocks are one (hw, d, out) tensor in the search's dtype."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, d: int, hw: int):
        self.out = weight.shape[0]
        self.element_size = torch.finfo(dtype).bits // 8
        per_cell = weight.reshape(self.out, d, hw).permute(2, 0, 1)  # (hw, out, d); Flatten: input c * hw + i
        if dtype == torch.float32:
            self.cells = [PackedLinear(per_cell[i].to(dtype).contiguous()) for i in range(hw)]
            self.blocks = None
        else:
            self.cells, self.blocks = None, per_cell.transpose(1, 2).contiguous().to(dtype)

    def product(self, i: int, rows: torch.Tensor) -> torch.Tensor:
        """(M, out): ``rows`` (M, d) times W1[:, :, i] transposed (cell i's block of the first layer)."""
        return self.cells[i](rows) if self.cells is not None else rows @ self.blocks[i]


class LinearFirstScorer(HeadScorer):
    """``Flatten -> Linear -> rest``: a rank-d update of the first layer's output per candidate.

    ``prepare`` makes one pass over the first layer's per-cell weight blocks per search: W1[:, :, i] f_i
    (the query's terms, whose sum is the first layer's output) and W1[:, :, i] f'_J for every allowed pair
    (the distractor side never changes) when they fit in ``cache_bytes``; each step then only gathers them.
    The blocks are built once per weight tensor and kept while the layer lives. When ``rest`` is VGG's
    ``ReLU -> Linear -> ReLU -> Linear`` (eval Dropouts aside), on the CPU in float32, ``upper_bounds``
    bounds each candidate's score from above (``explain.methods.cell_bounds``) for the branch and bound.
    """

    kind = "flatten-linear"
    cache_bytes = 512 * 2**20
    _blocks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, linear: nn.Linear, rest: nn.Module, dtype: torch.dtype, d: int, hw: int):
        super().__init__(nn.Identity(), dtype)
        self.linear, self.rest = linear, rest
        weight = linear.weight.detach()
        key = (weight._version, dtype, weight.device, d, hw)
        cached = self._blocks.get(linear)
        if cached is None or cached[0] != key:
            cached = (key, CellBlocks(weight, dtype, d, hw))
            self._blocks[linear] = cached
        self.blocks = cached[1]
        tail = mlp_tail(rest)
        bounded = tail is not None and dtype == torch.float32 and weight.device.type == "cpu"
        self.tail = TailBound(*tail) if bounded else None

    def max_chunk(self, d: int, hw: int) -> int:
        return max(1, self.chunk_bytes // (self.blocks.out * self.blocks.element_size))

    def start(self, current: torch.Tensor, distractor_cells: torch.Tensor, grid: tuple[int, int]) -> None:
        super().start(current, distractor_cells, grid)
        self.cells = distractor_cells.to(self.dtype)
        self.slots = None
        self.scored = []  # (pairs, a1, h2, logits) of the scored candidates of a step, while few

    def prepare(self, candidates: torch.Tensor) -> None:
        """The query's terms and the first layer's output, and the pairs ``candidates`` (k = i * m + J,
        increasing) projected if they fit the cache: one GEMM per cell, one pass over the blocks."""
        hw, m, out = self.current.shape[1], self.cells.shape[0], self.blocks.out
        query_cells = self.current.t().to(self.dtype)  # (hw, d)
        cache = len(candidates) * out * self.blocks.element_size <= self.cache_bytes
        if cache:
            self.slots = torch.full((hw * m,), -1, dtype=torch.long, device=candidates.device)
            self.slots[candidates] = torch.arange(len(candidates), device=candidates.device)
            self.projected = torch.empty(len(candidates), out, dtype=self.dtype, device=candidates.device)
            counts = torch.bincount(candidates // m, minlength=hw).tolist()
        self.query_terms = torch.empty(hw, out, dtype=self.dtype, device=self.current.device)
        begin = 0
        for i in range(hw):
            count = counts[i] if cache else 0
            rows = query_cells[i : i + 1]
            if count:
                rows = torch.cat([rows, self.cells[candidates[begin : begin + count] % m]])
            terms = self.blocks.product(i, rows)  # W1_i f_i, then W1_i f'_J for the pairs of cell i
            self.query_terms[i] = terms[0]
            if count:
                self.projected[begin : begin + count] = terms[1:]
            begin += count
        bias = self.linear.bias.detach().to(self.dtype) if self.linear.bias is not None else 0
        self.hidden = self.query_terms.sum(dim=0) + bias  # W1 x + b
        self.base = None

    def update(self, i: int, j: int) -> None:
        new = self.blocks.product(i, self.cells[j : j + 1])[0]
        self.hidden = self.hidden + new - self.query_terms[i]  # the applied edit's rank-d update
        self.query_terms[i] = new
        self.base = None
        if self.tail is not None:  # the chosen candidate's tail activations anchor the next step's bounds
            pair = i * self.cells.shape[0] + j
            for pairs, *rows in self.scored:
                found = (pairs == pair).nonzero()
                if len(found):
                    self.tail.anchor(self.hidden, tuple(r[int(found[0, 0])] for r in rows))
                    break
        self.scored = []

    def _project(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """W1[:, :, i] f'_J for each pair, grouped by query cell (i is non-decreasing)."""
        projected = torch.empty(len(i), self.blocks.out, dtype=self.dtype, device=i.device)
        cells, counts = torch.unique_consecutive(i, return_counts=True)
        begin = 0
        for cell, count in zip(cells.tolist(), counts.tolist(), strict=True):
            projected[begin : begin + count] = self.blocks.product(cell, self.cells[j[begin : begin + count]])
            begin += count
        return projected

    def _hidden(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """The first layer's output for each candidate: W1 x + W1_i (f'_J - f_i), a new tensor."""
        if self.base is None:
            self.base = self.hidden - self.query_terms  # (hw, out): W1 x - W1_i f_i
        if self.slots is not None:
            hidden = self.projected.index_select(0, self.slots[i * self.cells.shape[0] + j])
        else:
            hidden = self._project(i, j)
        return hidden.add_(self.base.index_select(0, i))

    def current_logits(self) -> torch.Tensor:
        if self.tail is not None:
            return self.tail.anchor(self.hidden)
        with torch.autocast(self.current.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.rest(self.hidden.clone()[None])[0].float()

    def logits(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden(i, j)
        if self.tail is not None:  # the same products as ``rest``, keeping the activations of few rows
            a1, h2, logits = self.tail.forward(hidden)
            if sum(len(pairs) for pairs, *_ in self.scored) + len(i) <= 256:
                self.scored.append((i * self.cells.shape[0] + j, a1, h2, logits))
            return logits
        with torch.autocast(self.current.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.rest(hidden).float()

    def begin_bounds(self, target: int) -> bool:
        if self.tail is None:
            return False
        self.tail.begin(self.hidden, target)
        self.scored = []
        return True

    def upper_bounds(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.tail.upper(self._hidden(i, j))

    @property
    def refines(self) -> bool:
        """Whether ``refine_bounds`` is tighter than ``upper_bounds`` (int8 intervals)."""
        return self.tail is not None and self.tail.int8

    def refine_bounds(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Tighter upper bounds than ``upper_bounds``, at a higher cost per candidate."""
        return self.tail.refine(self._hidden(i, j))


class PoolLinearScorer(HeadScorer):
    """``AdaptiveAvgPool2d(1) -> Flatten -> Linear -> rest``: one broadcast sum per chunk of candidates."""

    kind = "pool-linear"

    def __init__(self, linear: nn.Linear, rest: nn.Module, dtype: torch.dtype):
        super().__init__(nn.Identity(), dtype)
        self.linear, self.rest = linear, rest

    def max_chunk(self, d: int, hw: int) -> int:
        return max(1, self.chunk_bytes // (self.linear.out_features * 4))

    def start(self, current: torch.Tensor, distractor_cells: torch.Tensor, grid: tuple[int, int]) -> None:
        super().start(current, distractor_cells, grid)
        hw = current.shape[1]
        self.distractor_terms = (distractor_cells @ self.linear.weight.detach().t()) / hw  # (m, out)
        self._refresh()

    def update(self, i: int, j: int) -> None:
        self._refresh()

    def current_logits(self) -> torch.Tensor:
        with torch.autocast(self.current.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.rest(self.hidden.to(self.dtype)[None])[0].float()

    def _refresh(self) -> None:
        hw = self.current.shape[1]
        self.hidden = F.linear(self.current.mean(dim=1), self.linear.weight, self.linear.bias)
        self.query_terms = (self.current.t() @ self.linear.weight.detach().t()) / hw  # (hw, out)

    def logits(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden + self.distractor_terms[j] - self.query_terms[i]
        with torch.autocast(self.current.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.rest(hidden.to(self.dtype)).float()


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """conv then BatchNorm (eval) as one convolution's weight and bias."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight.detach() * scale[:, None, None, None]
    bias = bn.bias.detach() - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias.detach() * scale
    return weight, bias


class BottleneckScorer(HeadScorer):
    """``Bottleneck x R -> AdaptiveAvgPool2d(1) -> Flatten -> rest`` (ResNet-50's head after conv5_1): only
    the cells a change reaches are recomputed, for all candidates of a chunk at once (in ``dtype``; the
    unedited map's activations and the pooled sum in float32).

    In a bottleneck block (1 x 1, 3 x 3, 1 x 1 convolutions, BatchNorm folded in, identity shortcut) a change
    at the cells within radius r of cell i changes the block's output within radius r + 1; after R blocks,
    the (2R + 1)^2 cells around i (ResNet-50: 5 x 5 of the 7 x 7 grid). Per candidate the 1 x 1 convolutions
    run on those cells alone and the 3 x 3 one on the change of its input (its weights times the difference,
    summed into the shifted cells); the pooled vector changes by the sum of the output's changes / hw. The
    unedited feature map's activations are computed once per step.
    """

    kind = "bottleneck-local"

    def __init__(self, blocks: list[nn.Module], rest: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__(nn.Identity(), dtype)
        self.blocks = []
        for block in blocks:
            w1, b1 = _folded(block.conv1, block.bn1)
            w2, b2 = _folded(block.conv2, block.bn2)
            w3, b3 = _folded(block.conv3, block.bn3)
            mid = w2.shape[0]
            # the 3 x 3 kernel as one (in, 9 * out) matrix, offset-major: (dy, dx) in row order
            kernel = w2.permute(1, 2, 3, 0).reshape(w2.shape[1], 9 * mid)
            self.blocks.append((w1[:, :, 0, 0].t(), b1, w2, kernel, b2, w3[:, :, 0, 0].t(), b3))
        self.fast = [tuple(t.to(dtype) for t in block) for block in self.blocks]
        self.rest = rest

    def max_chunk(self, d: int, hw: int) -> int:
        cells = (2 * len(self.blocks) + 1) ** 2
        return max(1, self.chunk_bytes // (cells * d * 4 * 4))

    def start(self, current: torch.Tensor, distractor_cells: torch.Tensor, grid: tuple[int, int]) -> None:
        super().start(current, distractor_cells, grid)
        self._windows = [self._window(r, current.device) for r in range(len(self.blocks) + 1)]
        self._scatter = [self._shift_index(r, current.device) for r in range(len(self.blocks))]
        self._refresh()

    def update(self, i: int, j: int) -> None:
        self._refresh()

    def _refresh(self) -> None:
        """The unedited map's activations per block: input, 1x1 output, 3x3 pre-activation, output (hw, c)."""
        h, w = self.grid
        x = self.current.reshape(1, -1, h, w)
        self.base = []
        for w1, b1, w2, _, b2, w3, b3 in self.blocks:
            a = F.relu(torch.einsum("nchw,cd->ndhw", x, w1) + b1[:, None, None])
            pre = F.conv2d(a, w2, b2, padding=1)
            y = F.relu(torch.einsum("nchw,cd->ndhw", F.relu(pre), w3) + b3[:, None, None] + x)
            self.base.append(tuple(t[0].reshape(t.shape[1], -1).t() for t in (x, a, pre)))
            x = y
        self.output = x[0].reshape(x.shape[1], -1).t()  # (hw, c)
        self.pooled = x.mean(dim=(2, 3))[0]
        self.base_fast = [tuple(t.to(self.dtype) for t in base) for base in self.base]
        self.output_fast = self.output.to(self.dtype)

    def current_logits(self) -> torch.Tensor:
        return self.rest(self.pooled[None])[0].float()

    def _window(self, r: int, device: torch.device) -> torch.Tensor:
        """(n, 2) offsets (dy, dx) of the cells within radius r, row-major."""
        span = torch.arange(-r, r + 1, device=device)
        return torch.cartesian_prod(span, span)

    def _shift_index(self, r: int, device: torch.device) -> torch.Tensor:
        """For cell p of window r and kernel offset o, the index of p + o in window r + 1 (offset-major)."""
        inner, outer = self._window(r, device), 2 * r + 3
        kernel = self._window(1, device)
        # a change at p reaches q = p - (offset) through the kernel's tap at that offset (cross-correlation)
        target = inner[:, None, :] - kernel[None, :, :] + r + 1  # (n_r, 9, 2) in window r + 1's frame
        return (target[..., 0] * outer + target[..., 1]).reshape(-1)

    def _cells(self, i: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid indices (B, n) of window r around each i (clamped) and whether they lie on the grid."""
        h, w = self.grid
        offsets = self._windows[r]
        rows = (i // w)[:, None] + offsets[:, 0]
        cols = (i % w)[:, None] + offsets[:, 1]
        valid = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        return (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)), valid

    def logits(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        batch = len(i)
        cells, valid = self._cells(i, 0)
        x_new = self.distractor_cells[j][:, None, :].to(self.dtype)  # (B, 1, c): block input on window 0
        for r, ((w1, b1, _, kernel, _b2, w3, b3), (x, a, pre)) in enumerate(
            zip(self.fast, self.base_fast, strict=True)
        ):
            mask = valid[..., None].to(self.dtype)
            a_new = F.relu(x_new @ w1 + b1)
            change = (a_new - a[cells]) * mask  # (B, n_r, mid), zero off the grid
            mid = kernel.shape[1] // 9
            shifted = (change @ kernel).reshape(batch, -1, mid)  # (B, n_r * 9, mid)
            outer_cells, outer_valid = self._cells(i, r + 1)
            pre_new = pre[outer_cells].index_add(1, self._scatter[r], shifted)
            x_outer = x[outer_cells]
            n_inner = x_new.shape[1]
            inner = self._inner_index(r)
            x_outer = x_outer.index_copy(1, inner, x_new) if n_inner else x_outer
            x_new = F.relu(F.relu(pre_new) @ w3 + b3 + x_outer)
            cells, valid = outer_cells, outer_valid
        change = ((x_new - self.output_fast[cells]).float() * valid[..., None].float()).sum(dim=1)
        pooled = self.pooled + change / self.current.shape[1]
        return self.rest(pooled).float()

    def _inner_index(self, r: int) -> torch.Tensor:
        """Where window r's cells sit in window r + 1 (row-major)."""
        inner, outer = self._windows[r], 2 * r + 3
        return (inner[:, 0] + r + 1) * outer + inner[:, 1] + r + 1


def _is_bottleneck(module: nn.Module) -> bool:
    """A torchvision-style bottleneck with identity shortcut, stride 1 and a plain 3 x 3 middle convolution,
    BatchNorm in eval mode: the structure ``BottleneckScorer`` recomputes locally."""
    names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    if not all(hasattr(module, n) for n in names) or getattr(module, "downsample", None) is not None:
        return False
    convs, norms = [module.conv1, module.conv2, module.conv3], [module.bn1, module.bn2, module.bn3]
    if not all(isinstance(c, nn.Conv2d) for c in convs) or not all(
        isinstance(n, nn.BatchNorm2d) and not n.training and n.track_running_stats for n in norms
    ):
        return False
    plain = all(c.stride == (1, 1) and c.groups == 1 and c.dilation == (1, 1) for c in convs)
    sizes = [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)]
    padding = module.conv2.padding == (1, 1) and module.conv2.padding_mode == "zeros"
    relu = isinstance(getattr(module, "relu", None), nn.ReLU)
    return plain and sizes and padding and relu and type(module).forward is _BOTTLENECK_FORWARD


def _layers(g: nn.Module) -> list[nn.Module]:
    """g's modules in order, nested Sequentials flattened; ``[g]`` when g is not a Sequential."""
    if not isinstance(g, nn.Sequential):
        return [g]
    layers = []
    for module in g:
        layers.extend(_layers(module) if isinstance(module, nn.Sequential) else [module])
    return layers


def _pair(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    return (size, size) if isinstance(size, int) else tuple(size) if size is not None else None


def _is_flatten(module: nn.Module) -> bool:
    return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1


def _is_identity_in_eval(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not module.training)


def head_scorer(g: nn.Module, d: int, grid: tuple[int, int], precision: str = "float32") -> HeadScorer:
    """The fastest exact scorer for g's structure (see the module docstring); g itself otherwise."""
    check_precision(precision)
    dtype = PRECISIONS[precision]
    hw = grid[0] * grid[1]
    layers = _layers(g)
    if layers and isinstance(layers[0], nn.AdaptiveAvgPool2d) and _pair(layers[0].output_size) == grid:
        layers = layers[1:]  # pooling to the grid's own size copies it (VGG's avgpool at 224 px)
    if len(layers) >= 2 and _is_flatten(layers[0]) and isinstance(layers[1], nn.Linear):
        if layers[1].in_features == d * hw:
            return LinearFirstScorer(layers[1], nn.Sequential(*layers[2:]), dtype, d, hw)
    blocks = []
    while len(blocks) < len(layers) and _is_bottleneck(layers[len(blocks)]):
        blocks.append(layers[len(blocks)])
    tail = layers[len(blocks) :]
    if blocks and len(tail) >= 2 and isinstance(tail[0], nn.AdaptiveAvgPool2d):
        if _pair(tail[0].output_size) == (1, 1) and _is_flatten(tail[1]):
            return BottleneckScorer(blocks, nn.Sequential(*tail[2:]), dtype)
    pool = layers[0] if layers else None
    if isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size in (1, (1, 1)) and len(layers) >= 3:
        rest = layers[1:]
        if _is_flatten(rest[0]):
            rest = rest[1:]
            while rest and _is_identity_in_eval(rest[0]):
                rest = rest[1:]
            if rest and isinstance(rest[0], nn.Linear) and rest[0].in_features == d:
                return PoolLinearScorer(rest[0], nn.Sequential(*rest[1:]), dtype)
    return HeadScorer(g, dtype)


class _Step:
    """One greedy step's fast scores (-inf where not evaluated) over ``candidates`` (k = i * m + J)."""

    first = 8  # candidates of highest bound scored before the first pruning (at least)
    first_max = 64  # nor more than these
    refine_above = (
        12  # a first round of more candidates is refined first (the tail's cost grows from ~12 rows)
    )
    bound_chunk = (
        512  # candidates bounded at once (larger: fewer waits for threads; smaller: less memory traffic)
    )

    def __init__(self, scorer, candidates, m, target, extra, extra_weight, chunk):
        self.scorer, self.candidates, self.m, self.target = scorer, candidates, m, target
        self.extra, self.extra_weight, self.chunk = extra, extra_weight, chunk
        device = candidates.device
        self.fast = torch.full((len(candidates),), -math.inf, device=device)
        self.largest = torch.zeros(len(candidates), device=device)
        self.gap = torch.zeros(len(candidates), device=device)  # target's logit - the largest other
        self.evaluated = 0

    def _pairs(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.candidates[positions]
        return k // self.m, k % self.m

    def _with_extra(self, scores: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return scores if self.extra is None else scores + self.extra_weight * self.extra[i, j]

    def evaluate(self, positions: torch.Tensor) -> None:
        """Fast scores (Eq. 2 or 4) of the candidates at ``positions`` (increasing), chunk by chunk."""
        for begin in range(0, len(positions), self.chunk):
            chunk = positions[begin : begin + self.chunk]
            i, j = self._pairs(chunk)
            logits = self.scorer.logits(i, j)
            self.fast[chunk] = self._with_extra(torch.log_softmax(logits, dim=-1)[:, self.target], i, j)
            self.largest[chunk] = logits.abs().amax(dim=-1)
            others = logits.index_fill(1, torch.tensor([self.target], device=logits.device), -math.inf)
            self.gap[chunk] = logits[:, self.target] - others.amax(dim=-1)
        self.evaluated += len(positions)

    def branch_and_bound(
        self, atol: float, rtol: float, slack: tuple[float, float | None] | None = None
    ) -> tuple[float, float | None] | None:
        """Score only the candidates whose upper bound can reach the shortlist: every candidate left out has
        bound + margin < best - margin, so its fast score (within rounding of the bound's exact value, which
        bounds the score) is more than ``margin`` below the best: the shortlist is the one of scoring all.

        Where the scorer ``refines`` (``refine_bounds``: tighter bounds at a higher cost per candidate), the
        candidates of a round after the first are refined before they are scored, and scored only if the
        refined bound still reaches (those of the first round too when they are many, below): each bound is
        the smaller of two valid upper bounds.

        The first candidates scored are the ``first`` of highest bound, or, given ``slack`` (the largest
        excesses of a best candidate's bound over its score in the steps so far: before and after refinement),
        all whose bound is within 1.25 slack of the highest (at most ``first_max``; when they are more than
        ``refine_above``, refined, and only those whose refined bound is within 1.25 refined excess of the
        highest refined one, at least ``first``): the excess is much the same from step to step, so those are
        usually all that can reach the shortlist, and the tail runs once per step. Returns this step's
        excesses, before and after refinement (the latter None where the best candidate's bound was not
        refined; both None if not finite)."""
        positions = torch.arange(len(self.candidates), device=self.candidates.device)
        upper = torch.empty(len(self.candidates), device=self.candidates.device)
        for begin in range(0, len(positions), self.bound_chunk):
            chunk = positions[begin : begin + self.bound_chunk]
            i, j = self._pairs(chunk)
            upper[chunk] = self._with_extra(self.scorer.upper_bounds(i, j), i, j)
        done = torch.zeros(len(positions), dtype=torch.bool, device=positions.device)
        if not bool(torch.isfinite(upper).all()):  # NaN or inf: no pruning, the plain way decides
            self.evaluate(positions)
            return None
        loose = upper.clone()
        refine = self.scorer.refine_bounds if getattr(self.scorer, "refines", False) else None
        refined = torch.zeros(len(positions), dtype=torch.bool, device=positions.device)

        def tighten(wanted: torch.Tensor) -> None:
            """Refine the bounds of the candidates at ``wanted`` (increasing) not refined yet."""
            todo = wanted[~refined[wanted]]
            if refine is None or len(todo) == 0:
                return
            for begin in range(0, len(todo), self.bound_chunk):
                chunk = todo[begin : begin + self.bound_chunk]
                i, j = self._pairs(chunk)
                upper[chunk] = torch.fmin(upper[chunk], self._with_extra(refine(i, j), i, j))  # NaN: keep
            refined[todo] = True

        order = torch.argsort(upper, descending=True, stable=True)
        count = self.first
        if slack is not None:
            reach = float(upper[order[0]]) - 1.25 * slack[0] - 2 * atol
            count = min(max(count, int((upper >= reach).sum())), self.first_max)
        wanted = order[:count].sort().values
        if refine is not None and count > self.refine_above:
            tighten(wanted)
            if slack is not None and slack[1] is not None:  # the first round: refined bound near the highest
                reach = float(upper[wanted].max()) - 1.25 * slack[1] - 2 * atol
                kept = wanted[upper[wanted] >= reach]
                if len(kept) < min(self.first, len(wanted)):  # at least ``first``, of highest refined bound
                    top = torch.argsort(upper[wanted], descending=True, stable=True)[: self.first]
                    kept = wanted[top].sort().values
                wanted = kept
        while len(wanted):
            self.evaluate(wanted)
            done[wanted] = True
            best = int(self.fast.argmax())
            if not math.isfinite(float(self.fast[best])):
                wanted = positions[~done]
                continue
            margin = atol + rtol * float(self.largest[best])
            wanted = positions[~done & (upper >= self.fast[best] - 2 * margin)]
            if refine is not None and len(wanted):
                tighten(wanted)
                wanted = positions[~done & (upper >= self.fast[best] - 2 * margin)]
        best = int(self.fast.argmax())
        excess = float(loose[best] - self.fast[best])
        tight = float(upper[best] - self.fast[best]) if bool(refined[best]) else None
        return (excess, tight) if math.isfinite(excess) and (tight is None or math.isfinite(tight)) else None


def _larger(a: float | None, b: float | None) -> float | None:
    """The larger of two excesses, either of which may be unknown (None)."""
    return b if a is None else a if b is None else max(a, b)


def _decided(gap: float, margin: float) -> bool | None:
    """Whether g's argmax is the target, from the fast logits' ``gap`` (the target's logit minus the largest
    other's); None when it is within ``margin`` of 0 (rounding could decide it) or not a number."""
    if not math.isfinite(gap):
        return None
    return True if gap > margin else False if gap < -margin else None


def _predicts(logits: torch.Tensor, target: int, atol: float, rtol: float) -> bool | None:
    """``_decided`` for one vector of fast logits (classes,)."""
    others = torch.cat([logits[:target], logits[target + 1 :]])
    if len(others) == 0:
        return True
    return _decided(float(logits[target]) - float(others.max()), atol + rtol * float(logits.abs().max()))


def greedy_search(
    g: nn.Module,
    scorer: HeadScorer,
    query_features: torch.Tensor,
    distractor_cells: torch.Tensor,
    target: int,
    *,
    cap: int,
    hw_per_distractor: int,
    allowed: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
    extra_weight: float = 1.0,
    chunk_size: int = 4096,
    precision: str = "float32",
) -> SearchResult:
    """The greedy loop over single-cell replacements (module docstring), exact whatever the scorer.

    ``query_features`` (d, h, w); ``distractor_cells`` (m, d); ``allowed`` (hw, m) bool: candidates that may
    ever be chosen (all when None); ``extra`` (hw, m): ``extra_weight * extra`` is added to every score
    (the semantic term). No reuse (Eq. 1's permutation P and gating a; the authors' code): an applied edit
    drops every candidate that shares its query cell or its distractor cell. Stops at the first flip, at
    ``cap`` edits, or when no candidate is left (not flipped).
    """
    d, h, w = query_features.shape
    hw = h * w
    m = distractor_cells.shape[0]
    current = query_features.reshape(d, hw).clone()
    allowed = (
        torch.ones(hw, m, dtype=torch.bool, device=current.device) if allowed is None else allowed.clone()
    )
    extra_list = extra.cpu().numpy() if extra is not None else None
    scorer.start(current, distractor_cells, (h, w))
    atol, rtol = _MARGINS[precision]
    scorer.prepare(allowed.reshape(-1).nonzero().squeeze(1))
    step_chunk = min(chunk_size, scorer.max_chunk(d, hw))

    def exact_logits(i: int | None = None, j: int | None = None) -> torch.Tensor:
        """g on the current map, or on it with cell i replaced by distractor cell j: the plain way."""
        candidate = current.clone()
        if i is not None:
            candidate[:, i] = distractor_cells[j]
        return g(candidate.reshape(1, d, h, w))[0]

    logits = scorer.current_logits()
    if logits is None:
        logits = exact_logits()
    if not 0 <= target < logits.shape[-1]:
        raise ValueError(
            f"target {target} is not a class of g (it has {logits.shape[-1]}); pick 0..{logits.shape[-1] - 1}"
        )
    flipped = _predicts(logits, target, atol, rtol)
    if flipped is None:  # the fast logits are too close to call: g decides
        flipped = int(exact_logits().argmax()) == target

    edits: list[Edit] = []
    scores: list[float] = []
    rescored = scored = evaluated = 0
    slack = None  # the largest bound excesses of the steps so far, before and after refinement
    while not flipped and len(edits) < cap:
        candidates = allowed.reshape(-1).nonzero().squeeze(1)  # k = i * m + J, increasing
        if len(candidates) == 0:
            break
        scored += len(candidates)
        step = _Step(scorer, candidates, m, target, extra, extra_weight, step_chunk)
        if scorer.begin_bounds(target):
            excess = step.branch_and_bound(atol, rtol, slack)
            if excess is not None:
                slack = excess if slack is None else tuple(map(_larger, slack, excess))
        else:
            step.evaluate(torch.arange(len(candidates), device=current.device))
        evaluated += step.evaluated
        fast, largest = step.fast, step.largest
        best = int(fast.argmax())
        if math.isfinite(float(fast[best])):
            margin = atol + rtol * float(largest[best])
            shortlist = candidates[fast >= fast[best] - margin].tolist()
        else:
            shortlist = candidates.tolist()  # NaN or inf scores: let the exact pass decide, as the reference
        chosen = None
        if len(shortlist) == 1 and precision == "float32":
            # every other candidate is more than the margin below: the plain loop picks this one too, with
            # this score to float32 rounding; g runs only if the fast logits cannot tell whether it flips
            i, j = divmod(shortlist[0], m)
            predicts = _decided(float(step.gap[best]), atol + rtol * float(largest[best]))
            if predicts is not None:
                chosen = (float(fast[best]), i, j, predicts)
        if chosen is None:
            rescored += len(shortlist)
            for k in shortlist:  # the plain way, in k order, strict ">": the lowest k wins exact ties
                i, j = divmod(k, m)
                candidate_logits = exact_logits(i, j)
                score = float(torch.log_softmax(candidate_logits, dim=-1)[target])
                if extra_list is not None:
                    score = score + extra_weight * float(extra_list[i, j])
                if chosen is None or score > chosen[0]:
                    chosen = (score, i, j, int(candidate_logits.argmax()) == target)
        score, i, j, flipped = chosen
        current[:, i] = distractor_cells[j]
        scorer.update(i, j)
        edits.append(
            Edit(query_cell=i, distractor=j // hw_per_distractor, distractor_cell=j % hw_per_distractor)
        )
        scores.append(score)
        allowed[i, :] = False
        allowed[:, j] = False
    return SearchResult(
        edits=edits, scores=scores, flipped=flipped, rescored=rescored, candidates=scored, evaluated=evaluated
    )


def check_images(query: torch.Tensor, distractors: torch.Tensor, needed: int = 1) -> None:
    """Refuse a query that is not (1, C, H, W) or fewer than ``needed`` distractors, naming the shapes."""
    if query.ndim != 4 or query.shape[0] != 1:
        raise ValueError(
            f"query must have shape (1, C, H, W), not {tuple(query.shape)}; explain_batch takes many"
        )
    if distractors.ndim != 4 or distractors.shape[0] < needed:
        raise ValueError(
            f"distractors must have shape (N >= {needed}, C, H, W), not {tuple(distractors.shape)}"
        )
    if distractors.shape[1:] != query.shape[1:]:
        raise ValueError(
            f"distractor images are {tuple(distractors.shape[1:])} but the query is {tuple(query.shape[1:])}"
        )


def cell_counterfactual(
    name: str,
    config: dict,
    target: int,
    result: SearchResult,
    grid: tuple[int, int],
    query_size: tuple[int, int],
    distractor_sizes: list[tuple[int, int]],
    timings: dict[str, float],
) -> Counterfactual:
    """The result of a cell search with its masks: edited query cells, and each distractor's taken cells.

    ``timings`` gains three counts for diagnostics: ``candidates`` considered, of those ``evaluated`` by the
    fast scorer (the others were bounded out), and ``rescored`` by g itself.
    """
    query_cells = sorted({e.query_cell for e in result.edits})
    taken: list[set[int]] = [set() for _ in distractor_sizes]
    for e in result.edits:
        taken[e.distractor].add(e.distractor_cell)
    return Counterfactual(
        method=name,
        target=target,
        flipped=result.flipped,
        edits=result.edits,
        scores=result.scores,
        query_mask=cells_to_mask(query_cells, grid, query_size),
        distractor_masks=[
            cells_to_mask(sorted(cells), grid, size)
            for cells, size in zip(taken, distractor_sizes, strict=True)
        ],
        config=config,
        timings={
            **timings,
            "candidates": float(result.candidates),
            "evaluated": float(result.evaluated),
            "rescored": float(result.rescored),
        },
        grid=grid,
    )
