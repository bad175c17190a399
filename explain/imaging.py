"""Image bytes as raters receive them: PNG with no metadata (no text chunks, no EXIF, no file names).

Stimuli and data set images are stripped once, when they are stored (``MetadataFreeImageField``), so the rater
pages send the stored file as it is.
"""

import io
import struct
from pathlib import PurePosixPath

from django.core.files.base import ContentFile
from django.db import models
from django.db.models.fields.files import FieldFile
from PIL import Image as PILImage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The chunks a PNG needs to look right; everything else (tEXt, iTXt, zTXt, eXIf, tIME, ...) is dropped.
KEPT_PNG_CHUNKS = {b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"gAMA", b"sRGB", b"cHRM"}


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk of a PNG file; ValueError when ``data`` is not a well-formed PNG."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"not a PNG file (starts with {data[:8]!r})")
    chunks, at = [], len(PNG_SIGNATURE)
    while at < len(data):
        if at + 8 > len(data):
            raise ValueError(f"truncated PNG chunk header at byte {at}")
        (length,), kind = struct.unpack(">I", data[at : at + 4]), data[at + 4 : at + 8]
        if at + 12 + length > len(data):
            raise ValueError(f"truncated PNG chunk {kind!r} at byte {at}")
        chunks.append((kind, data[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def stripped_png(data: bytes) -> bytes:
    """The image in ``data`` as PNG bytes without metadata. PNGs are filtered chunk by chunk (no decoding);
    other formats (JPEG with EXIF, ...) are re-encoded."""
    try:
        chunks = png_chunks(data)
    except ValueError:
        with PILImage.open(io.BytesIO(data)) as image:
            out = io.BytesIO()
            image.convert("RGBA" if "A" in image.getbands() else "RGB").save(out, format="PNG")
            return out.getvalue()
    kept = [PNG_SIGNATURE]
    at = len(PNG_SIGNATURE)
    for kind, payload in chunks:
        size = 12 + len(payload)
        if kind in KEPT_PNG_CHUNKS:
            kept.append(data[at : at + size])
        at += size
    return b"".join(kept)


class MetadataFreeImageFieldFile(FieldFile):
    def save(self, name: str, content, save: bool = True) -> None:
        """Store the image as PNG without metadata (``stripped_png``); other formats become .png files."""
        content.open("rb")
        content.seek(0)
        data = stripped_png(content.read())
        super().save(str(PurePosixPath(name).with_suffix(".png")), ContentFile(data), save)


class MetadataFreeImageField(models.FileField):
    """A FileField whose files are stored as metadata-free PNG, whatever stores them (a service, a factory, an
    admin upload): what is on disk is exactly what a rater receives."""

    attr_class = MetadataFreeImageFieldFile
