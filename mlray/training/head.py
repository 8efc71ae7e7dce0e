"""A new head on stored embeddings: a label change without reading the corpus again.

``mlray head --model RUN --embeddings TAGS_OUT --manifest M --out NEW_RUN`` joins
the labelled manifest (ids, labels, splits; its images are not read) to the
embeddings a ``mlray tag --embeddings`` run stored, by ``image_id``. Labelled
ids that OUT lacks (or holds as error rows) get their embeddings computed from
their images with RUN's backbone; the count is printed. A linear head is then
trained on the train split with the run's loss, selected by val mAP, its
thresholds tuned on val, its metrics and collapse check computed as in
``train``. NEW_RUN is a normal run directory: RUN's backbone weights with the
new head, so ``predict``, ``evaluate`` and ``tag`` (``--from-embeddings`` too:
the backbone digest is the same) use it unchanged.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlray.config import check_options, option
from mlray.io import storage
from mlray.io.manifest import is_packed, manifest_files
from mlray.io.tagged import check_backbone, embedding_parts, lookup_embeddings
from mlray.model import rundir

if TYPE_CHECKING:
    import torch

HEAD_FILE = "head.json"  # how a head-only run was made: source run, embeddings, counts, options


@dataclass
class HeadOptions:
    """``mlray head``'s options: defaults, flags, help and ranges in one place (the CLI reads them)."""

    epochs: int = option(300, "most passes over the labelled embeddings (early stop ends it sooner)", low=1,
                         integer=True)
    patience: int = option(30, "passes without a val mAP gain before stopping", low=1, integer=True)
    lr: float = option(1e-3, "AdamW learning rate", low=0)
    weight_decay: float = option(1e-4, "AdamW weight decay", low=0)
    batch_size: int = option(256, "embeddings per step", low=1, integer=True)
    seed: int = option(0, "seed of the head's initialisation and batch order", integer=True, low=0)
    device: str | None = option(None, "cpu, cuda, ... (default: a GPU when there is one)", type=str)
    overrides: list[str] = option([], "key=value for the new run's config (loss.*, thresholds.*)", cli=False)


@dataclass
class HeadResult:
    run_dir: str
    from_embeddings: int  # labelled rows whose embedding came from the tag OUT
    computed: int  # labelled rows embedded from their images now
    unreadable: list  # (image_id, error) of labelled rows whose image could not be read: left out
    best_epoch: int
    val: dict  # val metrics at the tuned thresholds
    collapse: dict
    seconds: float

    def format(self) -> str:
        from mlray.evaluation.metrics import format_collapse

        lines = [
            f"embeddings: {self.from_embeddings} from the tag output, {self.computed} computed from images now, "
            f"{len(self.unreadable)} unreadable (left out)",
            f"best pass {self.best_epoch}: val mAP {self.val['mAP']:.4f} (prior {self.val['prior.mAP']:.4f}) "
            f"F1 micro {self.val['f1_micro']:.4f} F1 macro {self.val['f1_macro']:.4f} @tuned thresholds",
            f"run directory: {self.run_dir} ({self.seconds:.1f} s)",
        ]
        lines += [f"unreadable {i}: {e}" for i, e in self.unreadable[:10]]
        if self.collapse.get("collapsed"):
            lines.append(format_collapse(self.collapse))
        return "\n".join(lines)


def _rows_to_embed(manifest: str, table: pa.Table, want: np.ndarray) -> pa.Table:
    """The manifest rows to embed from images: ``image_id, uri`` and, for packed
    manifests, the ``image`` bytes (read now, for these rows only)."""
    rows = table.filter(pa.array(want)).select(["image_id", "uri"])
    if not is_packed(manifest):
        return rows
    ids = rows.column("image_id").combine_chunks()
    parts = []
    for f in manifest_files(manifest):
        t = storage.read_table(f, columns=["image_id", "image"])
        parts.append(t.filter(pc.is_in(t.column("image_id"), value_set=ids)))
    images = pa.concat_tables(parts)
    at = pc.index_in(ids, value_set=images.column("image_id"))
    return rows.append_column("image", images.column("image").take(at))


