"""Where the jobs run: the embedded local Ray, or the cluster they were sent to.

With ``RAY_ADDRESS`` set (``ray job submit`` sets it for the entrypoint) the job
joins that cluster; without it, a fresh local Ray starts inside the process
(``address="local"`` ignores a stale ``ray_current_cluster`` file).

Ctrl-C and SIGTERM stop every command within seconds (``catch_interrupts``): the
signal raises ``Interrupted`` in the main thread, the job unwinds (leases are
released, what was written stays), and the embedded Ray is stopped.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


# glibc malloc settings for the processes that run models and decode images.
# By default glibc serves big blocks with fresh mmap'd pages and hands them back
# on free, and gives each thread its own arena (Ray Data calls actor UDFs from a
# worker thread), so every forward pass page-faults its activations in again.
# Batched EfficientNet-Lite0 inference in a Ray actor ran about 2.5x faster with
# these. They only take effect at process start, hence environment variables for
# Ray workers.
WORKER_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1),
}


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this machine's CPU computes in bf16 natively (``avx512_bf16``, or
    Intel's AMX ``amx_bf16``): there bf16 scores about twice as fast as fp32;
    elsewhere torch emulates it, about ten times slower than fp32 (a 6,000-image
    tagging job on an AVX2 AMD EPYC: 687 s against 60). Read from the kernel's
    CPU flags, so that a driver without torch can tell too; None where it cannot
    tell (no ``/proc/cpuinfo``, as on macOS)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return None
    return None


_EMBEDDED = {"started": False}  # this process started the local Ray, whose workers inherit its environment


def worker_runtime_env(extra: dict[str, str] | None = None) -> dict | None:
    """The ``runtime_env`` of a Ray task or actor that needs ``WORKER_ENV``. None on
    the embedded Ray, whose workers inherit it: a task-level runtime_env makes
    Ray start a fresh process for the task instead of taking an idle one."""
    inherited = all(k in os.environ for k in WORKER_ENV) and all(os.environ.get(k) == v for k, v in (extra or {}).items())
    if _EMBEDDED["started"] and inherited:
        return None
    return {"env_vars": {**WORKER_ENV, **(extra or {})}}


def quiet_train_reports() -> None:
    """Ray Train logs every ``ray.train.report`` at INFO, a dump of the whole
    metrics dict per epoch beside mlray's own one-line summary. Its logger is
    named after the module's file path, hence the lookup."""
    import logging

    import ray

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # the file's path, without importing it: every Ray worker runs this hook at
    # start, and importing ray.train costs each one ~1.2 s of CPU (decode tasks
    # and tagging actors included, which never use it)
    context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(context).setLevel(logging.WARNING)


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


def init_ray(num_cpus: int | None = None, quiet: bool = False, training: bool = False) -> None:
    """Join the cluster of ``RAY_ADDRESS``, or start the embedded local Ray.

    Ray's INFO lines on the driver are dropped. ``quiet`` (the tagging job,
    whose console shows a progress bar): Ray Data's INFO and Ray's deprecation
    lines are dropped too, and on the embedded Ray the worker
    processes' output (worker-count and actor-restart notes, per-operator
    messages) goes to Ray's session logs only, not to the console. Errors
    still reach the console: they come back as exceptions.

    ``training``: the embedded Ray's workers also silence Ray Train's
    placement-group cleaner (``quiet_embedded_ray``). Only then: a job-level
    ``runtime_env`` of any kind stops Ray from pre-starting worker processes,
    which cost the tagging job ~0.8 s before its first task and again before
    its scoring actor."""
    import ray

    if quiet:
        quiet_console()
    if ray.is_initialized():
        return
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.print_on_execution_start = False  # the plan of every epoch's dataset is developer detail
    if quiet:
        # "Operator 'MapBatches(ScoreBatches)' uses 1.5GiB ... consider setting memory=": a
        # scoring actor holds torch and its batches' activations, and tagging has no
        # flag for Ray's logical memory request, so the advice cannot be taken.
        ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    if not sys.stderr.isatty():
        # In logs (CI, submitted jobs) per-operator bars become thousands of lines.
        ctx.enable_progress_bars = False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    # Ray's INFO lines on the driver ("Started a local Ray instance", ...) tell a user
    # nothing, and would stand beside a job's one-line refusal
    level = {"logging_level": logging.WARNING}
    if address:
        _EMBEDDED["started"] = False
        ray.init(address=address, log_to_driver=True, **level)
    else:
        from mlray.io.storage import s3_env

        # Ray keeps as many *idle* workers as there are CPUs and kills the rest
        # after a second. Between two epochs (validation runs in between) that
        # killed the decode workers, so every epoch's stream began by starting
        # Python processes again: 1.9 s before the first batch here, 0.6-1.0 s
        # with a few more kept (each idle worker costs ~100 MB).
        system = {}
        if "RAY_num_workers_soft_limit" not in os.environ:
            system["num_workers_soft_limit"] = max(8, 2 * (num_cpus or os.cpu_count() or 1))
        # The embedded Ray's processes inherit this environment: the workers get
        # the malloc and S3 settings from it (a setting the user made wins).
        for k, v in {**WORKER_ENV, **s3_env()}.items():
            os.environ.setdefault(k, v)
        hook = {"runtime_env": {"worker_process_setup_hook": "mlray.runtime.quiet_embedded_ray"}} if training else {}
        _EMBEDDED["started"] = True
        _EMBEDDED["quiet"] = quiet
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet,
            _system_config=system or None, **hook, **level,
        )
        atexit.unregister(_stop_embedded_ray)
        atexit.register(_stop_embedded_ray)  # runs before Ray's own exit hook, registered when ray was imported
    if _SIGNALS["installed"]:
        catch_interrupts()


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; raised in the main thread where it was. A
    ``KeyboardInterrupt``, so libraries treat it as Ctrl-C (Ray cancels what it waits on)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_SIGNALS: dict = {"installed": False, "received": None}


