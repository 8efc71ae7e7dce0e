"""Decode next to the model: encoded bytes in, ``(N, size, size, 3)`` uint8 on the
model's device out.

With ``--decode device`` the read tasks ship the images' encoded bytes (a JPEG is
about a tenth of its decoded pixels) and the scoring actor decodes them:

* on a GPU, baseline JPEGs in RGB or grayscale go to nvJPEG in one batched
  ``torchvision.io.decode_jpeg(..., device="cuda")`` call and are resized on the
  GPU (bilinear, antialiased);
* everything else (PNG, CMYK, EXIF-rotated, oversized, undecodable) goes to the
  same Pillow decoder as the CPU path, image by image, so odd formats convert
  and bad bytes become the same error rows;
* on a CPU, Pillow decodes in a thread pool (it releases the GIL), overlapping
  the model's work of the previous batch.

Which images nvJPEG may take is decided from the header alone (Pillow reads no
pixels for it).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from mlray.data.images import DEFAULT_MAX_PIXELS, ImageError, decode

if TYPE_CHECKING:  # imported where decoding runs: the tagging driver only checks --decode
    import torch

DECODE_MODES = ("auto", "cpu", "device")
# --decode auto without a GPU, per job. Training: CPU tasks (the training worker's
# cores step the model; decoding there would take turns with it). Tagging: the
# scoring actor, which decodes one batch in its thread pool while another is
# scored: faster than CPU tasks on small images and no slower on photos, with no
# decoded pixels in the object store (benchmarks/RESULTS.md, tag throughput).
CPU_DEFAULT = {"train": "cpu", "tag": "device"}


def resolve_mode(mode: str, num_gpus: float, job: str) -> str:
    """``auto`` -> ``device`` when the model has a GPU, else ``CPU_DEFAULT[job]``."""
    if mode not in DECODE_MODES:
        raise ValueError(f"--decode {mode}: choose one of {', '.join(DECODE_MODES)}")
    if mode == "auto":
        return "device" if num_gpus > 0 else CPU_DEFAULT[job]
    return mode


def _gpu_eligible(data: bytes | None, max_pixels: int) -> bool:
    """A JPEG nvJPEG decodes to what Pillow would: RGB/grayscale, upright, not huge."""
    if not data or data[:2] != b"\xff\xd8":
        return False
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        return (img.format == "JPEG" and img.mode in ("RGB", "L") and w * h <= max_pixels
                and img.getexif().get(0x0112, 1) == 1)
    except Exception:  # noqa: BLE001 - anything odd goes to Pillow, which names the problem
        return False


class Decoder:
    """Decode a batch of encoded images for a model on ``device``."""

    def __init__(self, size: int, device: torch.device, threads: int = 4, max_pixels: int = DEFAULT_MAX_PIXELS):
        import torch

        self.size, self.device, self.max_pixels = size, torch.device(device), max_pixels
        self.pool = ThreadPoolExecutor(max(1, threads))

    def _pillow(self, data: bytes | None) -> tuple[np.ndarray | None, str | None]:
        try:
            return decode(data, self.size, max_pixels=self.max_pixels), None
        except ImageError as e:
            return None, str(e)

    def __call__(self, items: Sequence[bytes | None], errors: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
        """``items``: encoded bytes (None where fetching failed); ``errors``: "" or the
        fetch error of each row. Returns images (zeros where failed) on the device
        and the errors, decode failures added."""
        import torch

        n, s = len(items), self.size
        errs = list(errors)
        out = torch.zeros((n, s, s, 3), dtype=torch.uint8, device=self.device)
        todo = [i for i in range(n) if not errs[i]]
        pillow = todo
        if self.device.type == "cuda" and todo:
            eligible = list(self.pool.map(lambda i: _gpu_eligible(items[i], self.max_pixels), todo))
            gpu = [i for i, ok in zip(todo, eligible) if ok]
            pillow = [i for i, ok in zip(todo, eligible) if not ok]
            pillow += self._nvjpeg(items, gpu, out)
        for i, (img, err) in zip(pillow, self.pool.map(lambda i: self._pillow(items[i]), pillow)):
            if err:
                errs[i] = err
            else:
                out[i] = torch.tensor(img).to(self.device)  # Pillow's arrays are read-only: a copy
        return out, errs

    def _nvjpeg(self, items, idx: list[int], out: torch.Tensor) -> list[int]:
        """Decode ``idx`` with nvJPEG into ``out``; returns the rows left for Pillow."""
        if not idx:
            return []
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(items[i]), dtype=torch.uint8) for i in idx]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one bad file fails the batch: Pillow sorts them out
            return idx
        for i, img in zip(idx, decoded):
            x = img.unsqueeze(0).float()
            if x.shape[-2:] != (self.size, self.size):
                x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                    antialias=True, align_corners=False)
            out[i] = x.round().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
        return []
