"""Decoding next to the model gives the pixels the CPU path gives, so a threshold
tuned on one decoder's images holds on the other's. nvJPEG itself needs a GPU;
torchvision's CPU ``decode_jpeg`` (libjpeg, a full decode like nvJPEG's) stands
in for it, followed by the GPU path's own resize."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mlray.data.images import decode
from mlray.model.device_decode import Decoder, draft_scale, resize_like_draft


def _photos() -> list[str]:
    """Real photos shipped with two of mlray's dependencies (640x427 and 512x600, COCO-sized)."""
    import matplotlib.cbook
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return [os.path.join(folder, "china.jpg"), os.path.join(folder, "flower.jpg"),
            str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))]


def _full_decode(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


@pytest.mark.parametrize("size", [48, 64, 100, 160, 224, 1000])
def test_draft_scale_is_the_one_pillow_decodes_at(size):
    for path in _photos():
        img = Image.open(path)
        width, height = img.size
        img.draft("RGB", (size, size))
        s = draft_scale(width, height, size)
        assert img.size == (math.ceil(width / s), math.ceil(height / s)), (path, size)


@pytest.mark.parametrize("size", [48, 64, 100, 160, 200, 224])
def test_a_full_decode_resized_like_the_draft_gives_the_cpu_paths_pixels(size):
    """Pillow decodes JPEGs at a reduced scale (draft) then resizes; the GPU path
    decodes in full, so it reduces by the same factor before resizing. On real
    photos that stays within half a grey level on average of the CPU pixels;
    one bilinear resize from full size, what it did before, was 1 to 4 off (up
    to 89 on one pixel)."""
    for path in _photos():
        data = open(path, "rb").read()
        cpu = decode(data, size).astype(np.int32)
        full = _full_decode(data)
        gpu = resize_like_draft(full, size)
        assert gpu.shape == (size, size, 3) and gpu.dtype == torch.uint8
        diff = np.abs(gpu.numpy().astype(np.int32) - cpu)
        assert diff.mean() < 0.6 and diff.max() <= 24, (path, size, diff.mean(), diff.max())
        if draft_scale(full.shape[2], full.shape[1], size) > 1:
            before = F.interpolate(full[None].float(), size=(size, size), mode="bilinear", antialias=True)
            before = before.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy().astype(np.int32)
            assert diff.mean() < np.abs(before - cpu).mean() / 2, (path, size)


def test_decoder_on_cpu_gives_the_cpu_paths_pixels_and_errors():
    photos = [open(p, "rb").read() for p in _photos()]
    images, errors = Decoder(96, torch.device("cpu"), threads=2)(photos + [b"not an image", None],
                                                                   ["", "", "", "", "missing: gone"])
    assert images.shape == (5, 96, 96, 3)
    for i, data in enumerate(photos):
        assert np.array_equal(images[i].numpy(), decode(data, 96))
    assert errors[:3] == ["", "", ""] and errors[3].startswith("not_an_image") and errors[4] == "missing: gone"
    assert images[3:].abs().sum() == 0
