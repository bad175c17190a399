"""Counterfactual Visual Explanations (Goyal et al., ICML 2019), as in Vandenhende et al. 2022, Sec. 3.1.

The classifier is split into spatial features ``f`` (d x h x w) and a decision network ``g``. A counterfactual
is built in feature space by replacing cells of the query's features f(I) with cells of a distractor's
features f(I') (Eq. 1)::

    f(I*) = (1 - a) o f(I) + a o P f(I')

Goyal's greedy search adds one cell replacement at a time: at each step it scores every one of the h^2 w^2
(query cell i, distractor cell j) pairs by the target class log-probability of g on the edited features
(Eq. 2, with log-softmax, which has the same argmax as g_c') and applies the best, until g predicts the
target class c' or a cap on the number of edits is reached. As Eq. 1's permutation P and gating vector a
imply, and as the authors' released search does, each query cell is replaced at most once and each
distractor cell used at most once (the rule and the tie-break are ``explain.methods.cell_search``'s).

Goyal uses a single distractor image; this implementation uses ``distractors[0]`` and ignores the others.
The search itself (exact, with structure-exploiting fast scoring) is ``explain.methods.cell_search``.
"""

from __future__ import annotations

import time

import torch

from explain.methods.base import Counterfactual, CounterfactualMethod, SplitClassifier, check_batch
from explain.methods.cell_search import (
    cell_counterfactual,
    check_images,
    check_precision,
    greedy_search,
    head_scorer,
)
from explain.methods.declaration import MethodDeclaration

DECLARATION = MethodDeclaration(
    name="cve",
    target="explain.methods.cve:CVE",
    paper="Goyal et al., Counterfactual Visual Explanations, ICML 2019 (Vandenhende et al. 2022, Sec. 3.1)",
    kind="cell",
    execution=frozenset({"chunk_size"}),
)


class CVE(CounterfactualMethod):
    """Greedy exhaustive cell replacement from one distractor image (Goyal et al. 2019)."""

    name = "cve"

    def __init__(self, *, max_edits: int | None = None, chunk_size: int = 4096, precision: str = "float32"):
        """``max_edits``: the cap on edits (None: h * w, which the no-reuse rule cannot exceed).
        ``chunk_size``: candidate pairs scored at once.

        ``precision``: dtype of the fast scores ("float32", "bfloat16", "float16"); the chosen edits are
        always confirmed in float32 by g itself.
        """
        if max_edits is not None and (isinstance(max_edits, bool) or max_edits < 0):
            raise ValueError(f"max_edits must be None or an integer >= 0, not {max_edits!r}")
        if isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, not {chunk_size!r}")
        check_precision(precision)
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
        aux: torch.nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> Counterfactual:
        """Edit ``query``'s features with cells of ``distractors[0]`` until g predicts ``target``.

        ``aux`` and ``generator`` are unused (the method has no auxiliary model and is deterministic). If the
        query is already classified as ``target``, no edit is made and ``flipped`` is True. When the cap is
        reached first, ``flipped`` is False: the method never raises for an unreachable target.
        """
        check_images(query, distractors)
        return self.explain_batch(model, query, [target], [distractors])[0]

    def explain_batch(
        self,
        model: SplitClassifier,
        queries: torch.Tensor,
        targets: list[int],
        distractors: list[torch.Tensor],
        *,
        aux: torch.nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Counterfactual]:
        """``explain`` for each query; f runs once over all images and g's fast scorer is built once."""
        check_batch(queries, targets, distractors)
        for q in range(queries.shape[0]):
            check_images(queries[q : q + 1], distractors[q])
        with torch.no_grad():
            start = time.perf_counter()
            features = model.f(torch.cat([queries, *[d[:1] for d in distractors]]))
            features_s = (time.perf_counter() - start) / queries.shape[0]
            n = queries.shape[0]
            d, h, w = features.shape[1:]
            scorer = head_scorer(model.g, d, (h, w), self.precision)
            results = []
            for q in range(n):
                start = time.perf_counter()
                search = greedy_search(
                    model.g,
                    scorer,
                    features[q],
                    features[n + q].reshape(d, h * w).t(),
                    targets[q],
                    cap=h * w if self.max_edits is None else self.max_edits,
                    hw_per_distractor=h * w,
                    chunk_size=self.chunk_size,
                    precision=self.precision,
                )
                timings = {"features_s": features_s, "search_s": time.perf_counter() - start}
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
