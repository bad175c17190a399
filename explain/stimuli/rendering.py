"""Learning stimuli: the counterfactual region in focus, everything else blurred.

Vandenhende et al. (2022), sec. 4.4: "We highlight the image content from the counterfactual region, with all
other content being blurred." Functions take numpy arrays and return arrays or PNG bytes; nothing here knows
about methods, models or Django.

Images are (H, W) grey or (H, W, 3) RGB, either uint8 in [0, 255] or float. Masks are (H, W) in [0, 1], 1
where the image stays sharp: by default the paper's region, the first edit's (the same section: "the
learning phase visualizes the counterfactual generated from the first edit"), which
``Counterfactual.region_masks()`` gives and ``explain.precompute.worker.explain_arrays`` renders with
``stimulus_png``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage


def blur_outside(image: np.ndarray, mask: np.ndarray, sigma: float, *, feather: float = 0.0) -> np.ndarray:
    """``mask * image + (1 - mask) * gaussian_blur(image, sigma)``, same shape and dtype as ``image``.

    The blur is per channel (``scipy.ndimage.gaussian_filter``, ``mode="reflect"``). ``feather`` > 0 first
    blurs the mask with that sigma to soften its edges. ``sigma == 0`` returns a copy of the image. uint8
    results are rounded to the nearest integer.
    """
    _check_image(image)
    soft = _check_mask(mask, image.shape[:2])
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0 (0 means no blur), got {sigma}")
    if not np.isfinite(feather) or feather < 0:
        raise ValueError(
            f"feather must be a finite number >= 0 (0 keeps the mask's hard edges), got {feather}"
        )
    if sigma == 0:
        return image.copy()

    pixels = image.astype(np.float64)
    spatial = (sigma, sigma) if image.ndim == 2 else (sigma, sigma, 0.0)  # never blur across channels
    blurred = ndimage.gaussian_filter(pixels, spatial, mode="reflect")
    if feather > 0:
        soft = ndimage.gaussian_filter(soft, feather, mode="reflect")
    if image.ndim == 3:
        soft = soft[:, :, None]
    out = soft * pixels + (1.0 - soft) * blurred
    if image.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(image.dtype)


def stimulus_png(
    image: np.ndarray, mask: np.ndarray, sigma: float, *, scale: int = 1, feather: float = 0.0
) -> bytes:
    """The learning stimulus as PNG bytes, upscaled ``scale`` times by pixel repetition (nearest neighbour).

    The PNG holds only IHDR, IDAT and IEND chunks: no text or other metadata that could leak a label to
    raters.
    """
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    pixels = _as_uint8(blur_outside(image, mask, sigma, feather=feather))
    if scale > 1:
        pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"image must be (H, W) grey or (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image must be uint8 or float, got dtype {image.dtype}; convert it with .astype()")


def _check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The mask as float64 after checking its shape against the image's and its values against [0, 1]."""
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(
            f"mask has shape {mask.shape} but the image is {tuple(shape)} (H, W); they must match"
        )
    soft = mask.astype(np.float64)
    outside = ~((soft >= 0.0) & (soft <= 1.0))  # also catches NaN
    if outside.any():
        bad = soft[outside].flat[0]
        raise ValueError(f"mask values must lie in [0, 1]; found {bad} ({int(outside.sum())} values outside)")
    return soft


def _as_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 pixels; float arrays are taken to lie in [0, 1] and are scaled by 255 and rounded."""
    if array.dtype == np.uint8:
        return array
    if not np.all((array >= 0.0) & (array <= 1.0)):
        raise ValueError(
            f"float images must lie in [0, 1] to be shown, found values in [{np.nanmin(array)}, "
            f"{np.nanmax(array)}]; rescale it, or pass uint8 pixels"
        )
    return np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
