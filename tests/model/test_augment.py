"""The training transforms: the fused colour step against the textbook sequence it
replaces, the crop's boxes and pixels, and the CPU uint8 path against the float
path a GPU takes."""

import numpy as np
import torch

from mlray.model.augment import (LUMA, color_transform, crop_boxes, jitter_factors, preprocess,
                           random_resized_crop_flip)
from mlray.config import AugmentConfig

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(n=6, size=40, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _sequential_jitter(v, b, c, s):
    """Brightness, contrast, saturation one after the other, as the usual recipes write it."""
    n = len(v)
    grey = lambda t: sum(w * t[:, i : i + 1] for i, w in enumerate(LUMA))  # noqa: E731
    v = v * b.view(n, 1, 1, 1)
    m = grey(v).mean(dim=(2, 3), keepdim=True)
    v = m + (v - m) * c.view(n, 1, 1, 1)
    g = grey(v)
    v = g + (v - g) * s.view(n, 1, 1, 1)
    return v.clamp(0, 1)


def _normalised(v):
    return (v - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_fused_colour_step_equals_the_sequential_jitter_and_normalisation():
    x = _images().permute(0, 3, 1, 2).float()
    factors = jitter_factors(len(x), 0.4, generator=torch.Generator().manual_seed(1))
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and factors.std() > 0.05
    want = _normalised(_sequential_jitter(x / 255, *factors))
    got = color_transform(x.clone(), MEAN, STD, factors)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # strong jitter saturates some pixels: the clamp is to [0, 1] before normalising
    assert torch.isclose(got.amax(dim=(0, 2, 3)), (1 - torch.tensor(MEAN)) / torch.tensor(STD)).all()


def test_evaluation_is_plain_normalisation():
    x8 = _images()
    got = preprocess(x8, torch.device("cpu"), MEAN, STD)
    want = _normalised(x8.permute(0, 3, 1, 2).float() / 255)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(x8, _images())  # the caller's batch is untouched


def test_crop_boxes_stay_inside_with_the_asked_area_and_aspect():
    cfg = AugmentConfig(scale_min=0.3, ratio_min=0.75, ratio_max=1.333, hflip=0.5)
    boxes = crop_boxes(2000, 120, 160, cfg, torch.Generator().manual_seed(0))
    top, left, h, w, flip = (np.array(v) for v in zip(*boxes))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 120).all() and (left + w <= 160).all()
    area = h * w / (120 * 160)
    assert area.min() > 0.3 - 0.02 and area.max() <= 1.0
    assert area.mean() < 0.8  # spread over [scale_min, 1], not stuck at the whole image
    unclamped = (h < 120) & (w < 160)
    ratio = (w / 160) / (h / 120)
    assert (ratio[unclamped] > 0.75 - 0.05).all() and (ratio[unclamped] < 1.333 + 0.05).all()
    assert 0.45 < flip.mean() < 0.55
    assert len({(a, b) for a, b in zip(top, left)}) > 500  # positions vary


def test_crop_of_the_whole_image_is_the_image_or_its_mirror():
    x = _images().permute(0, 3, 1, 2)
    whole = dict(scale_min=1.0, ratio_min=1.0, ratio_max=1.0)
    assert torch.equal(random_resized_crop_flip(x, AugmentConfig(**whole, hflip=0.0)), x)
    assert torch.equal(random_resized_crop_flip(x, AugmentConfig(**whole, hflip=1.0)), x.flip(-1))


def test_crop_resamples_within_its_box_and_keeps_layout():
    # each pixel holds its column (x 4): a crop's columns must rise, or fall when mirrored,
    # and span only the box's columns
    cols = (torch.arange(60) * 4).to(torch.uint8)
    x = cols.view(1, 1, 1, 60).expand(8, 3, 60, 60).contiguous(memory_format=torch.channels_last)
    cfg = AugmentConfig(scale_min=0.3)
    boxes = crop_boxes(8, 60, 60, cfg, torch.Generator().manual_seed(3))
    out = random_resized_crop_flip(x, cfg, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.is_contiguous(memory_format=torch.channels_last)
    for img, (top, left, h, w, flip) in zip(out, boxes):
        row = img[0, 0].int()
        steps = row.diff() if not flip else -row.diff()
        assert (steps >= 0).all()
        assert row.min() >= 4 * left - 1 and row.max() <= 4 * (left + w - 1) + 1


def test_cpu_uint8_crop_matches_the_float_crop_a_gpu_runs():
    x = _images(size=64).permute(0, 3, 1, 2)
    cfg = AugmentConfig(scale_min=0.5)
    on_uint8 = random_resized_crop_flip(x, cfg, torch.Generator().manual_seed(7)).float()
    on_float = random_resized_crop_flip(x.float(), cfg, torch.Generator().manual_seed(7))
    assert (on_uint8 - on_float).abs().max() <= 1.0  # uint8 rounds each pixel


def test_training_transform_is_in_range_and_follows_torch_seed():
    x8 = _images(size=48)
    cfg = AugmentConfig()
    torch.manual_seed(0)
    a = preprocess(x8, torch.device("cpu"), MEAN, STD, cfg)
    torch.manual_seed(0)
    b = preprocess(x8, torch.device("cpu"), MEAN, STD, cfg)
    assert torch.equal(a, b)
    lo, hi = -torch.tensor(MEAN) / torch.tensor(STD), (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (a.amin(dim=(0, 2, 3)) >= lo - 1e-5).all() and (a.amax(dim=(0, 2, 3)) <= hi + 1e-5).all()
    assert not torch.allclose(a, preprocess(x8, torch.device("cpu"), MEAN, STD), atol=1e-2)


def test_device_constants_are_made_once_per_device_and_dtype():
    """A GPU step must not copy the normalisation constants to the device each
    batch (a host-device sync per copy): they are made once and reused."""
    from mlray.model.augment import device_constants

    cpu = torch.device("cpu")
    first = device_constants(MEAN, STD, cpu, torch.float32)
    again = device_constants(MEAN, STD, cpu, torch.float32)
    assert all(a is b for a, b in zip(first, again))
    assert torch.equal(first[0], torch.tensor(MEAN)) and torch.equal(first[3], torch.eye(3))
    half = device_constants(MEAN, STD, cpu, torch.float64)
    assert half[0].dtype == torch.float64 and half[0] is not first[0]
    # normalising and jittering leave the shared constants as they were
    x = _images().permute(0, 3, 1, 2).float()
    color_transform(x.clone(), MEAN, STD, jitter_factors(len(x), 0.4))
    color_transform(x.clone(), MEAN, STD)
    assert torch.equal(device_constants(MEAN, STD, cpu, torch.float32)[1], torch.tensor(STD))
