"""One provenance record for every model the platform holds (a ``Classifier`` or a ``Backbone`` row), whether
the platform trained it, a researcher registered it from local files, or it shipped with the repository.

Every record has ``source`` ("trained", "registered" or "shipped"), ``code_version`` and ``torch``. A trained
or shipped model adds ``data`` (what it saw), ``params`` (its budget and seed), ``seconds``, ``final_loss``
and a ``loss_curve`` thinned to at most 200 points (``loss_curve_stride`` apart, in ``loss_unit``); a
registered one adds ``path`` and ``found`` (what the registration's checks measured). Checks that run later
add their own keys beside these (``quality``: the quality card; ``part_clustering``)."""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.conf import settings

CURVE_POINTS = 200


@functools.cache
def code_version() -> str:
    """The git commit of the running code (``FOIL_CODE_VERSION`` overrides it, e.g. in a container)."""
    if os.environ.get("FOIL_CODE_VERSION"):
        return os.environ["FOIL_CODE_VERSION"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=settings.BASE_DIR,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def _torch_version() -> str:
    import torch

    return torch.__version__


def _common(source: str) -> dict[str, Any]:
    return {"source": source, "code_version": code_version(), "torch": _torch_version()}


def thinned(losses: Sequence[float]) -> tuple[list[float], int]:
    """``losses`` thinned to at most ``CURVE_POINTS`` values, and the stride between them."""
    stride = max(1, -(-len(losses) // CURVE_POINTS))
    return [float(v) for v in list(losses)[::stride]], stride


def trained(
    *,
    data: dict[str, Any],
    params: dict[str, Any],
    seconds: float,
    losses: Sequence[float],
    loss_unit: str = "step",
    device: str = "cpu",
    **extra: Any,
) -> dict[str, Any]:
    """The record of a model the platform trained: ``losses`` is the loss of every step (or batch)."""
    curve, stride = thinned(losses)
    return {
        **_common("trained"),
        "data": data,
        "params": params,
        "seconds": round(float(seconds), 1),
        "device": device,
        "final_loss": float(losses[-1]) if len(losses) else None,
        "loss_curve": curve,
        "loss_curve_stride": stride,
        "loss_unit": loss_unit,
        **extra,
    }


def registered(path: str | os.PathLike[str], **found: Any) -> dict[str, Any]:
    """The record of a model registered from local files: where, and what the registration's checks found."""
    return {**_common("registered"), "path": str(Path(path)), "found": found}


def shipped(entry: dict[str, Any]) -> dict[str, Any]:
    """The record of a model shipped with the repository, from its manifest entry (files and sha256, the
    command and seed that made it); its quality card, if the manifest has one, goes to ``quality``."""
    manifest = {k: v for k, v in entry.items() if k not in ("card", "confusion_matrix")}
    return {
        **_common("shipped"),
        "data": entry.get("trained_on", entry.get("data", {})),
        "params": entry.get("arguments", {}),
        "seconds": entry.get("seconds"),
        "final_loss": entry.get("final_loss"),
        "manifest": manifest,
        **({"quality": entry["card"]} if entry.get("card") else {}),
    }
