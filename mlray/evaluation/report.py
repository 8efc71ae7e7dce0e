"""``mlray evaluate``: the full metric set on a split, beside doing nothing, with pictures.

    mlray evaluate s3://bucket/runs/coco-001 --manifest s3://bucket/coco/manifest --split test

Writes to ``RUN/report/<split>/`` (or ``--out``): ``metrics.json``, the per-label
table (``per_label.parquet`` and ``.csv``: support, AP, P/R/F1, threshold),
PNG plots, and a self-contained ``report.html`` (images inlined, no JavaScript,
readable offline). It also re-tunes every threshold strategy on the validation
split and scores each on this split, which is how the default strategy is
chosen by measurement.
"""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mlray.config import DEFAULT_RESOURCE_WAIT
from mlray.io import storage
from mlray.evaluation.metrics import average_precision_per_label

PLOTS = ("history", "ap_per_label", "pr_curves", "cardinality", "baselines")


def per_label_table(vocab, scores, targets, policy) -> pa.Table:
    pred = policy.predict(scores)
    y = targets.astype(bool)
    tp = (pred & y).sum(0)
    npred, npos = pred.sum(0), y.sum(0)
    precision = np.divide(tp, npred, out=np.zeros(len(vocab)), where=npred > 0)
    recall = np.divide(tp, npos, out=np.zeros(len(vocab)), where=npos > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(vocab)), where=(precision + recall) > 0)
    ap = average_precision_per_label(scores, targets)
    return pa.table({
        "label": vocab,
        "support": npos.astype(np.int64),
        "predicted": npred.astype(np.int64),
        "AP": ap,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "threshold": np.asarray(policy.thresholds, dtype=np.float64),
        "val_support": np.asarray(policy.support or [0] * len(vocab), dtype=np.int64),
    })


# ---------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def make_plots(history: list[dict], table: pa.Table, scores, targets, policy, metrics: dict) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    out: dict[str, bytes] = {}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if history:
        ep = [h["epoch"] for h in history]
        a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
        a1.plot(ep, [h["val_loss"] for h in history], "s-", label="val loss")
        a2.plot(ep, [h["val_mAP"] for h in history], "o-", label="val mAP")
        a2.plot(ep, [h["prior_mAP"] for h in history], "--", color="gray", label="label-prior mAP")
    else:
        a1.text(0.5, 0.5, "no training history", ha="center")
    a1.set_xlabel("epoch"), a1.set_title("loss"), a1.legend()
    a2.set_xlabel("epoch"), a2.set_title("validation mAP"), a2.legend(), a2.set_ylim(0, 1)
    out["history"] = _png(fig)

    labels = table.column("label").to_pylist()
    ap = np.nan_to_num(table.column("AP").to_numpy(zero_copy_only=False), nan=-0.05)
    support = table.column("support").to_numpy()
    order = np.argsort(-ap)
    shown = order if len(order) <= 60 else np.r_[order[:30], order[-30:]]
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(shown) + 2), 4))
    ax.bar(range(len(shown)), ap[shown], color=["#4477aa" if a >= 0 else "#cccccc" for a in ap[shown]])
    ax.set_xticks(range(len(shown)), [f"{labels[i]} ({support[i]})" for i in shown], rotation=90, fontsize=7)
    ax.set_ylabel("AP"), ax.set_ylim(-0.05, 1)
    ax.set_title("AP per label, sorted (support in brackets; grey: no positives)" + (" — best 30 and worst 30" if len(order) > 60 else ""))
    out["ap_per_label"] = _png(fig)

    valid = [i for i in order if support[i] > 0]
    picks = valid[:3] + [i for i in valid[-3:] if i not in valid[:3]]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i in picks:
        p, r, _ = precision_recall_curve(targets[:, i], scores[:, i])
        ax.plot(r, p, label=f"{labels[i]} (AP {ap[i]:.2f}, n={support[i]})")
    ax.set_xlabel("recall"), ax.set_ylabel("precision"), ax.set_title("precision-recall: best and worst labels")
    ax.legend(fontsize=7), ax.set_xlim(0, 1), ax.set_ylim(0, 1.02)
    out["pr_curves"] = _png(fig)

    pred_k = policy.predict(scores).sum(1)
    true_k = targets.sum(1)
    top = int(max(pred_k.max(initial=0), true_k.max(initial=0)))
    bins = np.arange(top + 2) - 0.5
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist([true_k, pred_k], bins=bins, label=["truth", "predicted"], color=["#999999", "#4477aa"])
    ax.set_xlabel("labels per image"), ax.set_ylabel("images"), ax.legend()
    ax.set_title("label cardinality: predicted vs truth")
    out["cardinality"] = _png(fig)

    keys = ["mAP", "f1_micro", "f1_macro", "f1_samples", "subset_accuracy", "hamming_loss"]
    model = [metrics.get(k, np.nan) for k in keys]
    prior = [metrics.get(f"prior.{k}", np.nan) for k in keys]
    neg = [metrics.get(f"all_negative.{k}", np.nan) if k != "mAP" else np.nan for k in keys]
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.bar(x - 0.27, model, 0.27, label="model", color="#4477aa")
    ax.bar(x, prior, 0.27, label="label prior", color="#bbbbbb")
    ax.bar(x + 0.27, np.nan_to_num(neg), 0.27, label="all negative", color="#ee6677")
    ax.set_xticks(x, keys, rotation=20), ax.set_ylim(0, 1), ax.legend()
    ax.set_title("the model beside doing nothing (hamming loss: lower is better)")
    out["baselines"] = _png(fig)
    return out


