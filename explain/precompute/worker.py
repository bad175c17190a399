"""The worker side of precompute: models loaded once per process on the right device, and image tensors.

A Celery worker on the ``explain`` queue runs one task at a time (solo pool: CUDA is not fork-safe) and keeps
what it loaded here, keyed by the row and the file's modification time, so a retrained checkpoint is reloaded
and an unchanged one never is. The GPU is used when there is one, the CPU otherwise (``FOIL_DEVICE`` forces
one); the device's name is recorded with every result.

This module imports torch; the web process never imports it (``explain.precompute`` imports it lazily).
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from django.conf import settings
from PIL import Image as PILImage
from torch import nn

from explain.methods import method_class, registered
from explain.methods.base import Counterfactual, CounterfactualMethod
from explain.models import Backbone, Classifier, Image
from explain.nets.split import SplitClassifier
from explain.stimuli.metrics import keypoint_metrics
from explain.stimuli.rendering import stimulus_png

_CACHE: dict[tuple, Any] = {}


def device() -> torch.device:
    """``FOIL_DEVICE`` when set (e.g. ``cpu``, ``cuda:1``), else the first GPU when present, else the CPU."""
    wanted = os.environ.get("FOIL_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    """The device as recorded with results: ``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    dev = device()
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(dev)


def cache_clear() -> None:
    """Forget every loaded model (tests; a worker never needs to)."""
    _CACHE.clear()


def _cached(key: tuple, load: Callable[[], Any], family: int = 2) -> Any:
    """The value under ``key``, loaded once. Entries that share its first ``family`` parts (the same row in
    another version: its file changed, or another device or dtype) are dropped before a load, so a process
    never holds two copies of one model."""
    if key not in _CACHE:
        for stale in [k for k in _CACHE if k[:family] == key[:family]]:
            del _CACHE[stale]
        _CACHE[key] = load()
    return _CACHE[key]


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


def in_channels(classifier: Classifier) -> int:
    """How many channels the classifier takes: 1 for grey data sets (Fashion-MNIST), 3 for colour."""
    return classifier.in_channels


def classifier_split(classifier: Classifier) -> SplitClassifier:
    """The classifier split into f and g, in eval mode on ``device()``, loaded once per process."""
    from explain.nets.classifiers import split_classifier
    from explain.selectors import classifier_model

    def load() -> SplitClassifier:
        model = classifier_model(classifier)
        model.eval().to(device())
        return split_classifier(model, classifier.architecture)

    key = ("classifier", classifier.pk, classifier.checkpoint_path, _mtime(classifier.checkpoint_path))
    return _cached(key, load)


def auxiliary(backbone: Backbone) -> nn.Module:
    """The auxiliary embedding u(.) of a Backbone row, in eval mode on ``device()``, loaded once."""
    from explain.selectors import auxiliary_model

    key = ("auxiliary", backbone.pk, backbone.path, _mtime(backbone.path))
    return _cached(key, lambda: auxiliary_model(backbone).eval().to(device()))


