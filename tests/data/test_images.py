"""Decode: odd formats converted, broken ones rejected with a reason code."""

from __future__ import annotations

import numpy as np
import pytest
from images_zoo import bad_variants, encode, good_variants, photo
from PIL import Image

from mlray.data.images import ImageError, decode, decode_many


@pytest.mark.parametrize("name", sorted(good_variants()))
def test_odd_formats_become_rgb(name):
    arr = decode(good_variants()[name], 96)
    assert arr.shape == (96, 96, 3) and arr.dtype == np.uint8
    assert arr.std() > 5  # real content, not a blank canvas


def test_jpeg_draft_decode_matches_full_decode():
    data = encode(photo(), "JPEG", quality=95)
    fast = decode(data, 128).astype(np.float32)
    slow = np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB").resize((128, 128), Image.BILINEAR))
    assert np.abs(fast - slow).mean() < 6  # same picture; draft only changes the scaling path


def test_transparency_is_composited_on_white():
    arr = decode(good_variants()["rgba.png"], 64)
    assert arr[0, 0].tolist() == [255, 255, 255]  # a transparent corner


def test_sixteen_bit_keeps_its_range():
    arr = decode(good_variants()["gray16.png"], 64)
    ref = decode(good_variants()["gray.jpg"], 64)
    assert abs(float(arr.mean()) - float(ref.mean())) < 10


def test_exif_orientation_is_applied():
    p = photo().resize((200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    arr = decode(encode(p, "JPEG", exif=exif.tobytes()), 64)
    upright = decode(encode(p.transpose(Image.Transpose.ROTATE_270), "JPEG"), 64)
    assert np.abs(arr.astype(int) - upright.astype(int)).mean() < 8


@pytest.mark.parametrize("name", sorted(bad_variants()))
def test_broken_images_raise_a_reason(name):
    data, reason = bad_variants()[name]
    with pytest.raises(ImageError) as e:
        decode(data, 64)
    assert e.value.reason == reason


def test_decode_many_keeps_going_past_bad_rows():
    good = good_variants()["rgb.jpg"]
    arr, errors = decode_many([good, b"", None, good], 32)
    assert arr.shape == (4, 32, 32, 3)
    assert errors[0] is None and errors[3] is None
    assert errors[1].startswith("empty") and errors[2].startswith("missing")
    assert arr[1].max() == 0 and arr[0].max() > 0