def embed_images(rows: pa.Table, predictor, batch_size: int = 64) -> tuple[np.ndarray, list[tuple[str, str]], np.ndarray]:
    """Embed rows (``image_id``, ``uri`` and/or ``image`` bytes) with the predictor's
    backbone: ((N, D) float32, [(id, error)], decoded (N,) bool)."""
    from tqdm import tqdm

    from mlray.data.pipeline import decode_rows

    out = np.zeros((rows.num_rows, predictor.embedding_dim), np.float32)
    ok_all = np.zeros(rows.num_rows, bool)
    bad: list[tuple[str, str]] = []
    for start in tqdm(range(0, rows.num_rows, batch_size), desc="embedding images", unit="batch",
                      disable=rows.num_rows <= batch_size):
        batch = decode_rows(rows.slice(start, batch_size), size=predictor.size)
        ok = batch["error"] == ""
        bad += [(i, e) for i, e in zip(batch["image_id"], batch["error"]) if e]
        _, feats = predictor.scores_and_embeddings(batch["image"][ok])
        idx = start + np.flatnonzero(ok)
        out[idx] = feats.astype(np.float32)
        ok_all[idx] = True
    return out, bad, ok_all


def _new_config(source_cfg, manifest: str, out: str, overrides: list[str]):
    from mlray.config import build_config

    doc = source_cfg.model_dump(mode="json")
    doc["data"]["manifest"] = manifest
    doc["run"]["name"] = out.rstrip("/").rsplit("/", 1)[-1]
    doc["run"]["storage_path"] = storage.parent(out.rstrip("/"))
    return build_config(doc, list(overrides), source=f"head run {out}")


