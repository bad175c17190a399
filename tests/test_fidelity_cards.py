"""Every registered method and named variant has a fidelity card in docs/fidelity.md (issue 13)."""

import re
from pathlib import Path

from explain.methods import method_names, registered

CARDS = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"


def card_headings() -> set[str]:
    """The names in the cards' headings: ``## `name` `` or ``### `a`, `b` `` (variants share a card)."""
    names = set()
    for line in CARDS.read_text().splitlines():
        if line.startswith("## ") or line.startswith("### "):
            names.update(re.findall(r"`([^`]+)`", line))
    return names


def test_every_registered_method_and_variant_has_a_card():
    missing = sorted(set(method_names()) - card_headings())
    assert not missing, f"add a fidelity card to docs/fidelity.md for: {', '.join(missing)}"


def test_no_card_for_a_name_that_is_not_registered():
    stale = sorted(card_headings() - set(method_names()))
    assert not stale, f"docs/fidelity.md has cards for unregistered names: {', '.join(stale)}"


def test_a_method_card_has_its_component_table_and_a_variant_card_names_its_departures():
    text = CARDS.read_text()
    for name in method_names():
        entry = registered(name)
        heading = re.search(rf"^##+ .*`{re.escape(name)}`.*$", text, flags=re.M)
        body = text[heading.end() :].split("\n## ")[0].split("\n### ")[0]
        if entry.variant is None:
            assert "| Component |" in body and "same" in body, name
        else:
            assert "Differs" in body or "differs" in body, name
