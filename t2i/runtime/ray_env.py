"""Starting or joining Ray, and what t2i reads from it: CPUs and GPUs, the environment
knobs Ray reads at start, and the submitted job's runtime environment.

The one home of Ray's private APIs in t2i. No Ray Train here, so serving can use it.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import ray
import ray.data

from t2i import console

# Up to this many CPUs in the whole cluster, Ray Data's read tasks and the training workers
# starve each other without a cap (the default run hung on 2 cores); above it the cap would
# only slow the feed, so Ray Data decides.
SMALL_CLUSTER_CPUS = 4
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the submitted driver


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


def decide_gpu(visible: float, could_scale_to: float | None, workers: int) -> bool:
    """``use_gpu = "auto"``: one GPU per worker from the GPUs up now, or, on an autoscaling
    cluster whose GPU nodes are still down (the shipped AWS and KubeRay configs start with
    none), from the most its node types could provide, so the autoscaler starts GPU nodes
    instead of the run landing on their CPUs."""
    needed = max(1, workers)
    return visible >= needed or (could_scale_to or 0) >= needed


def cluster_has_gpus(needed: int) -> bool:
    """Whether the connected cluster has, or its autoscaler could start, ``needed`` GPUs."""
    try:  # what an autoscaling cluster's node types could provide (Ray Train V2 reads it too)
        limits = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler state (a local or fixed-size cluster)
        limits = None
    return decide_gpu(ray.cluster_resources().get("GPU", 0), (limits or {}).get("GPU"), needed)


def use_gpu(setting: str, workers: int) -> bool:
    """``train.use_gpu`` ("auto", "true" or "false") for ``workers`` workers."""
    if setting != "auto":
        return setting == "true"
    return cluster_has_gpus(workers)


def submitted_job_config() -> str | None:
    """The job config (JSON) Ray's job supervisor hands a driver started by ``ray job submit``."""
    return os.environ.get(JOB_CONFIG_ENV)


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
        for key, value in local_ray_env(usable_cpus()).items():
            os.environ.setdefault(key, value)
    loud = console.verbose()
    context = ray.init(log_to_driver=loud, logging_level=logging.INFO if loud else logging.WARNING)
    if not loud:
        where = "cluster at " + os.environ["RAY_ADDRESS"] if os.environ.get("RAY_ADDRESS") else "started locally"
        dashboard = "http://" + context.dashboard_url if context.dashboard_url else "off"
        print(f"t2i: Ray {where}; dashboard {dashboard}; --verbose shows Ray's own logs", flush=True)
