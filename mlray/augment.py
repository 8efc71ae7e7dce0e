"""On-device batch transforms: uint8 NHWC from the stream -> normalised float NCHW.

Augmentation runs on the training device, one op for the whole batch, so the CPU
stream only decodes. A multi-label recipe needs gentle crops (a tight crop drops
objects whose labels stay on), horizontal flips and mild colour jitter.
``uint8 NHWC.permute(0, 3, 1, 2)`` is already channels-last in memory, which is
the fast layout for convolutions on CPU and on tensor cores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mlray.config import AugmentConfig


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a sync: to a GPU a CPU tensor goes from pinned memory
    (from pageable memory ``non_blocking`` silently waits for the copy)."""
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1], channels-last memory."""
    x = to_device(images, device).permute(0, 3, 1, 2)
    return x.float().div_(255.0).contiguous(memory_format=torch.channels_last)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def random_resized_crop_flip(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random resized crop and horizontal flip, output at the input size."""
    n = x.shape[0]
    dev = x.device
    rand = lambda: torch.rand(n, device=dev, generator=generator)  # noqa: E731
    area = cfg.scale_min + (1 - cfg.scale_min) * rand()
    log_r = math.log(cfg.ratio_min) + (math.log(cfg.ratio_max) - math.log(cfg.ratio_min)) * rand()
    ratio = torch.exp(log_r)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (2 * rand() - 1) * (1 - w)
    cy = (2 * rand() - 1) * (1 - h)
    flip = torch.where(rand() < cfg.hflip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Brightness, contrast and saturation, each by a factor in [1 - s, 1 + s]."""
    if strength <= 0:
        return x
    n = x.shape[0]
    f = lambda: (1 + strength * (2 * torch.rand(n, 1, 1, 1, device=x.device, generator=generator) - 1))  # noqa: E731
    x = x * f()
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = gray.mean(dim=(2, 3), keepdim=True) + (x - gray.mean(dim=(2, 3), keepdim=True)) * f()
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = gray + (x - gray) * f()
    return x.clamp_(0, 1)


def preprocess(
    images: torch.Tensor, device: torch.device, mean: tuple[float, ...], std: tuple[float, ...],
    augment: AugmentConfig | None = None,
) -> torch.Tensor:
    """The one entry point: training batches pass ``augment``, evaluation does not."""
    x = to_float(images, device)
    if augment is not None:
        x = random_resized_crop_flip(x, augment)
        x = color_jitter(x, augment.color_jitter)
    return normalize(x, mean, std).contiguous(memory_format=torch.channels_last)
