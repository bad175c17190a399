"""One provenance record for every model: the same keys whether trained, registered or shipped, and the loss
curve thinned to at most 200 points without losing the first value."""

import random

import pytest

from explain.services import provenance

COMMON = {"source", "code_version", "torch"}
TRAINED = COMMON | {"data", "params", "seconds", "final_loss", "loss_curve", "loss_curve_stride", "loss_unit"}


def _reference_thinning(losses: list[float], points: int) -> list[float]:
    """Every k-th value, with the smallest k that leaves at most ``points`` values."""
    k = 1
    while len(range(0, len(losses), k)) > points:
        k += 1
    return [losses[i] for i in range(0, len(losses), k)]


@pytest.mark.parametrize("seed", range(5))
def test_thinning_matches_the_plain_reference(seed):
    rng = random.Random(seed)
    for _ in range(40):
        losses = [rng.random() for _ in range(rng.randint(1, 2000))]
        curve, stride = provenance.thinned(losses)
        assert curve == _reference_thinning(losses, provenance.CURVE_POINTS)
        assert curve[0] == losses[0] and len(curve) <= provenance.CURVE_POINTS
        assert curve == losses[::stride]


def test_the_three_sources_share_one_record():
    trained = provenance.trained(data={"images": 3}, params={"seed": 1}, seconds=2.04, losses=[3.0, 2.0, 1.5])
    assert TRAINED <= set(trained) and trained["source"] == "trained" and trained["final_loss"] == 1.5
    registered = provenance.registered("/models/vgg.pt", num_classes=200)
    assert COMMON <= set(registered) and registered["found"] == {"num_classes": 200}
    entry = {
        "arguments": {"steps": 9, "seed": 0}, "seconds": 5.0, "final_loss": 0.2, "trained_on": {"count": 9},
        "command": ["python", "-m", "explain.shipped.train"], "card": {"passed": True},
    }  # fmt: skip
    shipped = provenance.shipped(entry)
    assert TRAINED - {"loss_curve", "loss_curve_stride", "loss_unit"} <= set(shipped)
    assert shipped["params"]["steps"] == 9 and shipped["quality"] == {"passed": True}
    assert "card" not in shipped["manifest"]


def test_no_losses_is_recorded_as_no_final_loss():
    assert provenance.trained(data={}, params={}, seconds=0, losses=[])["final_loss"] is None
