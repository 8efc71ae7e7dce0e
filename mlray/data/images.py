"""Decode encoded image bytes to fixed-size RGB uint8: the ingest hot path.

JPEGs use Pillow's ``draft`` mode: libjpeg scales by 1/2, 1/4 or 1/8 while
decoding, 1.8x the throughput of a full decode then resize (benchmarks/RESULTS.md).
Everything else goes through plain Pillow. Images are squashed to
``size x size`` rather than centre-cropped: in multi-label data an object at the
border is still a label, and a crop would cut it out.

Odd formats are converted, not rejected: grayscale, palette, CMYK, 16-bit and
float images become RGB; transparency is composited onto white (clip art and
logos are mostly transparent PNGs). Bad input raises ``ImageError`` with a short
reason code that the tagging job writes into its ``error`` column.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False
DEFAULT_MAX_PIXELS = 64_000_000  # above this an image is treated as a decompression bomb
_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An image could not be decoded; ``reason`` is a stable short code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if mode == "F" and arr.max() <= 1.0:
            hi = 1.0
        arr8 = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode(data: bytes | None, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> ``(size, size, 3)`` uint8 RGB."""
    if data is None:
        raise ImageError("missing", "no image bytes")
    if len(data) == 0:
        raise ImageError("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError("too_large", f"{w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
            if img.format == "JPEG":
                img.draft("RGB", (size, size))
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise ImageError("not_an_image", "the bytes are not a known image format") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_large", str(e)) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated" if "truncated" in str(e).lower() else "decode_error"
        raise ImageError(reason, str(e) or type(e).__name__) from e
    try:
        if img.getexif().get(_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR, reducing_gap=None)
        return np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ImageError("decode_error", str(e)) from e


def decode_many(
    items: list[bytes | None], size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, list[str | None]]:
    """Decode a batch: ``(N, size, size, 3)`` uint8 (zeros where it failed) and one
    error message per item (``None`` when decoded)."""
    out = np.zeros((len(items), size, size, 3), dtype=np.uint8)
    errors: list[str | None] = [None] * len(items)
    for i, data in enumerate(items):
        try:
            out[i] = decode(data, size, max_pixels=max_pixels)
        except ImageError as e:
            errors[i] = str(e)
    return out, errors
