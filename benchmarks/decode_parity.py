"""Decode parity: how far the GPU decode path's pixels, and a trained model's
scores on them, are from the CPU path's, on real photos.

    python -m benchmarks.decode_parity [--photos DIR ...] [--size 224]

The CPU path (``data.decode=cpu``, ``evaluate`` and ``tag`` on CPU) decodes with
Pillow in draft mode then resizes bilinearly (``mlray.data.images.decode``). The
GPU path decodes in full with nvJPEG and resizes on the GPU. nvJPEG needs a GPU,
so torchvision's CPU ``decode_jpeg`` (libjpeg, also a full decode) stands in for
it; the resize is the GPU path's own code, run on CPU:

* ``draft-like`` (now): ``device_decode.resize_like_draft``, reduced by Pillow's
  draft factor, then bilinear;
* ``full resize`` (before): one antialiased bilinear resize from full size.

Photos: the three real photos shipped with scikit-learn and matplotlib, and every
JPEG under each ``--photos`` folder (e.g. Debian's ``mate-backgrounds`` nature
photos); each also re-encoded at COCO's size (640 px wide, quality 90). Scores:
ImageNet EfficientNet-Lite0 (the packaged weights, classifier included), each
logit through a sigmoid as mlray scores labels, and its top-1 class.
"""

from __future__ import annotations

import argparse
import glob
import io
import os

import numpy as np

from benchmarks.common import fmt_table, record


def default_photos() -> list[str]:
    import matplotlib.cbook
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return [os.path.join(folder, "china.jpg"), os.path.join(folder, "flower.jpg"),
            str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))]


def coco_sized(data: bytes) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = img.size
    img = img.resize((640, round(640 * height / width)), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def imagenet_lite0():
    """EfficientNet-Lite0 with its ImageNet classifier (mlray's factory drops the
    classifier on purpose; here it is the trained head): packaged weights matched
    to timm's in order, every shape checked."""
    import timm
    import torch

    from mlray.model.factory import PACKAGED_WEIGHTS, _packaged_path

    path = _packaged_path("efficientnet-lite0", PACKAGED_WEIGHTS["efficientnet-lite0"][2])
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    target = model.state_dict()
    keys = [k for k in target if not k.endswith("num_batches_tracked")]
    values = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(keys) != len(values) or any(target[k].shape != v.shape for k, v in zip(keys, values)):
        raise SystemExit(f"{path}: the packaged weights do not fit tf_efficientnet_lite0 in order")
    model.load_state_dict(dict(zip(keys, values)), strict=False)
    return model.eval()


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_jpeg

    from mlray.data.images import decode
    from mlray.model.augment import preprocess
    from mlray.model.device_decode import draft_scale, resize_like_draft
    from mlray.model.factory import normalization

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", nargs="*", default=[], help="folders of JPEG photos, searched recursively")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    files = default_photos() + sorted(f for d in args.photos for f in glob.glob(os.path.join(d, "**", "*.jp*g"),
                                                                                  recursive=True))
    model = imagenet_lite0()
    mean, std = normalization(model)

    def full_resize(image: torch.Tensor, size: int) -> torch.Tensor:
        x = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True)
        return x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0)

    rows = []
    for label, prepare_bytes in (("as shipped", lambda b: b), ("640 px wide, q90", coco_sized)):
        images = {"cpu": [], "draft-like": [], "full resize": []}
        scales = []
        for path in files:
            data = prepare_bytes(open(path, "rb").read())
            full = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            scales.append(draft_scale(full.shape[2], full.shape[1], args.size))
            images["cpu"].append(torch.from_numpy(np.array(decode(data, args.size))))
            images["draft-like"].append(resize_like_draft(full, args.size))
            images["full resize"].append(full_resize(full, args.size))
        batches = {k: torch.stack(v) for k, v in images.items()}
        with torch.inference_mode():
            logits = {k: model(preprocess(v, torch.device("cpu"), mean, std)) for k, v in batches.items()}
        cpu_pixels, cpu_scores = batches["cpu"].int(), torch.sigmoid(logits["cpu"])
        for way in ("draft-like", "full resize"):
            pixels = (batches[way].int() - cpu_pixels).abs().float()
            per_image = pixels.mean(dim=(1, 2, 3))
            scores = (torch.sigmoid(logits[way]) - cpu_scores).abs()
            rows.append({
                "photos": f"{label} ({len(files)})", "draft scales": ",".join(map(str, sorted(set(scales)))),
                "GPU resize": way, "mean |dpixel|": round(float(pixels.mean()), 3),
                "worst photo's mean": round(float(per_image.max()), 3), "max |dpixel|": int(pixels.max()),
                "mean |dscore|": float(f"{float(scores.mean()):.2g}"), "max |dscore|": round(float(scores.max()), 4),
                "top-1 same": f"{int((logits[way].argmax(1) == logits['cpu'].argmax(1)).sum())}/{len(files)}",
            })
    print(fmt_table(list(rows[0]), [list(r.values()) for r in rows]))
    record("decode_parity", rows)


if __name__ == "__main__":
    main()
