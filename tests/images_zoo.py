"""Real images in every odd form a corpus holds, built from packaged photos."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo() -> Image.Image:
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg"))  # a real 640x427 photo


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def good_variants() -> dict[str, bytes]:
    """Valid images in modes that must be converted, not rejected."""
    p = photo()
    small = p.resize((160, 107))
    rgba = small.convert("RGBA")
    alpha = np.zeros((107, 160), dtype=np.uint8)
    alpha[20:80, 30:120] = 255
    rgba.putalpha(Image.fromarray(alpha))
    sixteen = Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257)
    return {
        "rgb.jpg": encode(p, "JPEG", quality=90),
        "gray.jpg": encode(small.convert("L"), "JPEG"),
        "rgba.png": encode(rgba, "PNG"),
        "palette.png": encode(small.convert("P"), "PNG"),
        "palette_transparent.gif": encode(small.convert("P"), "GIF", transparency=0),
        "cmyk.jpg": encode(small.convert("CMYK"), "JPEG"),
        "gray16.png": encode(sixteen, "PNG"),
        "webp.webp": encode(small, "WEBP"),
        "bmp.bmp": encode(small, "BMP"),
        "la.png": encode(small.convert("LA"), "PNG"),
    }


def bad_variants() -> dict[str, tuple[bytes, str]]:
    """Broken inputs and the reason code each must produce."""
    jpg = encode(photo(), "JPEG", quality=90)
    bomb = encode(Image.new("1", (10_000, 10_000)), "PNG")  # 100 Mpx, a few KB
    return {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (jpg[: len(jpg) // 3], "truncated"),
        "text.jpg": (b"this is not an image at all\n" * 10, "not_an_image"),
        "bomb.png": (bomb, "too_large"),
    }
