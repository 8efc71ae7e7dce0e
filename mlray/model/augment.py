"""Batch transforms for the model: uint8 NHWC from the stream -> normalised float NCHW.

Augmentation runs where the model runs, on the whole batch, so the CPU stream
only decodes. A multi-label recipe needs gentle crops (a tight crop drops
objects whose labels stay on), horizontal flips and mild colour jitter.
``uint8 NHWC.permute(0, 3, 1, 2)`` is already channels-last in memory, the fast
layout for convolutions on CPU and on tensor cores, and every step keeps it.

On a CPU this costs about a third of a float ``grid_sample`` followed by four
full passes of jitter and normalisation, because:

* the crop and resize run on uint8 on a CPU (its bilinear uint8 kernel is ~8x
  its float one), one integer box per image, drawn on the host so a GPU step
  never waits on a ``.item()``;
* brightness, contrast and saturation are all linear in the pixel, and so is
  normalisation, so the whole colour step is one 3x3 matrix and offset per
  image (one batched matmul), then one clamp to the valid range.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from mlray.config import AugmentConfig

LUMA = (0.299, 0.587, 0.114)  # grey = LUMA · rgb; the weights sum to 1


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a sync: to a GPU a CPU tensor goes from pinned memory
    (from pageable memory ``non_blocking`` silently waits for the copy)."""
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def crop_boxes(n: int, height: int, width: int, cfg: AugmentConfig,
               generator: torch.Generator | None = None) -> list[tuple[int, int, int, int, bool]]:
    """``n`` random resized crops as (top, left, h, w, flip): area a uniform share in
    [scale_min, 1] of the image, log aspect ratio uniform in [ratio_min, ratio_max],
    each side at most the image's, the box uniform over where it fits. Drawn on the
    host (``generator`` is a CPU one), so no device sync."""
    r = torch.rand(5, n, generator=generator, dtype=torch.float64).tolist()
    lo, hi = math.log(cfg.ratio_min), math.log(cfg.ratio_max)
    boxes = []
    for i in range(n):
        area = cfg.scale_min + (1 - cfg.scale_min) * r[0][i]
        ratio = math.exp(lo + (hi - lo) * r[1][i])
        w = max(1, min(width, round(width * math.sqrt(area * ratio))))
        h = max(1, min(height, round(height * math.sqrt(area / ratio))))
        top = min(height - h, int(r[2][i] * (height - h + 1)))
        left = min(width - w, int(r[3][i] * (width - w + 1)))
        boxes.append((top, left, h, w, r[4][i] < cfg.hflip))
    return boxes


def random_resized_crop_flip(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random resized crop (bilinear) and horizontal flip of (N, C, H, W),
    output at the input size, dtype and channels-last layout. uint8 on a CPU is the
    fast case; a GPU has no uint8 bilinear kernel, so pass float there."""
    n, c, height, width = x.shape
    out = torch.empty_like(x, memory_format=torch.channels_last)
    for i, (top, left, h, w, flip) in enumerate(crop_boxes(n, height, width, cfg, generator)):
        part = x[i : i + 1, :, top : top + h, left : left + w]
        if (h, w) != (height, width):
            part = F.interpolate(part, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
        out[i] = part[0].flip(-1) if flip else part[0]
    return out


def jitter_factors(n: int, strength: float, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(3, n) brightness, contrast and saturation factors, each uniform in
    [1 - strength, 1 + strength]."""
    return 1 + strength * (2 * torch.rand(3, n, device=device, generator=generator) - 1)


@functools.lru_cache(maxsize=64)
def device_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mean``, ``std``, ``LUMA`` and the 3x3 identity as tensors on ``device``, made
    once per (values, device, dtype): ``torch.tensor(..., device="cuda")`` copies
    from pageable host memory, a host-device sync, and ``color_transform`` needs them
    every batch. Read-only: callers never write into them."""
    def made(values) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device)

    return made(mean), made(std), made(LUMA), torch.eye(3, dtype=dtype).to(device)


def color_transform(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                    factors: torch.Tensor | None = None) -> torch.Tensor:
    """Float (N, 3, H, W) in [0, 255], channels-last -> normalised ``(v - mean) / std``
    of ``v = x / 255`` after colour jitter by ``factors`` (``jitter_factors``), in
    this order: brightness ``v * b``; contrast ``m + (v - m) * c`` around the
    image's mean grey ``m``; saturation ``g + (v - g) * s`` around each pixel's
    grey ``g``; clamp to [0, 1]. All linear, so it runs as one matmul per image;
    without ``factors`` it is normalisation alone (no clamp needed), and then it
    overwrites ``x`` (``preprocess`` hands it a fresh copy)."""
    n = x.shape[0]
    dev = x.device
    with torch.autocast(dev.type, enabled=False):  # inputs stay float32 under a caller's autocast
        pix = x.permute(0, 2, 3, 1).reshape(n, -1, 3)  # a view: channels-last is NHWC in memory
        mean_t, std_t, luma, eye = device_constants(tuple(mean), tuple(std), dev, x.dtype)
        if factors is None:
            out = pix.mul_(1 / (255 * std_t)).sub_(mean_t / std_t)
        else:
            b, c, s = factors.to(device=dev, dtype=x.dtype)
            # rows act on a pixel's (r, g, b): v_out = (c b) (s v + (1 - s) g(v)) + (1 - c) m
            mix = s.view(n, 1, 1) * eye + (1 - s).view(n, 1, 1) * luma.view(1, 3, 1)  # (in, out): v @ mix
            mat = mix * (c * b).view(n, 1, 1) / (255 * std_t).view(1, 1, 3)
            grey_mean = b * (pix.mean(dim=1) @ luma) / 255  # the image's mean grey after brightness
            bias = ((1 - c) * grey_mean).view(n, 1, 1) / std_t.view(1, 1, 3) - (mean_t / std_t).view(1, 1, 3)
            out = torch.bmm(pix, mat).add_(bias)
            out = out.view(n, -1, 3).clamp_(-mean_t / std_t, (1 - mean_t) / std_t)
        return out.view(n, x.shape[2], x.shape[3], 3).permute(0, 3, 1, 2)  # channels-last NCHW


def preprocess(
    images: torch.Tensor, device: torch.device, mean: tuple[float, ...], std: tuple[float, ...],
    augment: AugmentConfig | None = None,
) -> torch.Tensor:
    """The one entry point: uint8 (N, H, W, 3) -> normalised float (N, 3, H, W),
    channels-last, on ``device``. Training batches pass ``augment``, evaluation
    and tagging do not."""
    x = to_device(images, device).permute(0, 3, 1, 2)  # channels-last view
    if augment is None:
        return color_transform(x.float(), mean, std)
    if x.device.type == "cpu":
        x = random_resized_crop_flip(x, augment).float()
    else:
        x = random_resized_crop_flip(x.float(), augment)
    factors = jitter_factors(len(x), augment.color_jitter, x.device) if augment.color_jitter > 0 else None
    return color_transform(x, mean, std, factors)
