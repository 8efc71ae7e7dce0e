"""Ray job entrypoint for training (the same as `mlray train`).

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/demo.yaml [key=value ...]
"""

from _entry import run

run('train')
