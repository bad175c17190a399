"""A classifier split into spatial features and a decision network, and a context that freezes modules."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class SplitClassifier:
    """A classifier split into spatial features ``f`` and a decision network ``g``: logits = g(f(x))."""

    f: nn.Module
    g: nn.Module


class frozen:
    """Turn off parameter gradients of the given modules inside a ``with`` block, restoring them after."""

    def __init__(self, *modules: nn.Module | None):
        self.params = [p for m in modules if m is not None for p in m.parameters()]

    def __enter__(self) -> frozen:
        self.saved = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc: object) -> None:
        for p, flag in zip(self.params, self.saved, strict=True):
            p.requires_grad_(flag)