# ---------------------------------------------------------------------------- report


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if not np.isfinite(v) else f"{v:.4f}"
    return html.escape(str(v))


def render_html(title: str, metrics: dict, collapse: dict, table: pa.Table, plots: dict[str, bytes],
                strategies: dict | None) -> str:
    rows = []
    for k in ("mAP", "micro_AP", "f1_micro", "f1_macro", "f1_samples", "jaccard_samples", "precision_micro",
              "recall_micro", "subset_accuracy", "hamming_loss", "CF1", "OF1", "lrap", "one_error",
              "coverage_error", "ranking_loss", "pred_per_image", "true_per_image", "images_without_prediction"):
        if k in metrics:
            rows.append(
                f"<tr><td>{k}</td><td><b>{_fmt(metrics[k])}</b></td><td>{_fmt(metrics.get('prior.' + k, ''))}</td>"
                f"<td>{_fmt(metrics.get('all_negative.' + k, ''))}</td></tr>"
            )
    warn = ""
    if collapse["collapsed"]:
        items = "".join(f"<li>{html.escape(r)}</li>" for r in collapse["reasons"])
        warn = (f"<div class=warn><b>Model collapse: no better than a trivial predictor.</b><ul>{items}</ul>"
                + "".join(f"<p>Likely cause: {html.escape(a)}</p>" for a in collapse["advice"]) + "</div>")
    strat = ""
    if strategies:
        srows = "".join(
            f"<tr><td>{html.escape(n)}</td><td>{_fmt(m['f1_micro'])}</td><td>{_fmt(m['f1_macro'])}</td>"
            f"<td>{_fmt(m['f1_samples'])}</td><td>{_fmt(m['images_without_prediction'])}</td>"
            f"<td>{m.get('labels_never_predicted', '')}</td></tr>"
            for n, m in strategies.items()
        )
        strat = ("<h2>Threshold strategies (tuned on val, scored here)</h2><table><tr><th>strategy</th><th>F1 micro</th>"
                 "<th>F1 macro</th><th>F1 samples</th><th>images without a label</th>"
                 f"<th>labels never predicted</th></tr>{srows}</table>")
    cols = table.column_names
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r[c])}</td>" for c in cols) + "</tr>"
        for r in sorted(table.to_pylist(), key=lambda r: -(r["support"]))
    )
    imgs = "".join(
        f'<h2>{html.escape(name.replace("_", " "))}</h2><img alt="{name}" src="{data_uri(png, "image/png")}">'
        for name, png in plots.items()
    )
    body = (f"<h1>{html.escape(title)}</h1>{warn}<h2>Metrics beside doing nothing</h2><table><tr><th>metric</th>"
            f"<th>model</th><th>label prior</th><th>all negative</th></tr>{''.join(rows)}</table>{strat}{imgs}"
            f"<h2>Per label</h2><table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{body}</table>")
    return page(title, body)