def _on_signal(signum: int, frame) -> None:
    if _SIGNALS["received"] is not None:  # a second one while unwinding: leave now
        os._exit(128 + _SIGNALS["received"])
    _SIGNALS["received"] = signum
    _mute_workers()
    raise Interrupted(signum)


def _mute_workers() -> None:
    """Worker output stops reaching this console: the job is being abandoned, and
    what its workers print while they die (a terminal's Ctrl-C reaches them too;
    Ray Train's placement-group cleaner loses its GCS mid-call) would bury the one
    line that says what happened and how to continue."""
    if "ray" not in sys.modules:  # nothing started: nothing to mute
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")


def catch_interrupts() -> None:
    """SIGINT and SIGTERM raise ``Interrupted`` in the main thread from now on; a
    second signal exits at once. ``init_ray`` installs them again after Ray's own
    start-up, which sets a SIGTERM handler that exits without unwinding."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    _SIGNALS["installed"] = True


def interrupt_status(default: int = signal.SIGINT) -> tuple[str, int]:
    """The signal that interrupted the job, and the exit status a shell gives it (130 for SIGINT, 143 for SIGTERM)."""
    signum = _SIGNALS["received"] or default
    return signal.Signals(signum).name, 128 + signum


def run_interruptible(fn: Callable[[], T]) -> T:
    """``fn()`` on a helper thread while the main thread waits for it, so that
    signals reach the main thread's handlers. Ray Train's ``fit()`` on the main
    thread installs a SIGINT handler of its own that waits for the train
    controller to abort, and the controller does not answer while it waits for
    resources: Ctrl-C did nothing there. An ``Interrupted`` leaves ``fn`` running
    until the process stops Ray (``stop_ray``)."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="mlray-job", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return box["value"]


def stop_ray() -> None:
    """End this process's part in Ray now: the embedded Ray stops with its
    workers; a cluster job disconnects, and Ray ends the actors and placement
    groups it started."""
    import ray

    if not ray.is_initialized():
        return
    if _EMBEDDED["started"]:
        _stop_embedded_ray()
    ray.shutdown()


def _stop_embedded_ray() -> None:
    """Exit hook of a process that started the embedded Ray; runs before Ray's own.

    Ray's shutdown stops the GCS first and the autoscaler monitor after it; the
    monitor answers SIGTERM by reporting its own death to the GCS, which is gone,
    so it hangs until Ray kills it a second later. Killed first it holds nothing
    (the embedded cluster has no nodes to add or remove): every command paid that
    second at exit. Then, when the driver takes no worker output (``quiet``), Ray
    is shut down here: Ray's exit hook first sleeps half a second so the
    workers' last lines can reach the console, and there are none to wait for."""
    import ray
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    for info in (getattr(node, "all_processes", None) or {}).get("monitor", []):
        if info.process.poll() is None:
            info.process.kill()
            info.process.wait(timeout=5)
    if _EMBEDDED.get("quiet") and ray.is_initialized():
        ray.shutdown()


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))
