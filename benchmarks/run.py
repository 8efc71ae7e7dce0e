"""`make bench`: every benchmark, each against its baseline in the same run, then
one table (also written to out/bench/results.md).

    python -m benchmarks.run [--skip-quality]

The quality benchmark needs Debian's clip art (`apt-get install openclipart-png openclipart-svg`)
and takes about an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os

from benchmarks import ingest, quality, tag_throughput, train_throughput
from benchmarks.common import OUT, fmt_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    rows = ingest.main([]) + train_throughput.main([]) + tag_throughput.main([])
    table = fmt_table(
        ["benchmark", "mlray", "baseline", "baseline value", "ratio"],
        [[r["benchmark"], f"{r['mlray_img_s']:.1f} img/s", r["baseline"], f"{r['baseline_img_s']:.1f} img/s", r["ratio"]]
         for r in rows if "mlray_img_s" in r]
        + [[r["benchmark"], f"{r['peak_rss_10n_mb']:.0f} MB at {10 * r['images_n']} images",
            f"same job at {r['images_n']} images", f"{r['peak_rss_n_mb']:.0f} MB", r["ratio"]]
           for r in rows if "peak_rss_n_mb" in r],
    )
    print("\n" + table)
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write(table + "\n")
    if not args.skip_quality:
        quality.main([])


if __name__ == "__main__":
    main()
