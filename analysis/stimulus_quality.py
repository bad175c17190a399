"""Stimulus quality beside human accuracy, per condition: did a method lose because it teaches badly or
because its backbone was weak?

``stimulus_quality`` (a selector) reads the study's explanations and the backbones they were made with: per
method x setup the flip rate, COUT, L1, the region area (mean and quartiles), the NFE, every backbone's
quality card, and the study's override where a weak backbone was accepted. ``stimulus_quality_table`` puts
the human test accuracy beside it, for the report's own block.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from explain.models import Backbone, Explanation
from studies.models import Study

COLUMNS = [
    "method", "setup", "stimuli", "flip_rate", "cout", "l1", "region_area", "region_area_q25",
    "region_area_q50", "region_area_q75", "nfe", "backbone_cards", "weak_backbones", "quality_override",
]  # fmt: skip


def _mean(values: list) -> float | None:
    numbers = [float(v) for v in values if v is not None]
    return float(np.mean(numbers)) if numbers else None


def _card_line(backbone: Backbone) -> str:
    card = (backbone.provenance or {}).get("quality") or {}
    if "passed" not in card:
        return f"{backbone.name}: no card ({card.get('missing', 'not measured')})"
    figures = ", ".join(
        f"{t['figure']} {card['figures'][t['figure']]:.3g} ({t['op']} {t['value']:g})"
        for t in card["thresholds"]
    )
    return f"{backbone.name}: {'passed' if card['passed'] else 'FAILED'} ({figures})"


def stimulus_quality(*, study: Study) -> pd.DataFrame:
    """One row per condition (method x setup) with the quality figures of its stimuli and backbones."""
    explanations = list(
        Explanation.objects.filter(study=study).select_related("condition").order_by("condition_id", "pk")
    )
    ids = {pk for e in explanations for pk in (e.config.get("backbones") or {}).values()}
    ids |= {e.config["auxiliary"] for e in explanations if e.config.get("auxiliary")}
    backbones = Backbone.objects.in_bulk(ids)
    plan = getattr(study, "precompute_plan", None)
    override = (plan.quality_override or {}).get("reason", "") if plan is not None else ""
    records = []
    for condition in study.conditions.order_by("method", "setup"):
        rows = [e for e in explanations if e.condition_id == condition.pk]
        metrics = [e.metrics if isinstance(e.metrics, dict) else {} for e in rows]
        used = sorted(
            {
                pk
                for e in rows
                for pk in [*(e.config.get("backbones") or {}).values(), e.config.get("auxiliary")]
            }
            - {None}
        )
        cards = [_card_line(backbones[pk]) for pk in used if pk in backbones]
        weak = [line.split(":")[0] for line in cards if ": FAILED" in line]
        areas = [float(m["region_area"]) for m in metrics if m.get("region_area") is not None]
        q25, q50, q75 = np.percentile(areas, [25, 50, 75]) if areas else (None, None, None)
        records.append(
            {
                "method": condition.method,
                "setup": condition.setup,
                "stimuli": len(rows),
                "flip_rate": _mean(
                    [float(bool(m.get("flipped", e.flipped))) for m, e in zip(metrics, rows, strict=True)]
                ),
                "cout": _mean([m.get("cout") for m in metrics]),
                "l1": _mean([m.get("l1") for m in metrics]),
                "region_area": _mean(areas),
                "region_area_q25": q25,
                "region_area_q50": q50,
                "region_area_q75": q75,
                "nfe": _mean([m.get("nfe") for m in metrics]),
                "backbone_cards": "; ".join(cards),
                "weak_backbones": ", ".join(weak),
                "quality_override": override if weak else "",
            }
        )
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def stimulus_quality_table(quality: pd.DataFrame, accuracy: pd.DataFrame) -> pd.DataFrame:
    """``quality`` with each condition's human test accuracy (the report's accuracy table) beside it."""
    if accuracy.empty or "accuracy" not in accuracy:
        return quality.assign(human_accuracy=np.nan)
    merged = quality.merge(
        accuracy[["method", "setup", "accuracy"]].rename(columns={"accuracy": "human_accuracy"}),
        on=["method", "setup"],
        how="left",
    )
    return merged[["method", "setup", "human_accuracy", *COLUMNS[2:]]]
