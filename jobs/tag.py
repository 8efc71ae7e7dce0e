"""Ray job entrypoint for bulk tagging (the same as `mlray tag`).

    ray job submit --working-dir . -- python jobs/tag.py --model RUN_DIR --input s3://bucket/new/ \
        --out s3://bucket/tags/ --incremental --num-gpus 1 --concurrency 4

Exit code 0: every input row is in OUT exactly once; the summary is printed and
written to OUT/_summary.json (rows in, scored, errors by reason, images/s, drift).
3 with --fail-on-drift: the same, and the corpus drifted from the model's
validation split (``ray job submit`` reports 1; the job's driver_exit_code is 3).
"""

from _entry import run

run('tag')
