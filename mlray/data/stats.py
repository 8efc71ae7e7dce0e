"""The dataset report: what a manifest holds, and what will hurt training.

Printed by ``mlray stats`` and at the end of ``mlray prepare``; saved as
``_stats.json`` next to the manifest parts.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from mlray.io.manifest import SPLITS, multi_hot


def manifest_stats(table: pa.Table, vocab: Sequence[str]) -> dict:
    y = multi_hot(table.column("labels"), vocab)
    n, c = y.shape
    splits = table.column("split").to_pylist() if "split" in table.column_names else [None] * n
    per_image = y.sum(axis=1)
    positives = y.sum(axis=0)
    nonzero = positives[positives > 0]
    out: dict = {
        "images": n,
        "labels": c,
        "images_per_split": dict(Counter(s or "(none)" for s in splits)),
        "labels_per_image": {
            "mean": float(per_image.mean()) if n else 0.0,
            "max": int(per_image.max()) if n else 0,
            "histogram": {str(k): int(v) for k, v in sorted(Counter(per_image.tolist()).items())},
        },
        "images_without_labels": int((per_image == 0).sum()),
        "positives_per_label": {v: int(p) for v, p in zip(vocab, positives)},
        "label_density": float(y.mean()) if y.size else 0.0,
        "imbalance_ratio": float(nonzero.max() / nonzero.min()) if len(nonzero) else None,
        "labels_without_positives": [v for v, p in zip(vocab, positives) if p == 0],
    }
    split_arr = np.array([s or "(none)" for s in splits])
    missing: dict[str, list[str]] = {}
    per_split_pos: dict[str, dict[str, int]] = {}
    for s in sorted(set(split_arr.tolist()), key=lambda s: (SPLITS + ("(none)",)).index(s) if s in SPLITS + ("(none)",) else 9):
        pos = y[split_arr == s].sum(axis=0)
        per_split_pos[s] = {v: int(p) for v, p in zip(vocab, pos)}
        missing[s] = [v for v, p, tot in zip(vocab, pos, positives) if p == 0 and tot > 0]
    out["positives_per_label_per_split"] = per_split_pos
    out["labels_missing_in_split"] = missing
    ids = table.column("image_id").to_pylist()
    out["duplicate_ids"] = sorted(k for k, v in Counter(ids).items() if v > 1)[:100]
    if "content_hash" in table.column_names:
        by_hash: dict[str, list[int]] = defaultdict(list)
        for i, h in enumerate(table.column("content_hash").to_pylist()):
            if h is not None:
                by_hash[h].append(i)
        groups = [rows for rows in by_hash.values() if len(rows) > 1]
        leaking = [rows for rows in groups if len({splits[i] for i in rows}) > 1]
        out["duplicate_content_groups"] = len(groups)
        out["duplicate_content_images"] = int(sum(len(g) for g in groups))
        out["duplicate_groups_across_splits"] = len(leaking)
        out["leakage_examples"] = [
            [{"image_id": ids[i], "split": splits[i]} for i in rows] for rows in leaking[:10]
        ]
    return out


def format_stats(s: dict, max_labels: int = 30) -> str:
    lines = [f"images: {s['images']}   labels: {s['labels']}"]
    lines.append("per split: " + ", ".join(f"{k}={v}" for k, v in s["images_per_split"].items()))
    lpi = s["labels_per_image"]
    hist = " ".join(f"{k}:{v}" for k, v in lpi["histogram"].items())
    lines.append(f"labels per image: mean {lpi['mean']:.2f}, max {lpi['max']}   histogram {hist}")
    lines.append(
        f"label density: {s['label_density']:.4f} (fraction of ones)   "
        f"imbalance ratio (most/least frequent): {s['imbalance_ratio'] if s['imbalance_ratio'] is None else round(s['imbalance_ratio'], 1)}"
    )
    if s["images_without_labels"]:
        lines.append(f"images with no labels: {s['images_without_labels']}")
    pos = sorted(s["positives_per_label"].items(), key=lambda kv: -kv[1])
    shown = pos if len(pos) <= max_labels else pos[: max_labels // 2] + [("...", -1)] + pos[-max_labels // 2 :]
    width = max((len(k) for k, _ in shown), default=5)
    splits = list(s["positives_per_label_per_split"])
    lines.append("positives per label" + (" (" + " / ".join(splits) + ")" if splits else "") + ":")
    for name, p in shown:
        if p < 0:
            lines.append(f"  {'...':<{width}}")
            continue
        per = " / ".join(str(s["positives_per_label_per_split"][sp][name]) for sp in splits)
        lines.append(f"  {name:<{width}}  {p:>7}   ({per})")
    if s["labels_without_positives"]:
        lines.append(f"WARNING labels with no positives at all: {s['labels_without_positives'][:20]}")
    for sp, names in s["labels_missing_in_split"].items():
        if names:
            lines.append(f"WARNING labels with no positives in {sp}: {names[:20]}" + (" ..." if len(names) > 20 else ""))
    if s["duplicate_ids"]:
        lines.append(f"ERROR duplicate image ids: {s['duplicate_ids'][:10]}")
    if "duplicate_content_groups" in s:
        lines.append(
            f"duplicate content: {s['duplicate_content_groups']} groups covering "
            f"{s['duplicate_content_images']} images; groups spanning splits (leakage): "
            f"{s['duplicate_groups_across_splits']}"
        )
        for ex in s["leakage_examples"][:5]:
            lines.append("  LEAK " + ", ".join(f"{e['image_id']}[{e['split']}]" for e in ex))
    return "\n".join(lines)
