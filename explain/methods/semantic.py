"""Semantically consistent counterfactuals (Vandenhende et al., ECCV 2022, Sec. 3.2-3.3).

CVE's greedy cell replacement (``explain.methods.cve``) with three changes:

- the semantic consistency term (Eq. 3-4): each candidate (query cell i, distractor cell J) also scores
  ``lambda_ * log L_s(i, J)``, where L_s is the softmax over all distractor cells J' of the cosine similarity
  of the auxiliary model's cells, divided by ``tau``:
  ``L_s(i, J) = exp(cos(u(I)_i, u(I')_J) / tau) / sum_J' exp(cos(u(I)_i, u(I')_J') / tau)``;
- several distractor images: J runs over the cells of all of them (the softmax too, as the authors' code);
- the top-k prefilter: only the ``topk`` fraction of all (i, J) pairs with the highest auxiliary cosine
  similarity are ever candidates (``int(topk * hw * m)`` pairs; ties go to the lower pair index);

and, as the authors' code does, no reuse: a query cell or distractor cell once edited is no candidate again.
Defaults are the paper's: lambda 0.4, tau 0.1, k = 10%.

The auxiliary model u maps images (N, C, H, W) to cells (N, d', h, w) on f's h x w grid: ``aux.cells(x)``
when it has that method (``explain.nets.auxiliary``), otherwise ``aux(x)``.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from explain.methods.base import Counterfactual, CounterfactualMethod, SplitClassifier, check_batch
from explain.methods.cell_search import (
    cell_counterfactual,
    check_images,
    check_precision,
    greedy_search,
    head_scorer,
)
from explain.methods.declaration import AUXILIARY, MethodDeclaration


def aux_cells(aux: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """u's cells of ``images``: ``aux.cells(images)`` if it has that method, else ``aux(images)``."""
    cells = aux.cells(images) if hasattr(aux, "cells") else aux(images)
    if cells.ndim != 4:
        raise ValueError(
            f"the auxiliary model must return cells (N, d', h, w), it returned {tuple(cells.shape)}"
        )
    return cells


