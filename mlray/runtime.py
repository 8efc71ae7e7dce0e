"""Where the jobs run: the embedded local Ray, or the cluster they were sent to.

With ``RAY_ADDRESS`` set (``ray job submit`` sets it for the entrypoint) the job
joins that cluster; without it, a fresh local Ray starts inside the process
(``address="local"`` ignores a stale ``ray_current_cluster`` file).
"""

from __future__ import annotations

import os
import sys


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.print_on_execution_start = False  # the plan of every epoch's dataset is developer detail
    if not sys.stderr.isatty():
        # In logs (CI, submitted jobs) per-operator bars become thousands of lines.
        ctx.enable_progress_bars = False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        from mlray.storage import s3_env

        env = s3_env()
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
            runtime_env={"env_vars": env} if env else None,
        )


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