def fit_head(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], cfg, positives: list[int], n_train: int,
             opts: HeadOptions) -> tuple[torch.nn.Linear, int, list[dict]]:
    """Train a linear head on ``x["train"]``; keep the pass with the best val mAP.
    Returns (head, best pass, per-pass records)."""
    import torch

    from mlray.training.losses import create_loss
    from mlray.evaluation.metrics import average_precision_per_label, multilabel_metrics
    from mlray.model.factory import init_linear

    torch.manual_seed(opts.seed)
    prior = [p / max(n_train, 1) for p in positives]
    device = x["train"].device
    head = torch.nn.Linear(x["train"].shape[1], y["train"].shape[1]).to(device)
    init_linear(head, prior)
    loss_fn = create_loss(cfg.loss, positives, n_train).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    gen = torch.Generator().manual_seed(opts.seed)
    yva = y["val"].cpu().numpy()
    prior_map = multilabel_metrics(np.tile(np.asarray(prior, np.float32), (len(yva), 1)), yva, 0.5, prior=prior)["mAP"]
    best, best_epoch, best_state, history, stale = -1.0, 0, None, [], 0
    for epoch in range(1, opts.epochs + 1):
        head.train()
        total, seen = 0.0, 0
        for idx in torch.randperm(len(x["train"]), generator=gen).split(opts.batch_size):
            idx = idx.to(device)
            loss = loss_fn(head(x["train"][idx]), y["train"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        head.eval()
        with torch.no_grad():
            logits = head(x["val"])
            val_loss = float(loss_fn(logits, y["val"]))
            scores = torch.sigmoid(logits).cpu().numpy()
        ap = average_precision_per_label(scores, yva)
        val_map = float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")
        history.append({"epoch": epoch, "phase": "head", "train_loss": total / max(seen, 1), "val_loss": val_loss,
                        "val_mAP": val_map, "prior_mAP": prior_map})
        if val_map > best + 1e-6:
            best, best_epoch, stale = val_map, epoch, 0
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            stale += 1
            if stale >= opts.patience:
                break
    if best_state is None:  # val mAP undefined (no val positives): the last pass
        best_epoch = len(history)
    else:
        head.load_state_dict(best_state)
    return head.eval(), best_epoch, history


def train_head(model: str, embeddings: str, manifest: str, out: str, opts: HeadOptions | None = None) -> HeadResult:
    """Train a head for ``manifest``'s labels on the embeddings in ``embeddings``
    (a tag OUT), on ``model``'s backbone; write the run directory ``out``."""
    import torch

    from mlray.config import training_facts
    from mlray.model.predictor import Predictor
    from mlray.io.manifest import check_uris, multi_hot, read_manifest
    from mlray.evaluation.validation import tune_and_judge

    opts = opts or HeadOptions()
    check_options(opts)
    t0 = time.time()
    if storage.exists(storage.join(out, rundir.WEIGHTS)):
        raise ValueError(f"--out {out} already holds a run (model.safetensors); choose a new run directory")
    if opts.device and opts.device.startswith("cuda"):
        from mlray.resources import ResourceError, cuda_problem, gpu_facts

        problem = cuda_problem(gpu_facts(), f"--device {opts.device}")
        if problem:
            raise ResourceError(problem)
    # unfolded: the new run's weights file is this model's state dict with the new head
    predictor = Predictor.load(model, None if opts.device in (None, "auto") else opts.device, fuse=False)
    state, info = embedding_parts(embeddings)
    check_backbone(info, predictor.backbone_digest, predictor.embedding_dim, embeddings, model)
    table, vocab = read_manifest(manifest)
    cfg = _new_config(predictor.art.config, manifest, out, opts.overrides)
    if "split" not in table.column_names:
        raise ValueError(f"{manifest}: no 'split' column; the head is trained on train and selected on val")
    splits = np.asarray(table.column("split").to_numpy(zero_copy_only=False), dtype=object)
    for name in (cfg.data.train_split, cfg.data.val_split):
        if not (splits == name).any():
            raise ValueError(f"{manifest}: no rows in split {name!r} (data.train_split / data.val_split)")
    ids = table.column("image_id").combine_chunks()
    emb, have = lookup_embeddings(state.files, ids, predictor.embedding_dim)
    want = ~have & np.isin(splits, [cfg.data.train_split, cfg.data.val_split])
    check_uris(manifest, table, rows=want, flag="--manifest")  # only the images to embed are read
    computed, unreadable = 0, []
    if want.any():
        print(f"{int(want.sum())} labelled images have no embedding in {embeddings}: embedding them from their images")
        new, unreadable, ok = embed_images(_rows_to_embed(manifest, table, want), predictor)
        rows = np.flatnonzero(want)
        emb[rows[ok]] = new[ok]
        have[rows[ok]] = True
        computed = int(ok.sum())
    targets = multi_hot(table.column("labels"), vocab)
    device = predictor.device
    x, y = {}, {}
    for name, split in (("train", cfg.data.train_split), ("val", cfg.data.val_split)):
        sel = (splits == split) & have
        x[name] = torch.from_numpy(emb[sel]).to(device)
        y[name] = torch.from_numpy(targets[sel]).float().to(device)
    positives = targets[(splits == cfg.data.train_split) & have].sum(axis=0).astype(int).tolist()
    n_train = int(len(x["train"]))
    prior = [p / max(n_train, 1) for p in positives]
    head, best_epoch, history = fit_head(x, y, cfg, positives, n_train, opts)
    with torch.no_grad():
        val_scores = torch.sigmoid(head(x["val"])).cpu().numpy()
    yva = y["val"].cpu().numpy().astype(np.uint8)
    judged = tune_and_judge(val_scores, yva, cfg.thresholds, prior)
    record = history[best_epoch - 1] | judged.record()
    history[best_epoch - 1] = record
    collapse = judged.collapse(vocab, history, training_facts(cfg))
    record["collapsed"] = collapse["collapsed"]

    model_nn = predictor.model
    model_nn.reset_classifier(len(vocab))
    with torch.no_grad():
        fc = model_nn.get_classifier()
        fc.weight.copy_(head.weight.detach().to(fc.weight.device))
        fc.bias.copy_(head.bias.detach().to(fc.bias.device))
    rundir.write_run_files(out, cfg, vocab, positives, n_train)
    rundir.write_best(out, model_nn.state_dict(), judged.policy, best_epoch, judged.metrics, record)
    rundir.write_history(out, history)
    seconds = time.time() - t0
    result = HeadResult(out, int(have.sum()) - computed, computed, unreadable, best_epoch, dict(judged.metrics), collapse,
                        seconds)
    storage.write_text(storage.join(out, HEAD_FILE), json.dumps({
        "source_run": model, "source_model": predictor.art.model_id, "embeddings": embeddings, "embedding": info,
        "manifest": manifest, "options": asdict(opts), "from_embeddings": result.from_embeddings,
        "computed": computed, "unreadable": len(unreadable), "seconds": seconds,
    }, indent=1))
    return result
