"""Where the jobs run: the embedded local Ray, or the cluster they were sent to.

With ``RAY_ADDRESS`` set (``ray job submit`` sets it for the entrypoint) the job
joins that cluster; without it, a fresh local Ray starts inside the process
(``address="local"`` ignores a stale ``ray_current_cluster`` file).
"""

from __future__ import annotations

import logging
import os
import sys


# glibc malloc settings for the processes that run models and decode images.
# By default glibc serves big blocks with fresh mmap'd pages and hands them back
# on free, and gives each thread its own arena (Ray Data calls actor UDFs from a
# worker thread), so every forward pass page-faults its activations in again.
# Measured here, batched EfficientNet-Lite0 inference at 128 px in a Ray actor:
# about 240 images/s with the defaults, 590 with these. They only take effect at
# process start, hence environment variables for Ray workers.
WORKER_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1),
}


def worker_runtime_env(extra: dict[str, str] | None = None) -> dict:
    return {"env_vars": {**WORKER_ENV, **(extra or {})}}


def quiet_train_reports() -> None:
    """Ray Train logs every ``ray.train.report`` at INFO, a dump of the whole
    metrics dict per epoch beside mlray's own one-line summary. Its logger is
    named after the module's file path, hence the lookup."""
    import importlib.util
    import logging

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def quiet_embedded_ray() -> None:
    """Worker set-up hook of the embedded local Ray. It runs without the dashboard,
    so without the State API, which Ray Train's placement-group cleaner polls
    every second and warns about each time. On the embedded Ray the cleaner has
    nothing to guard (the whole Ray ends with the process), so it is silenced."""
    import logging

    quiet_train_reports()
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def quiet_console() -> None:
    """What Ray says that tells a user nothing: Ray Data's per-dataset INFO lines,
    the driver's start-up INFO, and deprecation warnings about Ray's own settings."""
    import logging
    import warnings

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Progress bars disabled..." in logs: mlray draws its own progress there
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
    warnings.filterwarnings("ignore", message=r".*deprecated.*", module=r"ray(\.|$)")


def init_ray(num_cpus: int | None = None, quiet: bool = False) -> None:
    """Join the cluster of ``RAY_ADDRESS``, or start the embedded local Ray.

    ``quiet`` (the tagging job, whose console shows a progress bar): Ray's own
    INFO and deprecation lines are dropped, and on the embedded Ray the worker
    processes' output (worker-count and actor-restart notes, per-operator
    messages) goes to Ray's session logs only, not to the console. Errors
    still reach the console: they come back as exceptions."""
    import ray

    if quiet:
        quiet_console()
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
    level = {"logging_level": logging.WARNING} if quiet else {}
    if address:
        ray.init(address=address, log_to_driver=True, **level)
    else:
        from mlray.storage import s3_env

        # Ray keeps as many *idle* workers as there are CPUs and kills the rest
        # after a second. Between two epochs (validation runs in between) that
        # killed the decode workers, so every epoch's stream began by starting
        # Python processes again: 1.9 s before the first batch here, 0.6-1.0 s
        # with a few more kept (each idle worker costs ~100 MB).
        system = {}
        if "RAY_num_workers_soft_limit" not in os.environ:
            system["num_workers_soft_limit"] = max(8, 2 * (num_cpus or os.cpu_count() or 1))
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet,
            runtime_env={**worker_runtime_env(s3_env()), "worker_process_setup_hook": "mlray.runtime.quiet_embedded_ray"},
            _system_config=system or None, **level,
        )


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
