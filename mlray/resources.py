"""Will the job's workers ever start? Checked on the driver before any of them does.

Ray schedules what does not fit by waiting: a worker group asking for more CPUs
or GPUs than the embedded local Ray has waits forever, and on a cluster it waits
for nodes the autoscaler may never add. So each job describes its workers (a
``Demand``: how many, what each needs, how they are placed) and calls
``ensure_resources`` first:

* on the embedded local Ray (a fixed-size machine) a demand beyond it is refused
  at once, naming the keys or flags that set it;
* on a cluster (``RAY_ADDRESS``) the same bundles are reserved as a placement
  group, the job says once what it waits for, and gives up after ``wait``
  seconds (None: waits as long as it takes);
* with GPUs, one short task on a reserved GPU reports that node's torch build,
  CUDA and driver (``gpu_facts``), and a torch without CUDA, or a driver too old
  for torch's CUDA, is refused naming both (``cuda_problem``).

The decisions (``shortfall``, ``cuda_problem``) are pure functions of plain facts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from mlray.config import DEFAULT_RESOURCE_WAIT

# Linux drivers each CUDA major version needs (NVIDIA's CUDA compatibility table:
# the minimum for minor-version compatibility within the major version).
MIN_DRIVER = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580, 65, 6)}
PROBE_TIMEOUT_S = 180.0  # the GPU check: a fresh worker process importing torch on a node just started


class ResourceError(RuntimeError):
    """The job's workers can never start here, or did not in the time allowed; the message names the keys."""


@dataclass(frozen=True)
class Demand:
    """What a job's workers need: ``count`` bundles of ``per`` resources placed by
    ``strategy`` (Ray's placement strategies). ``count_key`` and ``keys`` say how
    the user sets them (``"scaling.num_workers=8"``, ``{"CPU": "scaling.cpus_per_worker=4"}``),
    ``what`` names the workers, ``wait_key`` the setting of the cluster wait."""

    what: str
    count: int
    per: dict[str, float]
    count_key: str
    keys: dict[str, str]
    strategy: str = "PACK"
    wait_key: str = ""
    extra: dict[str, float] = field(default_factory=dict)  # beside the bundles, on the same machine (e.g. decode CPUs)
    extra_key: str = ""

    @property
    def bundles(self) -> list[dict[str, float]]:
        return [{k: v for k, v in self.per.items() if v > 0} for _ in range(self.count)]

    def text(self) -> str:
        per = ", ".join(f"{_num(v)} {k}" for k, v in self.per.items() if v > 0)
        return f"{self.count} {self.what} x ({per}), {self.strategy}"


def _num(v: float) -> str:
    return f"{v:g}"


def _fits_in(node: dict[str, float], per: dict[str, float]) -> int:
    """How many bundles of ``per`` one node holds."""
    counts = [int(node.get(k, 0.0) / v + 1e-9) for k, v in per.items() if v > 0]
    return min(counts) if counts else 0


def shortfall(demand: Demand, nodes: list[dict[str, float]]) -> str | None:
    """Why ``demand`` can never be placed on ``nodes`` (each node's total
    resources), or None when it can. The first reason found: a resource whose
    total falls short, one bundle larger than every node, or the bundles not
    placeable by the strategy (STRICT_PACK: all on one node; STRICT_SPREAD: one
    per node). ``demand.extra`` must fit beside the bundles."""
    per = {k: v for k, v in demand.per.items() if v > 0}
    for k, v in per.items():
        need = v * demand.count + demand.extra.get(k, 0.0)
        have = sum(n.get(k, 0.0) for n in nodes)
        if need > have + 1e-9:
            key = demand.keys.get(k, k)
            extra = f" + {demand.extra_key}" if demand.extra.get(k) else ""
            return (f"{demand.count_key} x {key}{extra} needs {_num(need)} {k}, and "
                    f"{'the cluster has' if len(nodes) != 1 else 'this machine has'} {_num(have)}")
    holds = [_fits_in(n, per) for n in nodes]
    if per and max(holds, default=0) == 0:
        biggest = max(nodes, key=lambda n: sum(n.get(k, 0.0) / v for k, v in per.items()), default={})
        has = ", ".join(f"{_num(biggest.get(k, 0.0))} {k}" for k in per)
        keys = " and ".join(demand.keys.get(k, k) for k in per)
        return f"one of the {demand.what} ({keys}) is larger than every node (the largest has {has})"
    if demand.strategy == "STRICT_PACK" and max(holds, default=0) < demand.count:
        return (f"{demand.count_key} with placement STRICT_PACK needs all {demand.count} on one node, which holds "
                f"at most {max(holds, default=0)}")
    if demand.strategy == "STRICT_SPREAD" and sum(1 for h in holds if h) < demand.count:
        return (f"{demand.count_key} with placement STRICT_SPREAD needs {demand.count} nodes, and "
                f"{sum(1 for h in holds if h)} can hold one")
    if sum(holds) < demand.count:
        return f"{demand.count_key}: the nodes hold {sum(holds)} of the {demand.count} {demand.what} ({demand.text()})"
    return None


def embedded() -> bool:
    """Whether the job runs on the embedded local Ray (this machine, fixed size)
    rather than a cluster that may grow (``RAY_ADDRESS``)."""
    return not os.environ.get("RAY_ADDRESS")


