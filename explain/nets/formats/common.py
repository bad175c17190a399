"""What the papers' own checkpoint formats share: reading a checkpoint safely, refusing broken files with a
message that names the fix, and the conversion cache keyed by the checkpoint's sha256.

The formats (one module each, rows of ``explain.nets.formats.FORMATS``): ``compvis_ldm`` (latent diffusion's
class-conditional LDM, what LDCE-cls uses), ``i2sb`` (an I2SB run, what RCSB uses), ``c3lt_generator`` (a
generator and encoder pair, what C3LT uses); ``openai_unet`` maps the openaimodel / guided-diffusion UNet onto
diffusers' UNets for the first two.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from explain.nets.formats import errors

CACHE_ENV = "FOIL_CONVERTED_MODELS"
DONE_NAME = "converted.json"


class FormatError(errors.FormatError):
    """``explain.nets.formats.FormatError`` from one message "problem; fix"."""

    def __init__(self, message: str):
        problem, _, fix = message.partition("; ")
        super().__init__(problem, fix.rstrip(".") or "give the model's original files")


def require_file(path: str | os.PathLike[str], what: str, fix: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise FormatError(f"{what} {str(file)!r} does not exist or is not a file; {fix}")
    if file.stat().st_size == 0:
        raise FormatError(f"{what} {str(file)!r} is empty (0 bytes); {fix}")
    return file


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | os.PathLike[str], what: str) -> Any:
    """``torch.load`` of a local checkpoint, weights only and memory-mapped (no second copy in memory); a
    truncated or foreign file is refused with its size and the fix."""
    file = require_file(path, what, "give the path of the checkpoint file as downloaded")
    size = file.stat().st_size
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise FormatError(_unreadable(file, what, size, error)) from error
    except Exception as error:
        raise FormatError(_unreadable(file, what, size, error)) from error
    try:  # the legacy (non-zip) format cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise FormatError(_unreadable(file, what, size, error)) from error


def _unreadable(file: Path, what: str, size: int, error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "weights_only" in str(error) or "Unsupported global" in str(error):
        return (
            f"{what} {str(file)!r} holds pickled Python objects besides tensors ({text}); Foil loads weights "
            "only. In a trusted environment re-save just the weights, e.g. torch.save({'state_dict': "
            "torch.load(path)['state_dict']}, path), and register that file"
        )
    return (
        f"{what} {str(file)!r} ({size} bytes) cannot be read as a torch checkpoint ({text}); the file is "
        "probably truncated or not a checkpoint: download it again and compare its sha256 with the "
        "published one"
    )


def default_cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "foil" / "converted")


def cached_conversion(
    kind: str,
    key: str,
    convert: Callable[[Path], dict],
    cache_root: str | os.PathLike[str] | None = None,
) -> Path:
    """The directory ``<cache_root>/<kind>-<key[:16]>``; ``convert(tmp_dir)`` writes it the first time
    (into a temporary directory renamed into place when complete, so a crash leaves no half cache) and returns
    a summary stored as ``converted.json``."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / f"{kind}-{key[:16]}"
    if (target / DONE_NAME).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
    try:
        summary = convert(work)
        (work / DONE_NAME).write_text(json.dumps({"kind": kind, "sha256": key, **summary}, indent=2))
        if target.exists():  # an incomplete directory from an interrupted run
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def conversion_summary(directory: str | os.PathLike[str]) -> dict:
    return json.loads((Path(directory) / DONE_NAME).read_text())
