"""Starting or joining Ray, and what t2i reads from it: the shapes of its nodes, CPUs and
GPUs, whether CUDA works where a GPU was granted, and the environment knobs Ray reads at start.

The one home of Ray's private APIs and internal ``RAY_*`` knobs in t2i: each is used through
:func:`private_api`, which says loudly when a Ray other than the one t2i was written for
no longer offers it. No Ray Train here, so serving can use it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.data

from t2i import console
from t2i.errors import T2IError

# Up to this many CPUs in the whole cluster, Ray Data's read tasks and the training workers
# starve each other without a cap (the default run hung on 2 cores); above it the cap would
# only slow the feed, so Ray Data decides. Such a cluster also gets the small-machine profile.
SMALL_CLUSTER_CPUS = 4
SMALL_MACHINE_CPUS_PER_WORKER = 0.45  # < 1 so Ray Data's read tasks keep a CPU (0.5 each hung on 2 cores)
WORKER_CPU_SHARE = 0.75  # of a node's CPUs per worker (per GPU): the rest decodes data for it
RAY_WRITTEN_FOR = "2.60"  # the Ray whose private APIs and knobs this module uses
_warned: set[str] = set()


def private_api(what: str, call, fallback):
    """``call()`` a private Ray API; if it fails, a loud warning (once) naming the Ray version,
    then ``fallback``. Never a silent change of behaviour."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - any failure of an internal API is reported the same way
        if what not in _warned:
            _warned.add(what)
            print(f"t2i: warning: Ray {ray.__version__}'s {what} failed ({type(exc).__name__}: {exc}); t2i was "
                  f"written for Ray {RAY_WRITTEN_FOR}.x, whose internal API it uses here", flush=True)
        return fallback


