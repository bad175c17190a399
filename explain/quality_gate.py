"""No backbone drives a study before it passes its quality card (``explain.nets.quality``), unless the
researcher accepts it for that study.

A card is stored in the backbone's ``provenance["quality"]`` when it is trained or registered. A backbone
whose card failed is refused by the planner (models that exist when the study is planned) and by the worker
(models the plan trained), naming the backbone, the failing figure and its threshold. A study's precompute
plan may accept weak backbones (``PrecomputePlan.quality_override``: ``{"reason": ...}``); the report prints
it beside the affected conditions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.core.exceptions import ValidationError

from explain.models import Backbone


def card_failures(backbone: Backbone) -> list[str]:
    """The failing figures of the backbone's card ('psnr_db = 14.2, needs >= 20'); empty when it passed or
    has no card (a model registered before cards, or one no classifier could judge)."""
    card = (backbone.provenance or {}).get("quality") or {}
    if card.get("passed", True):
        return []
    return list(card.get("failures") or ["failed its quality card"])


def weak_backbones(backbones: Iterable[Backbone]) -> dict[str, list[str]]:
    """Backbone name -> its failing figures, for every backbone whose card failed."""
    return {b.name: failures for b in backbones if (failures := card_failures(b))}


def quality_refusal(*, method: str, backbones: Iterable[Backbone], override: dict[str, Any] | None) -> str:
    """Why ``method`` may not run on these backbones ('' when it may: every card passed, or the study
    accepted the weak ones)."""
    weak = weak_backbones(backbones)
    if not weak or (override or {}).get("reason"):
        return ""
    named = "; ".join(f"{name}: {', '.join(failures)}" for name, failures in weak.items())
    return (
        f"Method {method!r} would run on backbones that fail their quality card ({named}). Train better "
        "ones (larger backbone_params), or accept them for this study: plan it again with "
        "quality_override='<why>' (the report prints the override beside these conditions)."
    )


def quality_check(*, method: str, backbones: Iterable[Backbone], override: dict[str, Any] | None) -> None:
    """Raise ``ValidationError`` with ``quality_refusal``'s message when the method may not run."""
    refusal = quality_refusal(method=method, backbones=backbones, override=override)
    if refusal:
        raise ValidationError(refusal)