class _Normalise(nn.Module):
    """(x - mean) / std per channel: the classifier's normalisation as the first layer of f."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def generative_classifier(classifier: Classifier, device: torch.device | None = None) -> SplitClassifier:
    """The classifier as the generative methods see it: input pixels / 255 in [0, 1], its normalisation
    (if any) the first layer of f. Their backbones are trained on that scale, once per data set."""
    dev = device if device is not None else globals()["device"]()

    from explain.nets.classifiers import split_classifier
    from explain.selectors import classifier_model

    def load() -> SplitClassifier:
        split = split_classifier(classifier_model(classifier).eval(), classifier.architecture)
        norm = classifier.normalisation
        f = split.f
        if norm.get("mean") and norm.get("std"):
            f = nn.Sequential(_Normalise(norm["mean"], norm["std"]), f)
        return SplitClassifier(f=f.eval().to(dev), g=split.g.eval().to(dev))

    path = classifier.checkpoint_path
    key = ("generative_classifier", classifier.pk, path, _mtime(path), str(dev))
    return _cached(key, load)


def backbone_dtype(half_precision: bool, dev: torch.device) -> torch.dtype:
    """float16 where the method allows it (its declaration's ``half_precision``) on a GPU; float32 otherwise,
    always on a CPU."""
    return torch.float16 if half_precision and dev.type == "cuda" else torch.float32


def load_backbone(backbone: Backbone, *, half_precision: bool = False) -> Any:
    """A generative backbone from its local files, in the format it was registered with (the platform's own
    for one it trained; ``explain.nets.formats``), on ``device()``, loaded once per process: read into CPU
    memory once and moved, so one copy is held (the previous version of the row is dropped first)."""
    from explain.nets.formats import DEFAULT_FORMATS, backbone_load, place

    dev = device()
    dtype = backbone_dtype(half_precision, dev)
    name = backbone.config.get("format") or DEFAULT_FORMATS.get(backbone.kind)
    if name is None:
        raise ValueError(
            f"backbone {backbone.name!r} is a {backbone.kind} model, which no generative method loads"
        )

    def load() -> Any:
        model = backbone_load(name, backbone.path, backbone.config.get("options"), dtype=dtype)
        return place(model, dev)

    path = backbone.path
    key = ("backbone", backbone.pk, path, _mtime(path), str(dev), str(dtype))
    return _cached(key, load)


def setting_model(kind: str, path: str, *, half_precision: bool = False) -> Any:
    """The model directory a setting names (e.g. ``FOIL_STABLE_DIFFUSION_PATH``), in the kind's default
    format, loaded once per process."""
    from explain.nets.formats import DEFAULT_FORMATS, backbone_load, place

    dev = device()
    dtype = backbone_dtype(half_precision, dev)
    key = ("setting", path, _mtime(path), str(dev), str(dtype))
    return _cached(key, lambda: place(backbone_load(DEFAULT_FORMATS[kind], path, dtype=dtype), dev))


def registered_backbone(dataset_id: int, kind: str) -> Backbone | None:
    """The data set's registered model of ``kind`` (``manage.py register_backbone``), newest first."""
    from explain.selectors import backbones_preferred

    rows = Backbone.objects.filter(dataset=dataset_id, kind=kind, config__registered=True)
    return backbones_preferred(rows).first()


def build_method(
    method_name: str,
    method_config: dict[str, Any],
    *,
    classifier: Classifier,
    backbones: dict[str, Backbone] | None = None,
) -> CounterfactualMethod:
    """The method or variant ``method_name`` with its hyperparameters (the variant's overrides, then
    ``method_config``, over the papers' defaults) and the arguments its declaration has the platform fill:
    its loaded backbones (``backbones``: Backbone rows by kind), settings and the data set's class names.

    A model that was trained in the space of an autoencoder (C3LT's maps, LDCE-cls's denoiser: their
    config's "autoencoder") is used with that autoencoder."""
    entry = registered(method_name)
    declared = entry.declaration
    backbones = dict(backbones or {})
    for argument, model in declared.backbones.items():
        if model.kind not in backbones and argument not in declared.optional:
            raise ValueError(
                f"method {method_name!r} needs a {model.kind} model for its {argument!r} argument and none "
                "was given; plan the study again so that the platform trains one"
            )
    wants_autoencoder = any(m.kind == Backbone.Kind.AUTOENCODER for m in declared.backbones.values())
    for partner in list(backbones.values()):
        if wants_autoencoder and partner.config.get("autoencoder"):
            backbones[Backbone.Kind.AUTOENCODER] = Backbone.objects.get(pk=partner.config["autoencoder"])
    kwargs: dict[str, Any] = {}
    half = declared.half_precision
    for argument, model in declared.backbones.items():
        if model.kind in backbones:
            kwargs[argument] = load_backbone(backbones[model.kind], half_precision=half)
    for argument, setting in declared.settings.items():
        kwargs[argument] = getattr(settings, setting)
        kind = declared.setting_models.get(argument)
        if kind:  # a model directory: the data set's registered one, else the setting's, loaded once
            row = registered_backbone(classifier.dataset_id, kind)
            if row is not None:
                kwargs[argument] = load_backbone(row, half_precision=half)
            elif kwargs[argument]:
                kwargs[argument] = setting_model(kind, kwargs[argument], half_precision=half)
    if declared.class_names:
        kwargs[declared.class_names] = list(
            classifier.dataset.classes.order_by("index").values_list("name", flat=True)
        )
    config = {**entry.config(), **method_config}
    clashes = sorted(declared.platform_arguments & set(config))
    if clashes:
        raise ValueError(
            f"method_config of {method_name!r} sets {', '.join(clashes)}, which the platform fills from the "
            "study's models; remove them from method_config"
        )
    return method_class(method_name)(**kwargs, **config)


def generative_metrics(
    model: SplitClassifier, x: torch.Tensor, cf: Counterfactual, class_a: int, class_b: int
) -> dict[str, Any]:
    """COUT, L1, NFE and region area of a generative counterfactual, under the keys stored with it.

    ``nfe``: evaluations of the method's generative network (its largest count other than the classifier's;
    RCSB and LDCE: U-Net passes); every network's count is kept as ``nfe_<network>``.
    """
    from explain.methods.generative import cout

    x_cf = torch.from_numpy(np.asarray(cf.image, dtype=np.float32)).unsqueeze(0).to(x.device)
    timings = cf.timings
    nfe = {k: int(v) for k, v in timings.items() if k.startswith("nfe_")}
    generators = [v for k, v in nfe.items() if k != "nfe_classifier"]
    metrics: dict[str, Any] = {
        "cout": cout(model, x, x_cf, class_a, class_b),
        "l1": float(timings.get("l1", float((x - x_cf).abs().mean()))),
        "region_area": float(timings.get("region_area", float(np.mean(cf.query_mask)))),
        "nfe": max(generators) if generators else 0,
        **nfe,
    }
    threshold = timings.get("region_threshold")
    if threshold is not None and not math.isnan(threshold):
        metrics["region_threshold"] = float(threshold)
    return metrics


def image_array(image: Image, classifier: Classifier) -> np.ndarray:
    """The image as uint8 pixels at the classifier's input size: (H, W) grey or (H, W, 3) RGB."""
    from explain.selectors import image_array as stored_pixels

    pixels = stored_pixels(image)
    grey = in_channels(classifier) == 1
    if (pixels.ndim == 2) != grey or pixels.shape[:2] != (classifier.input_size, classifier.input_size):
        pil = PILImage.fromarray(pixels).convert("L" if grey else "RGB")
        pil = pil.resize((classifier.input_size, classifier.input_size), PILImage.Resampling.BILINEAR)
        pixels = np.asarray(pil)
    return pixels


def to_tensor(pixels: np.ndarray, classifier: Classifier) -> torch.Tensor:
    """(1, C, H, W) float on ``device()``: pixels / 255, then the classifier's mean/std normalisation."""
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    norm = classifier.normalisation
    if norm.get("mean") and norm.get("std"):
        mean = torch.tensor(norm["mean"], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(norm["std"], dtype=torch.float32).view(-1, 1, 1)
        x = (x - mean) / std
    return x.unsqueeze(0).to(device())


def unit_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(1, C, H, W) float on ``device()``: pixels / 255, no normalisation (the generative methods' input)."""
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    return x.unsqueeze(0).to(device())


def display_scale(size: int, side: int = 224) -> int:
    """How many times to upscale an image of ``size`` pixels so that people can read it (about ``side``)."""
    return max(1, math.ceil(side / size))


# ----------------------------------------------------------------------------------------------------
# Explaining one image pair: the numerical part of an explanation unit.


@dataclass
class PairResult:
    """What an explanation unit produces: files as bytes, metrics and timings, or why it was unexplainable."""

    unexplainable: str | None = None
    counterfactual: Counterfactual | None = None
    query_png: bytes = b""
    distractor_png: bytes = b""
    counterfactual_png: bytes = b""
    masks_npz: bytes = b""
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _png(pixels: np.ndarray, scale: int) -> bytes:
    if scale > 1:
        pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _as_pixels(image: np.ndarray) -> np.ndarray:
    """A synthesised counterfactual as uint8 (H, W) or (H, W, 3); accepts (C, H, W) and floats in [0, 1]."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        array = np.rint(np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    return array


def _feature_cosine(fq: torch.Tensor, fd: torch.Tensor, query_cell: int, distractor_cell: int) -> float:
    """Cosine between the query's and the distractor's feature cells of an edit (flattened (1, d, h, w))."""
    a = fq.flatten(2)[0, :, query_cell]
    b = fd.flatten(2)[0, :, distractor_cell]
    return float(nn.functional.cosine_similarity(a, b, dim=0))


STIMULUS_REGIONS = ("first-edit", "all-edits")  # studies.models.Study.StimulusRegion's values


def _json_safe(numbers: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities (e.g. RCSB's region threshold, which it has none of) as None: JSON has no NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in numbers.items()}


def explain_arrays(
    *,
    model: SplitClassifier,
    method: CounterfactualMethod,
    query: np.ndarray,
    distractor: np.ndarray,
    to_input: Callable[[np.ndarray], torch.Tensor],
    class_a: int,
    class_b: int,
    seed: int,
    blur_sigma: float,
    stimulus_region: str = "first-edit",
    aux: nn.Module | None = None,
    query_keypoints: dict | None = None,
    distractor_keypoints: dict | None = None,
    requires_flip: bool = True,
) -> PairResult:
    """Explain why ``query`` (class A) is not class B with ``distractor``, and render the learning stimulus.

    Only correctly classified images are explained; a pair whose query or distractor the classifier gets
    wrong, or whose edits do not flip the decision (when the method's declaration ``requires_flip``), comes
    back ``unexplainable`` with the reason. The stimulus is upscaled to about 224 px and ``blur_sigma`` is
    in pixels of that displayed image. ``stimulus_region`` says what is sharp: "first-edit" (the paper's
    stimulus, ``Counterfactual.region_masks()``: the first edit's query cell and the distractor cell it took;
    a generative method's region, on both sides) or "all-edits" (every edited cell).
    """
    start = time.perf_counter()
    xq, xd = to_input(query), to_input(distractor)
    features, timings, refused = _classified(model, xq, xd, class_a, class_b)
    timings["classify_s"] = time.perf_counter() - start
    if refused:
        return refused
    start = time.perf_counter()
    generator = torch.Generator(device=xq.device).manual_seed(seed)
    cf = method.explain(model, xq, class_b, xd, aux=aux, generator=generator)
    timings["explain_s"] = time.perf_counter() - start
    return _finish_pair(
        model=model,
        cf=cf,
        query=query,
        distractor=distractor,
        xq=xq,
        xd=xd,
        features=features,
        class_a=class_a,
        class_b=class_b,
        blur_sigma=blur_sigma,
        stimulus_region=stimulus_region,
        aux=aux,
        query_keypoints=query_keypoints,
        distractor_keypoints=distractor_keypoints,
        requires_flip=requires_flip,
        timings=timings,
    )


def _classified(
    model: SplitClassifier, xq: torch.Tensor, xd: torch.Tensor, class_a: int, class_b: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, float], PairResult | None]:
    """((f(query), f(distractor)), timings, None), or the unexplainable result as the third when either
    image is misclassified."""
    with torch.no_grad():
        fq, fd = model.f(xq), model.f(xd)
        pred_q, pred_d = int(model.g(fq).argmax()), int(model.g(fd).argmax())
    timings: dict[str, float] = {}
    if pred_q != class_a:
        return (
            (fq, fd),
            timings,
            PairResult(
                unexplainable=f"the query image is classified as class index {pred_q}, not class A "
                f"(index {class_a}): only correctly classified images are explained",
                timings=timings,
            ),
        )
    if pred_d != class_b:
        return (
            (fq, fd),
            timings,
            PairResult(
                unexplainable=f"the distractor image is classified as class index {pred_d}, not class B "
                f"(index {class_b}): only correctly classified images are used",
                timings=timings,
            ),
        )
    return (fq, fd), timings, None


@dataclass
class PairArrays:
    """One image pair of ``explain_arrays_batch``: pixels, classes, the unit's seed and keypoints."""

    query: np.ndarray
    distractor: np.ndarray
    class_a: int
    class_b: int
    seed: int
    query_keypoints: dict | None = None
    distractor_keypoints: dict | None = None


def explain_arrays_batch(
    *,
    model: SplitClassifier,
    method: CounterfactualMethod,
    pairs: list[PairArrays],
    to_input: Callable[[np.ndarray], torch.Tensor],
    blur_sigma: float,
    stimulus_region: str = "first-edit",
    requires_flip: bool = True,
) -> list[PairResult]:
    """``explain_arrays`` for several pairs of a generative method in one ``explain_batch``.

    Each pair keeps its own seed (``explain_batch(generators=...)``: pair i's noise is drawn from its own
    generator, before any batch work), so each result is the one ``explain_arrays`` gives that pair alone
    up to the float rounding of batched network passes (which SLC's and RCSB's Adam steps can amplify: see
    ``GenerativeMethod.explain_batch``). Misclassified pairs are refused as there, and left out of the
    batch; ``explain_s`` is the batch's time per explained pair."""
    results: list[PairResult | None] = [None] * len(pairs)
    ready = []
    for index, pair in enumerate(pairs):
        start = time.perf_counter()
        xq, xd = to_input(pair.query), to_input(pair.distractor)
        features, timings, refused = _classified(model, xq, xd, pair.class_a, pair.class_b)
        timings["classify_s"] = time.perf_counter() - start
        if refused:
            results[index] = refused
        else:
            ready.append((index, xq, xd, features, timings))
    if ready:
        start = time.perf_counter()
        cfs = method.explain_batch(
            model,
            torch.cat([xq for _, xq, *_ in ready]),
            [pairs[index].class_b for index, *_ in ready],
            generators=[
                torch.Generator(device=xq.device).manual_seed(pairs[index].seed) for index, xq, *_ in ready
            ],
        )
        explain_s = (time.perf_counter() - start) / len(ready)
        for (index, xq, xd, features, timings), cf in zip(ready, cfs, strict=True):
            pair = pairs[index]
            results[index] = _finish_pair(
                model=model,
                cf=cf,
                query=pair.query,
                distractor=pair.distractor,
                xq=xq,
                xd=xd,
                features=features,
                class_a=pair.class_a,
                class_b=pair.class_b,
                blur_sigma=blur_sigma,
                stimulus_region=stimulus_region,
                aux=None,
                query_keypoints=pair.query_keypoints,
                distractor_keypoints=pair.distractor_keypoints,
                requires_flip=requires_flip,
                timings={**timings, "explain_s": explain_s},
            )
    return results


def _finish_pair(
    *,
    model: SplitClassifier,
    cf: Counterfactual,
    query: np.ndarray,
    distractor: np.ndarray,
    xq: torch.Tensor,
    xd: torch.Tensor,
    features: tuple[torch.Tensor, torch.Tensor],
    class_a: int,
    class_b: int,
    blur_sigma: float,
    stimulus_region: str,
    aux: nn.Module | None,
    query_keypoints: dict | None,
    distractor_keypoints: dict | None,
    requires_flip: bool,
    timings: dict[str, float],
) -> PairResult:
    """Metrics, stimuli and masks of an explained pair (``explain_arrays``)."""
    fq, fd = features
    metrics: dict[str, Any] = {"flipped": bool(cf.flipped), "n_edits": len(cf.edits)}
    if cf.scores:
        metrics["final_score"] = float(cf.scores[-1])
    metrics.update(getattr(cf, "metrics", None) or {})  # e.g. cout of a generative method
    if not cf.flipped and requires_flip:
        return PairResult(
            unexplainable=f"{cf.method} did not flip the decision to class B "
            f"({len(cf.edits)} edits, the method's cap)",
            counterfactual=cf,
            metrics=metrics,
            timings=_json_safe({**timings, **cf.timings}),
        )

    if cf.image is not None:  # a generative counterfactual: its quality measures, and COUT to rank it by
        metrics.update(generative_metrics(model, xq, cf, class_a, class_b))
        metrics["selection_score"] = metrics["cout"]
        metrics["selection_score_source"] = "COUT of the counterfactual"

    grid = tuple(fq.shape[-2:])
    size = tuple(query.shape[:2])
    if cf.edits and query_keypoints and distractor_keypoints:
        shapes = [tuple(distractor.shape[:2])]
        metrics.update(
            keypoint_metrics(cf.edits, query_keypoints, [distractor_keypoints], grid, size, shapes)
        )
        metrics["selection_score"] = metrics["same_kp_first"]
        metrics["selection_score_source"] = "Same-KP of the first edit"
    elif cf.edits:
        first = cf.edits[0]
        with torch.no_grad():
            cells_q, cells_d = (aux.cells(xq), aux.cells(xd)) if aux is not None else (fq, fd)
        metrics["selection_score"] = _feature_cosine(
            cells_q, cells_d, first.query_cell, first.distractor_cell
        )
        metrics["selection_score_source"] = (
            "proxy: cosine of the first edit's query and distractor cells in the "
            + ("auxiliary model" if aux is not None else "classifier's features")
        )

    start = time.perf_counter()
    scale = display_scale(max(size))
    sigma = blur_sigma / scale  # blur at native resolution, so sigma is in pixels of the displayed stimulus
    result = PairResult(counterfactual=cf, metrics=metrics)
    if stimulus_region not in STIMULUS_REGIONS:
        raise ValueError(f"stimulus_region must be one of {STIMULUS_REGIONS}, not {stimulus_region!r}")
    query_mask, shown, distractor_mask = cf.region_masks(all_edits=stimulus_region == "all-edits")
    result.query_png = stimulus_png(query, query_mask, sigma, scale=scale)
    if cf.image is not None:
        synthesised = _as_pixels(cf.image)
        result.distractor_png = stimulus_png(synthesised, cf.query_mask, sigma, scale=scale)
        result.counterfactual_png = _png(synthesised, scale)
    else:
        if shown != 0:
            raise ValueError(f"the stimulus shows distractor {shown}, but only distractor 0 was given")
        result.distractor_png = stimulus_png(distractor, distractor_mask, sigma, scale=scale)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        query_mask=cf.query_mask.astype(np.float32),
        distractor_masks=(
            np.stack(cf.distractor_masks).astype(np.float32)
            if cf.distractor_masks  # a generative method has none: its class-B side is synthesised
            else np.zeros((0, *cf.query_mask.shape), dtype=np.float32)
        ),
        # what the stimulus shows sharp (``stimulus_region``), query side and class-B side
        shown_query_mask=query_mask.astype(np.float32),
        shown_distractor_mask=(cf.query_mask if cf.image is not None else distractor_mask).astype(np.float32),
    )
    result.masks_npz = buffer.getvalue()
    timings["render_s"] = time.perf_counter() - start
    result.timings = _json_safe({**timings, **cf.timings})
    return result


def explain_pair(
    *,
    classifier: Classifier,
    method_name: str,
    method_config: dict[str, Any],
    query_image: Image,
    distractor_image: Image,
    class_a: int,
    class_b: int,
    seed: int,
    blur_sigma: float,
    stimulus_region: str = "first-edit",
    aux_backbone: Backbone | None = None,
    backbones: dict[str, Backbone] | None = None,
) -> PairResult:
    """``explain_arrays`` for two Image rows, with the classifier, auxiliary model and the generative
    method's ``backbones`` (Backbone rows by kind) from the cache. A generative method reads pixels / 255
    and sees the classifier's normalisation as part of f (``generative_classifier``)."""
    start = time.perf_counter()
    declared = registered(method_name).declaration
    generative = declared.kind == "generative"
    model = generative_classifier(classifier) if generative else classifier_split(classifier)
    aux = auxiliary(aux_backbone) if aux_backbone is not None else None
    method = build_method(method_name, method_config, classifier=classifier, backbones=backbones)
    query, distractor = image_array(query_image, classifier), image_array(distractor_image, classifier)
    load_s = time.perf_counter() - start
    result = explain_arrays(
        model=model,
        method=method,
        query=query,
        distractor=distractor,
        to_input=(lambda pixels: unit_tensor(pixels)) if generative else (lambda p: to_tensor(p, classifier)),
        class_a=class_a,
        class_b=class_b,
        seed=seed,
        blur_sigma=blur_sigma,
        stimulus_region=stimulus_region,
        aux=aux,
        query_keypoints=query_image.keypoints,
        distractor_keypoints=distractor_image.keypoints,
        requires_flip=declared.requires_flip,
    )
    result.timings["load_s"] = load_s
    return result


@dataclass
class PairImages:
    """One image pair of ``explain_pairs``: the rows, the class indices and the unit's seed."""

    query_image: Image
    distractor_image: Image
    class_a: int
    class_b: int
    seed: int


def explain_pairs(
    *,
    classifier: Classifier,
    method_name: str,
    method_config: dict[str, Any],
    pairs: list[PairImages],
    blur_sigma: float,
    stimulus_region: str = "first-edit",
    backbones: dict[str, Backbone] | None = None,
) -> list[PairResult]:
    """``explain_pair`` for several pairs of one generative method and one set of models, in one
    ``explain_batch`` (``explain_arrays_batch``): each pair keeps its seed."""
    start = time.perf_counter()
    declared = registered(method_name).declaration
    if declared.kind != "generative":
        raise ValueError(f"explain_pairs batches generative methods; {method_name!r} is {declared.kind}")
    model = generative_classifier(classifier)
    method = build_method(method_name, method_config, classifier=classifier, backbones=backbones)
    arrays = [
        PairArrays(
            query=image_array(pair.query_image, classifier),
            distractor=image_array(pair.distractor_image, classifier),
            class_a=pair.class_a,
            class_b=pair.class_b,
            seed=pair.seed,
            query_keypoints=pair.query_image.keypoints,
            distractor_keypoints=pair.distractor_image.keypoints,
        )
        for pair in pairs
    ]
    load_s = (time.perf_counter() - start) / len(pairs)
    results = explain_arrays_batch(
        model=model,
        method=method,
        pairs=arrays,
        to_input=unit_tensor,
        blur_sigma=blur_sigma,
        stimulus_region=stimulus_region,
        requires_flip=declared.requires_flip,
    )
    for result in results:
        result.timings["load_s"] = load_s
    return results