PAGE_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child{text-align:left}.warn{background:#fee;border:1px solid #c33;padding:1em}img{max-width:100%}"""


def page(title: str, body: str, style: str = "") -> str:
    """A self-contained HTML page (no JavaScript, nothing fetched): mlray's reports
    (``evaluate``, ``audit``) share this frame and style; ``style``: more CSS."""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{PAGE_STYLE}{style}</style></head><body>{body}</body></html>")


def data_uri(data: bytes, mime: str) -> str:
    """``data:`` URI of some bytes: how reports inline their pictures."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def evaluate(run: str, manifest: str, split: str = "test", out: str | None = None, *,
             batch_size: int = 64, compare_strategies: bool = True, num_gpus: float = 0.0,
             precision: str = "auto", resource_wait: float | None = DEFAULT_RESOURCE_WAIT) -> dict:
    """Score ``split`` and write the report; returns the metrics dict. ``num_gpus``:
    GPUs of the scoring actor (1 on a GPU machine; it then scores in the run's
    mixed precision, ``factory.amp_dtype``). ``precision``: ``auto``, ``fp32`` or
    ``bf16`` (``factory.scoring_dtype``); evaluate in the precision you tag in, so
    the thresholds compared on the validation split are those tagging will meet.
    First, a sample of the manifest's images must exist, and the scoring actor
    must fit (on a cluster: within ``resource_wait`` seconds; None: no limit)."""
    from mlray.config import training_facts
    from mlray.evaluation.validation import compare_strategies as compare
    from mlray.evaluation.validation import judge
    from mlray.io.manifest import check_uris
    from mlray.model.rundir import load_artifacts, read_history
    from mlray.model.scoring import score_splits, scoring_actor_cpus
    from mlray.resources import Demand, ensure_resources
    from mlray.runtime import init_ray

    art = load_artifacts(run)
    out = out or storage.join(run, "report", split)
    val_split = art.config.data.val_split
    compare_on = compare_strategies and split != val_split
    check_uris(manifest, splits=[split, val_split] if compare_on else [split], flag="--manifest")
    init_ray()
    cpus = scoring_actor_cpus(num_gpus)
    ensure_resources(Demand(what="scoring actor", count=1, per={"CPU": cpus, "GPU": num_gpus},
                            count_key="one scoring actor",
                            keys={"CPU": f"{cpus:g} CPU", **({"GPU": f"--num-gpus {num_gpus:g}"} if num_gpus else {})},
                            wait_key="--resource-wait"),
                     resource_wait, gpu_flag=f"--num-gpus {num_gpus:g}")
    scored_all = score_splits(run, manifest, [split, val_split] if compare_on else [split], batch_size=batch_size,
                              num_gpus=num_gpus, precision=precision)
    scored = scored_all[split]
    judged = judge(scored.scores, scored.targets, art.policy, art.prior)
    metrics, at_half = judged.metrics, judged.at_half
    collapse = judged.collapse(art.vocab, read_history(run), training_facts(art.config))
    strategies = None
    if compare_on:
        val = scored_all[val_split]
        strategies = compare(val.scores, val.targets, scored.scores, scored.targets, art.config.thresholds, prior=art.prior)
        strategies["fixed 0.5"] = {k: at_half[k] for k in ("f1_micro", "f1_macro", "f1_samples")} | {
            "images_without_prediction": at_half["images_without_prediction"]}
    table = per_label_table(art.vocab, scored.scores, scored.targets, art.policy)
    plots = make_plots(read_history(run), table, scored.scores, scored.targets, art.policy, metrics)
    doc = {
        "run": run, "model": art.model_id, "manifest": manifest, "split": split, "scoring_precision": precision,
        "thresholds": art.policy.strategy, "metrics": metrics, "metrics_at_0.5": at_half,
        "collapse": collapse, "decode_errors": [{"image_id": i, "error": e} for i, e in scored.errors],
        "threshold_strategies": strategies,
    }
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(doc, indent=1, default=float))
    with storage.atomic_local_file(storage.join(out, "per_label.parquet"), ".parquet") as tmp:
        pq.write_table(table, tmp)
    buf = io.StringIO()
    table.to_pandas().to_csv(buf, index=False)
    storage.write_text(storage.join(out, "per_label.csv"), buf.getvalue())
    for name, png in plots.items():
        storage.write_bytes(storage.join(out, f"{name}.png"), png)
    title = f"mlray evaluation: {art.model_id} on {split} ({len(scored.ids)} images)"
    storage.write_text(storage.join(out, "report.html"), render_html(title, metrics, collapse, table, plots, strategies))
    doc["out"] = out
    return doc


def format_summary(doc: dict) -> str:
    m = doc["metrics"]
    lines = [
        f"{doc['model']} on {doc['split']}: {int(m['n_images'])} images, {int(m['n_labels'])} labels "
        f"(thresholds: {doc['thresholds']})",
        f"{'metric':<18}{'model':>9}{'prior':>9}{'all-neg':>9}",
    ]
    for k in ("mAP", "f1_micro", "f1_macro", "f1_samples", "subset_accuracy", "hamming_loss"):
        lines.append(f"{k:<18}{m[k]:>9.4f}{m.get('prior.' + k, float('nan')):>9.4f}{m.get('all_negative.' + k, float('nan')):>9.4f}")
    lines.append(f"labels per image: predicted {m['pred_per_image']:.2f}, true {m['true_per_image']:.2f}; "
                 f"images without a label: {m['images_without_prediction']:.1%}")
    if doc["collapse"]["collapsed"]:
        from mlray.evaluation.metrics import format_collapse

        lines.append(format_collapse(doc["collapse"]))
    if doc["decode_errors"]:
        lines.append(f"{len(doc['decode_errors'])} images could not be decoded (listed in metrics.json)")
    lines.append(f"report: {storage.join(doc['out'], 'report.html')}")
    return "\n".join(lines)