def alive_hosts() -> set[str]:
    """The addresses of the hosts the running Ray cluster's live nodes are on."""
    return {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota
    (a container's ``--cpus``), not the host's count that ``os.cpu_count()`` reports."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def worker_threads(assigned_cpus: float, usable: int, local_workers: int) -> int:
    """Intra-op threads for one worker: the whole CPUs Ray assigned it; with a fraction of a
    CPU (the small-machine setting that leaves Ray Data room), an equal share of the CPUs
    this node really has."""
    if assigned_cpus >= 1:
        return min(int(assigned_cpus), usable)
    return max(1, usable // max(1, local_workers))


def assigned_cpus() -> float:
    """The CPUs Ray granted the calling worker or actor (0 in the driver)."""
    return ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)


def data_cpu_budget(limit: float, cluster_cpus: float) -> float:
    """``train.data_cpu_limit`` where the cluster is small enough to need it, else 0 (no cap)."""
    return limit if 0 < cluster_cpus <= SMALL_CLUSTER_CPUS else 0.0


def decide_gpu(visible: float, could_scale_to: float | None, needed: float) -> bool:
    """``use_gpu = "auto"``: the GPUs the workers ask for (``needed``, at least a share of one)
    from the GPUs up now, or, on an autoscaling cluster whose GPU nodes are still down (the
    shipped AWS and KubeRay configs start with none), from the most its node types could
    provide, so the autoscaler starts GPU nodes instead of the run landing on their CPUs."""
    needed = needed if needed > 0 else 1
    return visible >= needed or (could_scale_to or 0) >= needed


def _autoscaler_config():
    """The autoscaler's view of the cluster's node types (None without an autoscaler)."""
    return private_api("cluster config (ray._private.state.state.get_cluster_config)",
                       lambda: ray._private.state.state.get_cluster_config(), None)


_UNANSWERED = object()  # a private API that failed, as opposed to one that answered None


def cluster_has_gpus(needed: float) -> bool:
    """Whether the connected cluster has, or its autoscaler could start, ``needed`` GPUs."""
    visible = ray.cluster_resources().get("GPU", 0)
    limits = private_api("autoscaler limits (ray._private.state.state.get_max_resources_from_cluster_config)",
                         lambda: ray._private.state.state.get_max_resources_from_cluster_config(), _UNANSWERED)
    decided = decide_gpu(visible, None if limits is _UNANSWERED else (limits or {}).get("GPU"), needed)
    if not decided and limits is _UNANSWERED:
        print(f"t2i: warning: use_gpu=auto sees {visible:g} GPU(s) up and could not ask the autoscaler for more: "
              "training on CPU; set train.use_gpu=true to wait for GPU nodes", flush=True)
    return decided


def use_gpu(setting: str, workers: int, gpu_share: float = 1.0) -> bool:
    """``train.use_gpu`` ("auto", "true" or "false") for ``workers`` workers of ``gpu_share`` GPU each."""
    if setting != "auto":
        return setting == "true"
    return cluster_has_gpus(max(1, workers) * gpu_share)


@dataclass(frozen=True)
class NodeShape:
    cpus: float
    gpus: float


def node_shapes() -> list[NodeShape]:
    """The nodes that are up, and one of each node type an autoscaler could start (an
    autoscaling cluster's GPU nodes are often all down when a job is submitted)."""
    shapes = [NodeShape(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0))
              for n in ray.nodes() if n.get("Alive")]
    config = _autoscaler_config()
    for group in getattr(config, "node_group_configs", None) or []:
        shapes.append(NodeShape(float(group.resources.get("CPU", 0)), float(group.resources.get("GPU", 0))))
    return shapes


def choose_cpus_per_worker(setting: float, gpu: bool, workers: int, cluster_cpus: float,
                           shapes: list[NodeShape], gpu_share: float = 1.0) -> tuple[float, str]:
    """``train.cpus_per_worker`` (0 = auto) and why: the small-machine profile on clusters of
    at most ``SMALL_CLUSTER_CPUS`` CPUs; with GPUs, ``WORKER_CPU_SHARE`` of a GPU node's CPUs
    per GPU, times the worker's ``gpu_share`` of one; on CPUs, that share of the workers' part
    of the cluster (at most one node's)."""
    if setting > 0:
        return setting, "set"
    if cluster_cpus <= SMALL_CLUSTER_CPUS:
        return SMALL_MACHINE_CPUS_PER_WORKER, f"small-machine profile: the cluster has {cluster_cpus:g} CPUs"
    if gpu:
        per_gpu = [s.cpus / s.gpus for s in shapes if s.gpus >= 1 and s.cpus > 0]
        if not per_gpu:
            return 1.0, "no GPU node's CPU count is known yet"
        shared = "" if gpu_share == 1 else f" x {gpu_share:g}"
        return max(1.0, math.floor(WORKER_CPU_SHARE * min(per_gpu) * gpu_share)), \
            f"{WORKER_CPU_SHARE:.0%} of a GPU node's {min(per_gpu):g} CPUs per GPU{shared}"
    largest = max((s.cpus for s in shapes), default=cluster_cpus)
    share = min(largest, cluster_cpus / max(1, workers))
    return max(1.0, math.floor(WORKER_CPU_SHARE * share)), f"{WORKER_CPU_SHARE:.0%} of {share:g} CPUs per worker"


class GPUUnavailableError(T2IError):
    """A worker that was granted a GPU cannot use CUDA."""


def nvidia_driver_version() -> str | None:
    """The node's NVIDIA kernel driver version, or None when it has none."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    for word in text.split():
        if word.count(".") >= 1 and word.replace(".", "").isdigit():
            return word
    return text.splitlines()[0].strip() if text else None


# The driver each CUDA major version needs at least (NVIDIA's CUDA toolkit release notes, Linux).
MIN_DRIVER_FOR_CUDA = {"13": "580", "12": "525", "11": "450"}


def cuda_problem() -> str | None:
    """Why CUDA cannot be used in this process (None when it can): the node, its driver and
    the CUDA version torch was built for, in one line."""
    import torch  # noqa: PLC0415 - only workers that asked for a GPU check

    if torch.cuda.is_available():
        return None
    built = torch.version.cuda
    need = MIN_DRIVER_FOR_CUDA.get((built or "").split(".")[0])
    driver = nvidia_driver_version()
    return (f"a GPU was granted but CUDA is unusable on node {ray.util.get_node_ip_address()} "
            f"({socket.gethostname()}): NVIDIA driver {driver or 'not found'}, torch {torch.__version__} built for "
            f"CUDA {built or 'none (a CPU build)'}" + (f" (needs driver >= {need})" if need else "")
            + "; see cluster/README.md, First GPU run")


def submitted_working_dir() -> str | None:
    """The ``--working-dir`` of the ``ray job submit`` that started this driver (None outside a job)."""
    if not ray.is_initialized():
        return None
    return (ray.get_runtime_context().runtime_env or {}).get("working_dir") or None


def ray_env_before_init() -> None:
    """Environment knobs Ray reads at import or start (before ``ray.init``; a local Ray's
    processes inherit them; a cluster's raylets keep their own). Each stays overridable."""
    # Ray starts workers at niceness 15, below its own raylet, GCS, dashboard and agents:
    # on a small machine every wake-up of those stalls the training worker's kernels.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if console.verbose():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else worker prints appear twice
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # a FutureWarning in every Train run


def quiet_ray_data() -> None:
    """Ray Data's per-execution plans and progress bars off. Each Dataset copies the current
    ``DataContext`` when it is created: call this before building datasets."""
    if console.verbose():
        return
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    context.execution_options.verbose_progress = False


def local_ray_env(cpus: int) -> dict[str, str]:
    """Settings for a Ray that t2i starts on this machine (see :func:`start_ray`); the
    user's environment wins over each."""
    env = {
        # One Parquet footer-reader actor instead of Ray Data's pool of 32, which on a small
        # machine took seconds to start for every read.
        "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
        # Train's preemption watcher looks for cloud nodes being drained; one machine has none.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }
    if cpus <= SMALL_CLUSTER_CPUS:
        # No pool of idle workers: each Python process of Ray wakes 100 times a second.
        env |= {"RAY_num_workers_soft_limit": "0", "RAY_prestart_worker_first_driver": "0"}
    return env


def small_cluster_settings(cluster_cpus: float) -> None:
    """On a cluster of at most ``SMALL_CLUSTER_CPUS`` CPUs (the driver's process, before its
    datasets are read): one Parquet footer reader, whose pool of 32 left killed actors
    ("failed" tasks) on a small cluster's job page. The user's environment wins."""
    if 0 < cluster_cpus <= SMALL_CLUSTER_CPUS:
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")


def start_ray() -> None:
    """Connect to the cluster at RAY_ADDRESS, or start a local one with :func:`local_ray_env`
    (a cluster keeps its own settings: set them in its runtime environment).

    Unless verbose, the output of Ray's workers and actors (Ray Data's execution plans,
    Train's state transitions, deprecation warnings) stays in Ray's log files
    (``log_to_driver=False``); the epoch lines reach the driver through ``t2i.runtime.relay``."""
    if ray.is_initialized():
        return
    ray_env_before_init()
    if not os.environ.get("RAY_ADDRESS"):
        if not ray.__version__.startswith(RAY_WRITTEN_FOR + "."):
            print(f"t2i: warning: Ray {ray.__version__}: the internal RAY_* settings t2i gives a local Ray "
                  f"were chosen for Ray {RAY_WRITTEN_FOR}.x and may be ignored", flush=True)
        for key, value in local_ray_env(usable_cpus()).items():
            os.environ.setdefault(key, value)
    loud = console.verbose()
    context = ray.init(log_to_driver=loud, logging_level=logging.INFO if loud else logging.WARNING)
    if not loud:
        where = "cluster at " + os.environ["RAY_ADDRESS"] if os.environ.get("RAY_ADDRESS") else "started locally"
        dashboard = "http://" + context.dashboard_url if context.dashboard_url else "off"
        print(f"t2i: Ray {where}; dashboard {dashboard}; --verbose shows Ray's own logs", flush=True)
