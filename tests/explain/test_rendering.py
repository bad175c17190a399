"""explain.stimuli.rendering against plain per-pixel reference loops on fresh random images."""

import io
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explain.stimuli.rendering import (
    blur_outside,
    stimulus_png,
)


def reference_gaussian(channel: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur as scipy defines it (truncate=4, mode="reflect"), one output pixel at a time."""
    radius = int(4.0 * sigma + 0.5)
    taps = [math.exp(-0.5 * t * t / (sigma * sigma)) for t in range(-radius, radius + 1)]
    total = sum(taps)
    taps = [t / total for t in taps]
    height, width = channel.shape

    def reflect(i: int, n: int) -> int:  # d c b a | a b c d | d c b a, repeated as often as needed
        i %= 2 * n
        return 2 * n - 1 - i if i >= n else i

    out = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            value = 0.0
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    pixel = channel[reflect(y + dy, height), reflect(x + dx, width)]
                    value += taps[dy + radius] * taps[dx + radius] * pixel
            out[y, x] = value
    return out


def reference_blur_outside(image: np.ndarray, mask: np.ndarray, sigma: float, feather: float) -> np.ndarray:
    """mask * image + (1 - mask) * blur(image), pixel by pixel, in float64."""
    pixels = image.astype(np.float64)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    soft = mask.astype(np.float64)
    if feather > 0:
        soft = reference_gaussian(soft, feather)
    blurred = np.stack([reference_gaussian(pixels[:, :, k], sigma) for k in range(pixels.shape[2])], axis=-1)
    out = np.zeros_like(pixels)
    for y in range(pixels.shape[0]):
        for x in range(pixels.shape[1]):
            for k in range(pixels.shape[2]):
                out[y, x, k] = soft[y, x] * pixels[y, x, k] + (1 - soft[y, x]) * blurred[y, x, k]
    return out.reshape(image.shape)


def random_image(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return rng.random(shape).astype(dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("soft", [False, True])
def test_blur_outside_matches_reference(seed, channels, soft):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(4, 9, size=2)
    shape = (height, width) if channels is None else (height, width, channels)
    sigma = float(rng.uniform(0.5, 2.5))  # at 2.5 the kernel is wider than the image: repeated reflection
    mask = rng.random((height, width)) if soft else (rng.random((height, width)) < 0.4).astype(np.float32)
    for dtype in ("float64", "float32"):
        image = random_image(rng, shape, dtype)
        got = blur_outside(image, mask, sigma)
        assert got.dtype == image.dtype and got.shape == image.shape
        tol = 1e-10 if dtype == "float64" else 1e-6
        np.testing.assert_allclose(got, reference_blur_outside(image, mask, sigma, 0.0), atol=tol)
    image = random_image(rng, shape, "uint8")
    got = blur_outside(image, mask, sigma)
    assert got.dtype == np.uint8 and got.shape == image.shape
    expected = reference_blur_outside(image, mask, sigma, 0.0)
    assert np.abs(got.astype(np.float64) - expected).max() <= 0.5 + 1e-9  # rounded to the nearest integer


@pytest.mark.parametrize("seed", [3, 4])
def test_feathered_blur_matches_reference(seed):
    rng = np.random.default_rng(seed)
    image = rng.random((6, 7, 3))
    mask = (rng.random((6, 7)) < 0.5).astype(np.float64)
    got = blur_outside(image, mask, 1.5, feather=0.8)
    np.testing.assert_allclose(got, reference_blur_outside(image, mask, 1.5, 0.8), atol=1e-10)


@pytest.mark.parametrize("seed", [5, 6])
def test_binary_mask_keeps_inside_pixels_and_blurs_outside(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    mask = rng.random((12, 10)) < 0.5
    got = blur_outside(image, mask, 2.0)
    np.testing.assert_array_equal(got[mask], image[mask])
    assert not np.array_equal(got[~mask], image[~mask])


def test_sigma_zero_is_a_copy():
    image = np.random.default_rng(7).integers(0, 256, size=(5, 6), dtype=np.uint8)
    got = blur_outside(image, np.zeros((5, 6)), 0.0)
    np.testing.assert_array_equal(got, image)
    assert got is not image and not np.shares_memory(got, image)


def test_mismatched_shapes_name_both():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        blur_outside(np.zeros((4, 6, 3), np.uint8), np.zeros((4, 5)), 1.0)


def test_negative_sigma_names_value():
    with pytest.raises(ValueError, match="-0.5"):
        blur_outside(np.zeros((4, 4)), np.zeros((4, 4)), -0.5)


@pytest.mark.parametrize("bad", [1.5, -0.1, np.nan])
def test_mask_outside_unit_interval(bad):
    mask = np.zeros((3, 3))
    mask[1, 1] = bad
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        blur_outside(np.zeros((3, 3)), mask, 1.0)


def test_rejects_other_images():
    with pytest.raises(ValueError, match="shape"):
        blur_outside(np.zeros((4, 4, 2)), np.zeros((4, 4)), 1.0)
    with pytest.raises(ValueError, match="int64"):
        blur_outside(np.zeros((4, 4), np.int64), np.zeros((4, 4)), 1.0)


def png_chunk_types(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    types, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        types.append(data[offset + 4 : offset + 8])
        offset += 12 + length
    return types


@pytest.mark.parametrize("scale", [1, 4])
@pytest.mark.parametrize("channels", [None, 3])
def test_png_decodes_to_the_stimulus_and_carries_no_text(scale, channels):
    rng = np.random.default_rng(8)
    shape = (28, 28) if channels is None else (28, 28, 3)
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    mask = np.zeros((28, 28))
    mask[5:15, 8:20] = 1
    data = stimulus_png(image, mask, 1.5, scale=scale)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.info == {} and decoded.text == {}
    assert png_chunk_types(data) in ([b"IHDR", b"IDAT", b"IEND"], [b"IHDR", b"IDAT", b"IDAT", b"IEND"])
    pixels = np.asarray(decoded)
    assert pixels.shape[:2] == (28 * scale, 28 * scale)
    expected = blur_outside(image, mask, 1.5)
    np.testing.assert_array_equal(pixels[::scale, ::scale], expected)
    for dy in range(scale):  # nearest neighbour: every pixel of a block is the source pixel
        for dx in range(scale):
            np.testing.assert_array_equal(pixels[dy::scale, dx::scale], expected)


@pytest.mark.parametrize("scale", [0, 2.0, True])
def test_png_scale_must_be_positive_integer(scale):
    with pytest.raises(ValueError, match="scale"):
        stimulus_png(np.zeros((4, 4), np.uint8), np.zeros((4, 4)), 1.0, scale=scale)


def test_imports_without_django():
    code = "import sys, explain.stimuli.rendering; sys.exit('django' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={"PYTHONPATH": str(root)})
