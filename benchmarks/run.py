"""`make bench`: every benchmark, each against its baseline in the same run, then
one table (also written to out/bench/results.md). Every case runs in its own
process, interleaved with its baseline over 3 rounds; values are medians with
their range, ratios are taken round by round.

    python -m benchmarks.run [--skip-quality]

The quality benchmark needs Debian's clip art (`apt-get install openclipart-png openclipart-svg`)
and takes about an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os

from benchmarks import ingest, quality, tag_throughput, train_throughput
from benchmarks.common import OUT, fmt_spread, fmt_table


# The targets of the throughput issue, printed beside the measured medians.
TARGETS = {
    "ingest: decode+resize+augment, later epochs from memory (default)": ">= 1.1",
    "ingest: decode+resize+augment, later epochs from local disk, cold (data.cache_mb=0)": ">= 1.1",
    "ingest: decode+resize+augment, streamed every epoch (data.cache_mb=0, data.cache_disk_mb=0)": ">= 1.1",
    "ingest: decode+resize": ">= 0.6", "train": ">= 0.85",
    "tag, steady state": ">= 1.0", "tag, 6000 files, start-up included": ">= 0.8", "tag memory": "<= 1.1",
}


def _target(row: dict) -> str:
    want = TARGETS.get(row["benchmark"])
    if not want:
        return ""
    op, value = want.split()
    ratio = row["ratio"]["median"]
    met = ratio >= float(value) if op == ">=" else ratio <= float(value)
    return f"{want}: {'met' if met else 'NOT met'}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    rows = ingest.main([]) + train_throughput.main([]) + tag_throughput.main([])
    table = fmt_table(
        ["benchmark", "mlray (median, range)", "baseline", "baseline value", "ratio (median, range over rounds)",
         "target"],
        [[r["benchmark"], fmt_spread(r["mlray_img_s"]) + " img/s", r["baseline"],
          fmt_spread(r["baseline_img_s"]) + " img/s", fmt_spread(r["ratio"], 2), _target(r)]
         for r in rows if "mlray_img_s" in r]
        + [[r["benchmark"], fmt_spread(r["peak_pss_10n_mb"], 0) + f" MB at {10 * r['images_n']} images",
            f"same job at {r['images_n']} images", fmt_spread(r["peak_pss_n_mb"], 0) + " MB", fmt_spread(r["ratio"], 3),
            _target(r)]
           for r in rows if "peak_pss_n_mb" in r],
    )
    print("\n" + table)
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write(table + "\n")
    if not args.skip_quality:
        quality.main([])


if __name__ == "__main__":
    main()
