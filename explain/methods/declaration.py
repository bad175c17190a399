"""What a counterfactual method is and what it needs, declared once beside its class, without torch.

Each method file holds a module-level ``MethodDeclaration(...)`` next to the method's class. The registry
(``explain.methods``) reads these declarations from the files' source, so the web process lists, validates
and plans methods without importing torch; the planner, the worker and the demo read the same declaration.
A declaration is written with literals and the names of this module only (the registry evaluates it alone).

A *variant* is a method run with some of its constructor's defaults (the paper's) overridden, under a name of
its own and with the reason written down; a study's condition names a method or a variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Scope = Literal["dataset", "classifier", "pair"]


@dataclass(frozen=True)
class Model:
    """A model the platform trains for a method: a Backbone kind, how widely it is shared, its trainer.

    ``scope``: "dataset" (one per data set), "classifier" (one per classifier of the data set; the trainer
    gets ``classifier`` as a parameter) or "pair" (one per classifier and class pair). ``trainer``:
    "module:function", called as ``function(*, dataset, **params)`` (per data set or classifier) or
    ``function(*, classifier, class_a, class_b, **params)`` (per pair), returning the Backbone row.
    """

    kind: str
    scope: Scope
    trainer: str


AUXILIARY = Model("auxiliary", "dataset", "explain.services.auxiliary:auxiliary_train")
AUTOENCODER = Model("autoencoder", "dataset", "explain.services.backbones:autoencoder_train")
DENOISER = Model("denoiser", "dataset", "explain.services.backbones:denoiser_train")
BRIDGE = Model("bridge", "dataset", "explain.services.backbones:bridge_train")
SAE = Model("sae", "classifier", "explain.services.backbones:sae_train")
C3LT_MAPS = Model("c3lt_maps", "pair", "explain.services.backbones:c3lt_maps_train")  # with its discriminator

MODELS: tuple[Model, ...] = (AUXILIARY, AUTOENCODER, DENOISER, BRIDGE, SAE, C3LT_MAPS)


@dataclass(frozen=True)
class Variant:
    """A method with some defaults overridden, registered as ``name``; ``reason`` says why it departs.

    ``demo_budget``: the `make demo` budget ("full" or "tiny") that runs this variant instead of the method.
    """

    name: str
    overrides: dict[str, Any]
    reason: str
    demo_budget: str | None = None


@dataclass(frozen=True)
class MethodDeclaration:
    """One method's facts.

    ``target``: "module:Class". ``kind``: "cell" (edits feature cells of a real distractor) or "generative"
    (synthesises the counterfactual; sees pixels / 255 with the classifier's normalisation as part of f).
    ``requires_flip``: False for an attribution whose regions are the stimulus whether or not they flip the
    decision. ``backbones``: trained models by constructor argument; ``optional``: those arguments the method
    runs without. ``aux``: the model handed to ``explain(aux=...)``. ``batch``: work units per Celery task.
    ``settings``: constructor argument -> Django setting (a local path) that must be set. ``setting_models``:
    those of the settings' arguments that name a model directory -> its Backbone kind: the worker loads it
    once per process, and a model of that kind registered for the data set (``manage.py register_backbone``)
    is used instead of the setting, which then need not be set.
    ``class_names``: the constructor argument that receives the data set's class names, in index order.
    ``execution``: arguments that size the computation (chunk sizes) without changing its result; setting
    them is no departure. ``half_precision``: on a GPU the worker may load the method's models in float16
    (``torch_dtype``); on a CPU they are always float32. ``tiles``: arguments that give the side, in pixels,
    of square cells which must tile the image (divide its height and width), as the authors' code reshapes
    the image into whole cells; the planner refuses a data set whose images they do not tile.
    """

    name: str
    target: str
    paper: str
    kind: Literal["cell", "generative"]
    requires_flip: bool = True
    backbones: dict[str, Model] = field(default_factory=dict)
    optional: frozenset[str] = frozenset()
    aux: Model | None = None
    batch: int = 1
    settings: dict[str, str] = field(default_factory=dict)
    setting_models: dict[str, str] = field(default_factory=dict)
    class_names: str | None = None
    execution: frozenset[str] = frozenset()
    half_precision: bool = False
    tiles: frozenset[str] = frozenset()
    variants: tuple[Variant, ...] = ()

    @property
    def models(self) -> tuple[Model, ...]:
        """Every model the method waits for: its backbones and its auxiliary model."""
        return (*self.backbones.values(), *((self.aux,) if self.aux else ()))

    @property
    def platform_arguments(self) -> frozenset[str]:
        """Constructor arguments the platform fills (models, settings, class names), never a config."""
        filled = {*self.backbones, *self.settings}
        return frozenset(filled | ({self.class_names} if self.class_names else set()))


def model_of(kind: str) -> Model:
    """The declared model of Backbone kind ``kind`` (its scope and trainer)."""
    for model in MODELS:
        if model.kind == kind:
            return model
    known = ", ".join(m.kind for m in MODELS)
    raise KeyError(f"the platform cannot train a {kind!r} model; it trains: {known}")
