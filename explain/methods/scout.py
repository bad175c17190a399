"""SCOUT: self-aware discriminant counterfactual explanations (Wang and Vasconcelos, CVPR 2020).

SCOUT explains "why class c and not c'" with discriminant attribution maps. As the authors' released code for
method comparisons (peiwang062/SCOUT, ``cf_ss_vgg_cub.py``: the self-awareness score is the classifier's own
softmax confidence), on the last convolutional activations *before* pool5 (VGG's layer 42, 14 x 14 at 224 px):

    A(I) = sum over channels of (d g_c  / d a) * a,  then every value < 0 set to 1e-7    predicted class c
    B(I) = sum over channels of (d g_c' / d a) * a,  then every value < 0 set to 1e-7    counter class c'
    S(I) = sum over channels of max(d s / d a, 0) * a                  s = max softmax probability
    D(I) = S(I) * (max B(I) - B(I)) * A(I)                             no normalisation (the released "abc")

where a is that activation. The distractor's map D(I') swaps the roles of c and c'. When f ends in a max-pool
(VGG's pool5) the maps are taken on the activation before it and the pool is run as the first layer of the
head; otherwise on f's output.

The region. SCOUT thresholds the upsampled pixel map at a chosen area; the Vandenhende et al. (2022)
comparison fixes that area to one cell edit. Here the region is the grid cell of f's h x w grid (the grid the
cell methods edit) with the largest mean D; ``cells`` > 1 takes the top cells (ties to the lower cell index).
Edit r pairs the query's r-th cell with the distractor's r-th cell, so the result has the same form as CVE's:
``scores`` are g's target log-probability after each replacement and ``flipped`` says whether replacing the
query region by the distractor region changes the decision. SCOUT is designed for one image pair: only
``distractors[0]`` is used.

All maps of a batch come from one forward and one backward pass (the head must be in eval mode, so that the
items of a batch do not interact).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from explain.methods.base import Counterfactual, CounterfactualMethod, Edit, SplitClassifier, check_batch
from explain.methods.cell_search import SearchResult, cell_counterfactual, check_images
from explain.methods.declaration import MethodDeclaration

# The released code's clamp of the class maps: ``heatmaps[heatmaps < 0] = 1e-7``.
EPSILON = 1e-7


def map_layers(model: SplitClassifier) -> tuple[nn.Module, nn.Module]:
    """(body, head) with head(body(x)) = g(f(x)): the maps are taken on body's output, before pool5 when f
    ends in a max-pool (the released code's layer), else on f's output."""
    f = model.f
    if isinstance(f, nn.Sequential) and len(f) > 1 and isinstance(f[-1], nn.MaxPool2d):
        return f[:-1], nn.Sequential(f[-1], model.g)
    return f, model.g


def attribution_maps(head: nn.Module, activations: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Maps (B, h', w') of ``head`` at ``activations`` (B, d, h', w') for ``classes`` (B,).

    Class k >= 0: signed gradient x activation of logit k, values < 0 set to ``EPSILON`` (A and B). Class -1:
    the self-awareness map S, positive gradients of the top softmax probability x activation.
    """
    with torch.enable_grad():
        a = activations.detach().clone().requires_grad_(True)
        logits = head(a)
        confidence = torch.softmax(logits, dim=-1).amax(dim=-1)
        picked = logits.gather(1, classes.clamp(min=0)[:, None])[:, 0]
        objective = torch.where(classes >= 0, picked, confidence)
        (gradient,) = torch.autograd.grad(objective.sum(), a)
    is_class = (classes >= 0).view(-1, 1, 1)
    signed = (gradient * a.detach()).sum(dim=1)
    positive = (gradient.clamp(min=0) * a.detach()).sum(dim=1)
    class_map = torch.where(signed < 0, torch.full_like(signed, EPSILON), signed)
    return torch.where(is_class, class_map, positive)


def discriminant_map(s: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D = S * (max B - B) * A for (B, h', w') maps, max B over each map."""
    peak = b.flatten(1).amax(dim=1).view(-1, 1, 1)
    return s * (peak - b) * a


DECLARATION = MethodDeclaration(
    name="scout",
    target="explain.methods.scout:SCOUT",
    paper="Wang and Vasconcelos, SCOUT: Self-aware Discriminant Counterfactual Explanations, CVPR 2020",
    kind="cell",
    requires_flip=False,  # an attribution: its regions are the stimulus, flip or not
)


class SCOUT(CounterfactualMethod):
    """Discriminant attribution regions on the query and one distractor (Wang and Vasconcelos 2020)."""

    name = "scout"

    def __init__(self, *, cells: int = 1):
        """``cells``: the region size on each image, in grid cells (1: the area of one cell edit)."""
        if isinstance(cells, bool) or not isinstance(cells, int) or cells < 1:
            raise ValueError(f"cells must be an integer >= 1 (the region size in grid cells), not {cells!r}")
        self.cells = cells

    def explain(
        self,
        model: SplitClassifier,
        query: torch.Tensor,
        target: int,
        distractors: torch.Tensor,
        *,
        aux: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> Counterfactual:
        """The query region that says "c, not ``target``" and the ``distractors[0]`` region that says the
        opposite. ``aux`` and ``generator`` are unused."""
        check_images(query, distractors)
        return self.explain_batch(model, query, [target], [distractors])[0]

    def explain_batch(
        self,
        model: SplitClassifier,
        queries: torch.Tensor,
        targets: list[int],
        distractors: list[torch.Tensor],
        *,
        aux: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Counterfactual]:
        """``explain`` for each query, all maps from one forward and one backward pass of g."""
        check_batch(queries, targets, distractors)
        for q in range(queries.shape[0]):
            check_images(queries[q : q + 1], distractors[q])
        n = queries.shape[0]
        start = time.perf_counter()
        with torch.no_grad():
            features = model.f(torch.cat([queries, *[d[:1] for d in distractors]]))
            query_f, distractor_f = features[:n], features[n:]
            logits = model.g(query_f)
        num_classes = logits.shape[-1]
        for target in targets:
            if not 0 <= target < num_classes:
                raise ValueError(
                    f"target {target} is not a class of g (it has {num_classes}); pick 0..{num_classes - 1}"
                )
        features_s = (time.perf_counter() - start) / n
        d, h, w = features.shape[1:]
        hw = h * w
        if self.cells > hw:
            raise ValueError(f"cells={self.cells} is more than the {h}x{w} grid holds; pick 1..{hw}")

        start = time.perf_counter()
        own = logits.argmax(dim=-1)
        other = torch.as_tensor(targets, device=features.device)
        confidence = torch.full_like(own, -1)
        body, head = map_layers(model)
        with torch.no_grad():
            activations = body(torch.cat([queries, *[d[:1] for d in distractors]]))
        query_a, distractor_a = activations[:n], activations[n:]
        # Six maps per query: c, c' and s on the query; c', c and s on the distractor.
        batch = torch.cat([query_a, query_a, query_a, distractor_a, distractor_a, distractor_a])
        classes = torch.cat([own, other, confidence, other, own, confidence])
        maps = attribution_maps(head, batch, classes).reshape(6, n, *activations.shape[-2:])
        query_map = discriminant_map(maps[2], maps[0], maps[1])
        distractor_map = discriminant_map(maps[5], maps[3], maps[4])
        query_cells = F.adaptive_avg_pool2d(query_map[:, None], (h, w)).reshape(n, hw)
        distractor_cells = F.adaptive_avg_pool2d(distractor_map[:, None], (h, w)).reshape(n, hw)
        query_top = torch.sort(query_cells, dim=1, descending=True, stable=True).indices[:, : self.cells]
        distractor_top = torch.sort(distractor_cells, dim=1, descending=True, stable=True).indices[
            :, : self.cells
        ]
        maps_s = (time.perf_counter() - start) / n

        results = []
        with torch.no_grad():
            for q in range(n):
                start = time.perf_counter()
                edits = [
                    Edit(query_cell=int(i), distractor=0, distractor_cell=int(j))
                    for i, j in zip(query_top[q].tolist(), distractor_top[q].tolist(), strict=True)
                ]
                current = query_f[q].reshape(d, hw).clone()
                cells = distractor_f[q].reshape(d, hw)
                scores, flipped = [], False
                for e in edits:
                    current[:, e.query_cell] = cells[:, e.distractor_cell]
                    edited = model.g(current.reshape(1, d, h, w))[0]
                    scores.append(float(torch.log_softmax(edited, dim=-1)[targets[q]]))
                    flipped = int(edited.argmax()) == targets[q]
                search = SearchResult(edits=edits, scores=scores, flipped=flipped, rescored=0)
                timings = {
                    "features_s": features_s,
                    "maps_s": maps_s,
                    "search_s": time.perf_counter() - start,
                }
                results.append(
                    cell_counterfactual(
                        self.name,
                        self.config(),
                        targets[q],
                        search,
                        (h, w),
                        tuple(queries.shape[-2:]),
                        [tuple(distractors[q].shape[-2:])],
                        timings,
                    )
                )
        return results