def _nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _max_cluster() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler config allows, where Ray
    knows it (the same bound Ray Train checks); None otherwise."""
    try:
        from ray._private import state

        return state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: without it the job just waits
        return None


def ensure_resources(demand: Demand, wait: float | None = DEFAULT_RESOURCE_WAIT, *, gpu_flag: str = "",
                     say: Callable[[str], None] | None = None) -> None:
    """Return once ``demand`` can be placed; raise ``ResourceError`` when it never
    can (embedded Ray) or was not within ``wait`` seconds (a cluster). With GPUs
    in the demand (``gpu_flag`` names the setting), one bundle's node is checked
    for a torch that can use them. Ray must be initialised."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    gpu_flag = gpu_flag if demand.per.get("GPU") else ""
    if embedded():
        short = shortfall(demand, _nodes())
        if short:
            raise ResourceError(f"{short}: the embedded local Ray has this machine's resources and no more; "
                                "lower them, or submit the job to a cluster (RAY_ADDRESS)")
        if gpu_flag:
            _probe(demand, gpu_flag, None)
        return
    limit = _max_cluster()
    short = shortfall(demand, [limit]) if limit else None
    if short:
        raise ResourceError(f"{short} at most (the cluster's autoscaler limits); lower them, or raise the "
                            "cluster's max_workers")
    _reserve(demand, wait, gpu_flag, say)


def _reserve(demand: Demand, wait: float | None, gpu_flag: str, say: Callable[[str], None]) -> None:
    """Reserve the bundles as a placement group (what the workers will ask for,
    placed the same way), probe a GPU in it when asked, and release it."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(demand.bundles, strategy=demand.strategy)
    try:
        ready, _ = ray.wait([pg.ready()], timeout=2.0)
        if not ready:
            limit = "as long as it takes" if wait is None else f"up to {_num(wait)} s"
            say(f"waiting for the cluster to fit {demand.text()}: {limit} ({demand.wait_key})")
            ready, _ = ray.wait([pg.ready()], timeout=None if wait is None else max(0.0, wait - 2.0))
        if not ready:
            flag = demand.wait_key.startswith("--")
            raise ResourceError(
                f"{demand.count_key} x {', '.join(demand.keys.values())}: the cluster did not fit "
                f"{demand.text()} within {demand.wait_key}{' ' if flag else '='}{_num(wait)} s; free or add nodes, "
                f"lower them, or wait longer ({demand.wait_key}{' with no value' if flag else '=null'} waits as "
                "long as it takes)"
            )
        if gpu_flag:
            _probe(demand, gpu_flag, pg)
    finally:
        remove_placement_group(pg)


def _probe(demand: Demand, gpu_flag: str, pg) -> None:
    """Run ``gpu_facts`` on a GPU of the kind the workers get (in the reserved
    placement group, when there is one) and refuse what ``cuda_problem`` finds."""
    import ray

    options: dict = {"num_cpus": 0, "num_gpus": demand.per["GPU"], "max_retries": 0}
    if pg is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
    ref = ray.remote(gpu_facts).options(**options).remote()
    try:
        facts = ray.get(ref, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise ResourceError(f"{gpu_flag}: the GPU check on a worker node did not answer within "
                            f"{PROBE_TIMEOUT_S:.0f} s") from None
    problem = cuda_problem(facts, gpu_flag)
    if problem:
        raise ResourceError(problem)


# ---------------------------------------------------------------------------- the GPU check


def _driver_version() -> str | None:
    """The NVIDIA driver's version on this node: from the kernel module, else nvidia-smi."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            for token in f.readline().split():
                if token[:1].isdigit() and token.count(".") >= 1:
                    return token
    except OSError:
        pass
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15).stdout.split()
            return out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def gpu_facts() -> dict:
    """What this process's torch makes of its GPUs: its version and CUDA build,
    whether CUDA works, how many GPUs it sees, and the driver's version. Runs as
    a Ray task on a GPU the workers will use (``ensure_resources``), or anywhere."""
    import platform

    import torch

    return {
        "torch": torch.__version__, "cuda": torch.version.cuda, "available": bool(torch.cuda.is_available()),
        "devices": torch.cuda.device_count() if torch.version.cuda else 0, "driver": _driver_version(),
        "node": platform.node(),
    }


def _version(text: str | None) -> tuple[int, ...]:
    out = []
    for part in (text or "").split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def cuda_problem(facts: dict, flag: str) -> str | None:
    """Why torch cannot use the GPU it was given (``gpu_facts``), naming ``flag``,
    the torch build and the driver; None when it can."""
    if facts.get("available"):
        return None
    torch_v, cuda, driver = facts.get("torch"), facts.get("cuda"), facts.get("driver")
    where = f" on {facts['node']}" if facts.get("node") else ""
    if not cuda:
        return (f"{flag}: torch {torch_v}{where} is a CPU-only build (torch.version.cuda is None); install a CUDA "
                "build of torch there, or train/score on CPU")
    if not driver:
        return f"{flag}: torch {torch_v} (CUDA {cuda}){where} finds no NVIDIA driver; install one, or run on CPU"
    need = MIN_DRIVER.get(_version(cuda)[:1][0] if _version(cuda) else -1)
    if need and _version(driver) < need:
        return (f"{flag}: NVIDIA driver {driver}{where} is older than torch {torch_v}'s CUDA {cuda} needs "
                f"({'.'.join(map(str, need))} or later); update the driver, or install a torch built for an older "
                "CUDA")
    return (f"{flag}: torch {torch_v} (CUDA {cuda}){where} cannot use the GPU Ray gave it "
            f"(torch.cuda.is_available() is False, driver {driver})")
