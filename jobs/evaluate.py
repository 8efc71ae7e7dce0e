"""Ray job entrypoint for evaluation (the same as `mlray evaluate`).

    ray job submit --working-dir . -- python jobs/evaluate.py RUN_DIR --manifest MANIFEST --split test
"""

from _entry import run

run('evaluate')
