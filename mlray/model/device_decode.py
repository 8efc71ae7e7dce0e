"""Decode next to the model: encoded bytes in, ``(N, size, size, 3)`` uint8 on the
model's device out.

With ``--decode device`` the read tasks ship the images' encoded bytes (a JPEG is
about a tenth of its decoded pixels) and the scoring actor decodes them:

* on a GPU, baseline JPEGs in RGB or grayscale go to nvJPEG in one batched
  ``torchvision.io.decode_jpeg(..., device="cuda")`` call and are resized on the
  GPU to the pixels the CPU path's Pillow gives (``resize_like_draft``), so a
  model scores the same image alike whichever decoded it;
* everything else (PNG, CMYK, EXIF-rotated, oversized, undecodable) goes to the
  same Pillow decoder as the CPU path, image by image, so odd formats convert
  and bad bytes become the same error rows;
* on a CPU, Pillow decodes in a thread pool (it releases the GIL), overlapping
  the model's work of the previous batch.

Which images nvJPEG may take is decided from the header alone (Pillow reads no
pixels for it).

Streams: nvJPEG writes its outputs on a private stream that does not wait for
the stream it is called from (pytorch/vision#9606), while their memory comes
from the caching allocator of that calling stream, which may hand out blocks
freed by kernels still queued there. With one training worker nothing else
synchronises before the next decode, so a decode could overwrite memory the
previous step was still reading. The batch is therefore decoded on a stream of
its own, idle before nvJPEG starts (only decodes run there, so waiting for it
never waits for a training step); the caller's stream waits for it, and the
output is marked as used there so its memory is not reused too early.
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


def draft_scale(width: int, height: int, size: int) -> int:
    """The factor Pillow's JPEG draft mode reduces by for a ``size``² target
    (``images.decode``): the largest of 8, 4, 2 that leaves both sides at least ``size``, else 1."""
    fits = min(width // size, height // size)
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def resize_like_draft(image: torch.Tensor, size: int) -> torch.Tensor:
    """A fully decoded JPEG, (3, H, W) uint8 on any device, to ``(size, size, 3)``
    uint8 as the CPU path gives it (``images.decode``: libjpeg decoding at Pillow's
    draft scale, then bilinear). libjpeg's draft scale averages each s x s block
    (at 1/8 exactly its DC term): here an s x s box average, a block cut by the
    edge averaged over its pixels as libjpeg's rounded-up size keeps it, then
    bilinear with antialiasing (Pillow's resampling). On real photos this is
    closer to Pillow's pixels than one bilinear resize from full size
    (benchmarks/RESULTS.md, decode parity)."""
    import torch
    import torch.nn.functional as F

    x = image.unsqueeze(0).float()
    height, width = x.shape[-2:]
    scale = draft_scale(width, height, size)
    if scale > 1:
        x = F.avg_pool2d(x, scale, stride=scale, ceil_mode=True)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)


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
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

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

        errs = list(errors)
        todo = [i for i in range(len(items)) if not errs[i]]
        if self.stream is None:
            out = self._zeros(len(items))
            self._decode_pillow(items, todo, errs, out)
            return out, errs
        caller = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            self.stream.synchronize()  # the last batch's resizes are done: nvJPEG will not wait for them
            out = self._zeros(len(items))
            eligible = list(self.pool.map(lambda i: _gpu_eligible(items[i], self.max_pixels), todo))
            gpu = [i for i, ok in zip(todo, eligible) if ok]
            pillow = [i for i, ok in zip(todo, eligible) if not ok]
            pillow += self._nvjpeg(items, gpu, out)
            self._decode_pillow(items, pillow, errs, out)
        caller.wait_stream(self.stream)  # the consumer's kernels start once the batch is decoded
        out.record_stream(caller)  # and its memory is not reused before they are done
        return out, errs

    def _zeros(self, n: int) -> torch.Tensor:
        import torch

        return torch.zeros((n, self.size, self.size, 3), dtype=torch.uint8, device=self.device)

    def _decode_pillow(self, items, idx: list[int], errs: list[str], out: torch.Tensor) -> None:
        """Decode ``idx`` with Pillow in the thread pool into ``out``; failures become errors."""
        import torch

        done = []
        for i, (img, err) in zip(idx, self.pool.map(lambda i: self._pillow(items[i]), idx)):
            if err:
                errs[i] = err
            else:
                done.append((i, img))
        if not done:
            return
        from mlray.model.augment import to_device

        rows = torch.from_numpy(np.stack([img for _, img in done]))  # a copy: Pillow's arrays are read-only
        where = torch.tensor([i for i, _ in done])
        out[to_device(where, self.device)] = to_device(rows, self.device)

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
            out[i] = resize_like_draft(img, self.size)
        return []