def semantic_log_likelihood(
    query_aux: torch.Tensor, distractor_aux: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cosine, log L_s)``, both (hw, m), of u's query cells (d', hw) and distractor cells (m, d')."""
    query_unit = F.normalize(query_aux.t(), dim=1)  # (hw, d')
    distractor_unit = F.normalize(distractor_aux, dim=1)  # (m, d')
    cosine = query_unit @ distractor_unit.t()
    return cosine, torch.log_softmax(cosine / tau, dim=1)


def topk_pairs(cosine: torch.Tensor, topk: float | None) -> torch.Tensor:
    """(hw, m) bool: the ``int(topk * hw * m)`` (at least 1) most similar pairs; all when ``topk`` is None."""
    if topk is None:
        return torch.ones_like(cosine, dtype=torch.bool)
    count = max(1, int(topk * cosine.numel()))
    order = torch.sort(cosine.reshape(-1), descending=True, stable=True).indices[:count]
    allowed = torch.zeros(cosine.numel(), dtype=torch.bool, device=cosine.device)
    allowed[order] = True
    return allowed.reshape(cosine.shape)


DECLARATION = MethodDeclaration(
    name="semantic",
    target="explain.methods.semantic:SemanticCounterfactual",
    paper="Vandenhende et al., Making Heads or Tails: Towards Semantically Consistent Visual "
    "Counterfactuals, ECCV 2022",
    kind="cell",
    aux=AUXILIARY,
    execution=frozenset({"chunk_size"}),
)


class SemanticCounterfactual(CounterfactualMethod):
    """CVE plus the semantic consistency term, several distractors and the top-k prefilter."""

    name = "semantic"

    def __init__(
        self,
        *,
        lambda_: float = 0.4,
        tau: float = 0.1,
        topk: float | None = 0.1,
        num_distractors: int | None = 1,
        max_edits: int | None = None,
        chunk_size: int = 4096,
        precision: str = "float32",
    ):
        """``lambda_``, ``tau``: Eq. 4's weight and Eq. 3's temperature. ``topk``: the fraction of pairs kept
        by the prefilter (None: no prefilter). ``num_distractors``: how many of the given distractor images
        are used (None: all; a study's fair comparison uses 1). ``max_edits``: the cap (None: h * w, which the
        no-reuse rule cannot exceed anyway). ``chunk_size``, ``precision``: as ``CVE``.
        """
        if not math.isfinite(lambda_) or lambda_ < 0:
            raise ValueError(f"lambda_ must be a finite number >= 0, not {lambda_!r}")
        if not math.isfinite(tau) or tau <= 0:
            raise ValueError(f"tau must be a finite number > 0, not {tau!r}")
        if topk is not None and not 0 < topk <= 1:
            raise ValueError(
                f"topk is the fraction of cell pairs kept, in (0, 1] (0.1 for 10%), not {topk!r}"
            )
        if num_distractors is not None and (isinstance(num_distractors, bool) or num_distractors < 1):
            raise ValueError(
                f"num_distractors must be None (all) or an integer >= 1, not {num_distractors!r}"
            )
        if max_edits is not None and (isinstance(max_edits, bool) or max_edits < 0):
            raise ValueError(f"max_edits must be None or an integer >= 0, not {max_edits!r}")
        if isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, not {chunk_size!r}")
        check_precision(precision)
        self.lambda_ = lambda_
        self.tau = tau
        self.topk = topk
        self.num_distractors = num_distractors
        self.max_edits = max_edits
        self.chunk_size = chunk_size
        self.precision = precision

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
        """Edit ``query``'s features with cells of the distractors until g predicts ``target`` (Eq. 4).

        ``aux`` is required; ``generator`` is unused (the method is deterministic). Stops at the first flip,
        at the cap, or when the prefilter and the no-reuse rule leave no candidate (``flipped`` is False).
        """
        check_images(query, distractors, self.num_distractors or 1)
        return self.explain_batch(model, query, [target], [distractors], aux=aux)[0]

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
        """``explain`` for each query; f and u run once over all images, g's fast scorer is built once."""
        if aux is None:
            raise ValueError(
                "the semantic method needs an auxiliary model: pass aux=, a module mapping images to cells "
                "(N, d', h, w) on the classifier's grid (e.g. explain.nets.auxiliary)"
            )
        check_batch(queries, targets, distractors)
        for q in range(queries.shape[0]):
            check_images(queries[q : q + 1], distractors[q], self.num_distractors or 1)
        used = [d if self.num_distractors is None else d[: self.num_distractors] for d in distractors]
        n = queries.shape[0]
        with torch.no_grad():
            images = torch.cat([queries, *used])
            start = time.perf_counter()
            features = model.f(images)
            features_s = (time.perf_counter() - start) / n
            start = time.perf_counter()
            aux_features = aux_cells(aux, images)
            aux_s = (time.perf_counter() - start) / n
            d, h, w = features.shape[1:]
            if tuple(aux_features.shape[-2:]) != (h, w):
                raise ValueError(
                    f"the auxiliary model's cells are on a {tuple(aux_features.shape[-2:])} grid but f's are "
                    f"on {(h, w)}; resample u's output to f's grid"
                )
            hw = h * w
            scorer = head_scorer(model.g, d, (h, w), self.precision)
            results = []
            offset = n
            for q in range(n):
                count = used[q].shape[0]
                rows = slice(offset, offset + count)
                offset += count
                start = time.perf_counter()
                distractor_cells = features[rows].permute(0, 2, 3, 1).reshape(count * hw, d)  # J = n * hw + j
                distractor_aux = aux_features[rows].permute(0, 2, 3, 1).reshape(count * hw, -1)
                cosine, log_ls = semantic_log_likelihood(
                    aux_features[q].reshape(-1, hw), distractor_aux, self.tau
                )
                allowed = topk_pairs(cosine, self.topk)
                search = greedy_search(
                    model.g,
                    scorer,
                    features[q],
                    distractor_cells,
                    targets[q],
                    cap=hw if self.max_edits is None else self.max_edits,
                    hw_per_distractor=hw,
                    allowed=allowed,
                    extra=log_ls if self.lambda_ > 0 else None,
                    extra_weight=self.lambda_,
                    chunk_size=self.chunk_size,
                    precision=self.precision,
                )
                timings = {"features_s": features_s, "aux_s": aux_s, "search_s": time.perf_counter() - start}
                results.append(
                    cell_counterfactual(
                        self.name,
                        self.config(),
                        targets[q],
                        search,
                        (h, w),
                        tuple(queries.shape[-2:]),
                        [tuple(queries.shape[-2:])] * count,
                        timings,
                    )
                )
        return results
