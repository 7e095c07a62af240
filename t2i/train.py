"""Data-parallel training with Ray Train (V2).

``fit(cfg)`` runs on the driver: it resolves the data, builds the Ray Datasets, checks any
checkpoint it would resume from, and runs a ``TorchTrainer``. Each worker runs
``train_func``, a plain epoch loop over its model family's ``train_step`` and
``eval_terms`` (``t2i.families``: the same loop for VAEs and the GAN);
rank 0 writes a checkpoint, a sample grid and the run's metrics files every epoch.
Re-running with the same ``train.name`` and ``train.storage_path`` resumes from the latest
checkpoint. Data and runs may live in a local folder or at a URI (``t2i.storage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from t2i import checkpoint as ckpt_lib
from t2i import config as config_lib
from t2i import console, encoders, monitor, storage
from t2i.config import Config
from t2i.data import (EpochFeed, FeedPlan, build_datasets, ensure_shapes, epoch_seed, load_manifest, load_vocabulary,
                      to_model_inputs, worker_shard_bytes)
from t2i.families import Family, make_family
from t2i.generate import render_prompts
from t2i.models import build_model, count_parameters

METRIC = ckpt_lib.SELECTION_METRIC  # what Ray keeps checkpoints by (see t2i.checkpoint)
EVAL_BATCH = 256  # evaluation batch size at least (training's may be smaller)


# ----------------------------------------------------------------------------- pure parts
def term_sums(names: tuple[str, ...], device) -> torch.Tensor:
    """Zeroed running sums of ``names`` plus a final count: (len(names) + 1,) float64."""
    return torch.zeros(len(names) + 1, dtype=torch.float64, device=device)


def add_terms(sums: torch.Tensor, names: tuple[str, ...], terms: dict[str, torch.Tensor], n: int) -> None:
    """Add one batch's per-sample means (weighted by its size ``n``), for exact means
    across batches and workers."""
    sums[:-1] += torch.stack([terms[k].detach().double() for k in names]).to(sums.device) * n
    sums[-1] += n


def all_reduce_sums(sums: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    return sums


def means(prefix: str, names: tuple[str, ...], sums: torch.Tensor) -> dict[str, float]:
    values = sums.tolist()
    n = max(values[-1], 1.0)
    return {f"{prefix}_{k}": v / n for k, v in zip(names, values[:-1])}


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


def selection(metrics: dict, family: Family) -> tuple[float, str]:
    """What this epoch's checkpoint is ranked by (lower is better) and its name: the
    family's dev generation metric, or without an evaluation split its fallback train
    metric (never a warm-up- or beta-weighted loss, which would favour the warm-up epochs),
    or, for a family without one, the epoch itself so the latest ranks first."""
    if family.selection_metric in metrics:
        return metrics[family.selection_metric], family.selection_metric
    fallback = family.FALLBACK_SELECTION
    if fallback:
        return metrics[fallback], fallback
    return -float(metrics["epoch"]), "latest epoch"


def evaluate_split(family: Family, batches, device, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Sums of the family's evaluation terms over ``batches``, plus the count; combine across
    workers with :func:`all_reduce_sums` before :func:`means`."""
    family.train(False)
    sums = term_sums(family.EVAL_TERMS, device)
    for batch in batches:
        images, word_ids = to_model_inputs(batch, device)
        add_terms(sums, family.EVAL_TERMS, family.eval_terms(images, word_ids, autocast), images.shape[0])
    family.train(True)
    return sums


# ----------------------------------------------------------------------------- per worker
def train_func(loop_config: dict) -> None:
    cfg = config_lib.from_dict(loop_config["cfg"])
    run_dir = loop_config["run_dir"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    # Ray starts workers with OMP_NUM_THREADS=1; a worker granted 4 CPUs would use one.
    # Local mode runs in the driver, which has no resource grant.
    assigned = 0.0 if local_mode(cfg) else ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    torch.set_num_threads(cfg.train.torch_threads or worker_threads(assigned, usable_cpus(),
                                                                    context.get_local_world_size()))
    device = ray.train.torch.get_device()
    # bf16 needs no loss scaling, but only Ampere and later compute it natively; older GPUs
    # (and CPUs) train in fp32.
    use_amp = cfg.train.amp and device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext

    vocab = load_vocabulary(loop_config["data_root"])
    aligner_state = loop_config.get("alignment_encoder")  # trained on the driver, shipped as weights
    aligner = encoders.build(encoders.ALIGNMENT_LOSS, vocab.vectors, aligner_state) if aligner_state else None
    family = make_family(cfg, vocab.vectors, aligner)
    start_epoch, resumed = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            resumed = ckpt_lib.read_state(folder)
    elif latest := ckpt_lib.latest_in_run(run_dir):
        # Ray offers none in local mode (num_workers=0), nor when its snapshot of the run's
        # checkpoint list is missing; our model.pt files on disk still say where we were.
        resumed = ckpt_lib.read_state(latest)
    if resumed:
        family.load_networks(resumed)
        start_epoch = resumed["epoch"] + 1
    for net in family.networks().values():  # matches the channels-last images of to_model_inputs
        net.to(memory_format=torch.channels_last)
    family.wrap(ray.train.torch.prepare_model)  # DDP around every network, then optimizers
    family.to(device)
    resume = None
    if resumed:
        family.load_training_state(resumed)
        # What this attempt really restored, in workers.json: a digest of the weights and the
        # optimizer and scheduler states, comparable with the checkpoint's own (tests do).
        resume = {"epoch": resumed["epoch"], "restored_digest": ckpt_lib.state_digest(
            {"model": family.generator.state_dict(), "training": family.state_dict()})}
        print(f"[rank {rank}] resumed from epoch {resumed['epoch']}, continuing at epoch {start_epoch}")
    workers = _record_placement(run_dir, rank, device, resume)
    check_run_dir_shared(run_dir, cfg, workers, rank)

    feed = EpochFeed({"train": ray.train.get_dataset_shard("train"),
                      **{s: ray.train.get_dataset_shard(s) for s in cfg.data.eval_splits}},
                     feed_plan(cfg, loop_config["data_info"]), device, rank)
    n_train = loop_config["train_images"]
    for epoch in range(start_epoch, cfg.train.epochs):
        _fault_drill(cfg.train.fail_once_at_epoch, epoch, rank, run_dir)
        # Noise, dropout and the gan's draws restart from (seed, epoch, rank) each epoch, so
        # a resumed run trains its next epoch exactly as the uninterrupted run did.
        torch.manual_seed(epoch_seed(cfg.train.seed, epoch, rank))
        started = time.perf_counter()
        sums = term_sums(family.TRAIN_TERMS, device)
        seen = 0
        family.train(True)
        for batch in feed.train_batches(epoch):
            images, word_ids = to_model_inputs(batch, device)
            terms = family.train_step(images, word_ids, epoch + seen * world / max(n_train, 1), autocast)
            seen += images.shape[0]
            add_terms(sums, family.TRAIN_TERMS, terms, images.shape[0])
        train_seconds = time.perf_counter() - started
        sums = all_reduce_sums(sums)
        # epochs_done: Tune's clock (ASHA's time_attr). Its own training_iteration restarts at 1
        # when a restored sweep resumes a trial that Ray Train continues at a later epoch.
        metrics = {"epoch": epoch, "epochs_done": epoch + 1, **means("train", family.TRAIN_TERMS, sums),
                   "samples_per_s": sums[-1].item() / train_seconds, "lr": family.lr}
        for split in cfg.data.eval_splits:
            split_sums = all_reduce_sums(evaluate_split(family, feed.eval_batches(split), device, autocast))
            metrics.update(means(split, family.EVAL_TERMS, split_sums))
            metrics[f"{split}_pairs"] = int(split_sums[-1].item())  # every pair once, across all workers
        metrics[METRIC], metrics["selected_by"] = selection(metrics, family)
        family.end_epoch(metrics[METRIC])
        metrics["epoch_s"] = time.perf_counter() - started
        _report(metrics, rank, family, cfg, vocab, loop_config, run_dir, epoch)


def feed_plan(cfg: Config, data_info: dict) -> FeedPlan:
    # No gradients and BatchNorm in eval mode: larger batches score the same numbers faster.
    return FeedPlan(cached=data_info["mode"] == "cache", image_size=data_info["image_size"],
                    batch_size=cfg.data.batch_size, eval_batch_size=max(cfg.data.batch_size, EVAL_BATCH),
                    seed=cfg.train.seed)


def data_mode(cfg: Config, manifest: dict) -> str:
    """"cache" when one worker's share of the data fits ``data.cache_mb``, else "stream"."""
    workers = max(1, cfg.train.num_workers)
    need = worker_shard_bytes(manifest, cfg.data.eval_splits, workers, cfg.data.eval_captions)
    fits = need <= cfg.data.cache_mb * 2 ** 20
    return "cache" if fits else "stream"


def local_mode(cfg: Config) -> bool:
    """num_workers=0: the loop runs in the driver process (debugging)."""
    return cfg.train.num_workers == 0


def _fault_drill(fail_epoch: int, epoch: int, rank: int, run_dir: str) -> None:
    """Raise once in ``fail_epoch`` (marker file in the run dir) to exercise max_failures."""
    marker = storage.join(run_dir, ".fault_drill_done")
    if epoch == fail_epoch and rank == 0 and not storage.is_file(marker):
        storage.write_text(marker, f"injected failure at epoch {epoch}\n")
        raise RuntimeError(f"fault drill: injected worker failure at epoch {epoch}")


def _record_placement(run_dir: str, rank: int, device, resume: dict | None = None) -> list[dict]:
    """Where each worker of this attempt runs, appended to ``workers.json`` by rank 0: after a
    node loss the run's history shows the worker group moving. Returns every worker's place."""
    here = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(), "device": str(device)}
    everyone = [here]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, here)
    if rank != 0:
        return everyone
    path = storage.join(run_dir, "workers.json")
    attempts = json.loads(storage.read_text(path)) if storage.is_file(path) else []
    attempts.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "workers": everyone,
                     **({"resumed": resume} if resume else {})})
    storage.write_text(path, json.dumps(attempts, indent=1))
    print(f"workers on nodes: {sorted({w['node_id'][:12] for w in everyone})}")
    return everyone


def check_run_dir_shared(run_dir: str, cfg: Config, workers: list[dict], rank: int) -> None:
    """The driver's storage check sees only the nodes alive at submit time (an autoscaling
    cluster may have its head alone). Here, with the workers placed: when they span several
    hosts and the run folder is a local path, rank 0's ``workers.json`` must be visible to
    every worker, or checkpoints would land on one worker's disk and never resume elsewhere."""
    hosts = {w["node_ip"] for w in workers}
    if storage.is_uri(run_dir) or len(hosts) <= 1 or cfg.train.assume_shared_storage:
        return
    torch.distributed.barrier()  # rank 0 has written workers.json
    sees = storage.is_file(storage.join(run_dir, "workers.json"))
    seen = [None] * len(workers)
    torch.distributed.all_gather_object(seen, (workers[rank]["node_ip"], sees))
    blind = sorted({ip for ip, ok in seen if not ok})
    if blind:
        raise config_lib.ConfigError(
            f"train.storage_path: the run folder {run_dir!r} is not shared: workers on {', '.join(blind)} cannot "
            f"see what rank 0 wrote there, so checkpoints would stay on one node's disk. Use a URI "
            f"(s3://bucket/runs) or a folder every node mounts (NFS), or train.assume_shared_storage=true "
            f"if it really is shared.")


def _report(metrics, rank, family: Family, cfg, vocab, loop_config, run_dir, epoch) -> None:
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            ckpt_lib.save(folder, model=family.generator, cfg=cfg, vocab=vocab, epoch=epoch, metrics=metrics,
                          training=family.state_dict(), data=loop_config["data_info"])
            grid = render_prompts(family.generator, vocab, loop_config["prompts"], cfg.data.samples_per_prompt,
                                  loop_config["max_words"], cfg.train.seed, Path(folder) / "samples.png")
            storage.upload(grid, storage.join(run_dir, "samples", f"epoch_{epoch:03d}.png"))
            monitor.record_epoch(run_dir, metrics)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
            if local_mode(cfg):  # Ray persists nothing in local mode: keep every epoch ourselves
                storage.copy_dir(folder, storage.join(run_dir, f"checkpoint_local_epoch{epoch:04d}"))
                print(console.epoch_line(metrics, cfg.train.epochs), flush=True)  # no controller to relay it
        ray.train.report(metrics, checkpoint=checkpoint)


# ----------------------------------------------------------------------------- driver
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the submitted driver


def check_paths_under_job(cfg: Config, job_config_json: str | None) -> list[str]:
    """Under ``ray job submit --working-dir``, the driver runs in Ray's temporary copy of the
    working directory, which Ray deletes later: a relative ``train.storage_path`` would put
    the run (checkpoints included) there, and a relative ``data.path`` points at data that
    was never uploaded. Refuse those; a relative ``data.cache_dir`` only costs re-preparing
    the shapes set, so it gets a warning (returned)."""
    if not job_config_json:
        return []
    runtime_env = (json.loads(job_config_json).get("runtime_env") or {})
    if not runtime_env.get("working_dir"):
        return []
    where = f"Ray's temporary copy of the working directory ({os.getcwd()})"
    relative = {key: value for key, value in (("train.storage_path", cfg.train.storage_path),
                                              ("data.path", cfg.data.path), ("data.cache_dir", cfg.data.cache_dir))
                if value and not storage.is_uri(value) and not os.path.isabs(value)}
    refused = [f"{key}={value!r}" for key, value in relative.items() if key != "data.cache_dir"]
    if refused:
        raise config_lib.ConfigError(
            f"{', '.join(refused)}: relative paths resolve inside {where}, which Ray deletes after the job; "
            f"give absolute paths on storage every node sees, or URIs (e.g. --set train.storage_path=$PWD/runs "
            f"--data $PWD/data/f8k, or s3://bucket/runs)")
    if "data.cache_dir" in relative and not cfg.data.path:
        return [f"data.cache_dir={cfg.data.cache_dir!r} is relative: the shapes set is prepared inside {where} "
                "and again for every job; set an absolute data.cache_dir to keep it"]
    return []


def resolve_data(cfg: Config) -> str:
    """The prepared dataset's absolute location (folder or URI)."""
    if cfg.data.path:
        return storage.absolute(cfg.data.path)
    return storage.absolute(ensure_shapes(cfg.data.cache_dir, cfg.data.shapes_n, seed=0))


def run_name(cfg: Config, manifest: dict) -> str:
    return cfg.train.name or f"{manifest['dataset']}-{cfg.model.family}"


def loop_config_for(cfg: Config, data_root: str, manifest: dict, run_dir: str, vocab) -> dict:
    prompts = cfg.data.prompts or manifest.get("prompts") or []
    usable = []
    for prompt in prompts:
        known, unknown = vocab.ids(prompt)
        if not known:
            raise config_lib.ConfigError(f"validation prompt {prompt!r} has no word in the data's vocabulary "
                                         f"(unknown: {', '.join(unknown)})")
        usable.append(prompt)
    return {
        "cfg": cfg.to_dict(), "data_root": str(data_root), "run_dir": str(run_dir), "prompts": usable,
        "max_words": manifest["max_words"], "train_images": manifest["splits"]["train"]["images"],
        "data_info": {"dataset": manifest["dataset"], "path": str(data_root), "image_size": manifest["image_size"],
                      "max_words": manifest["max_words"], "embedding": json.dumps(manifest["embedding"]),
                      "mode": data_mode(cfg, manifest)},  # checkpoints and summaries say it too
    }


def check_resume(run_dir: str, cfg: Config, vocab=None, data_root: str = "the data") -> dict | None:
    """Fail before Ray starts if the run we would resume is broken or built differently
    (model, optimizer, schedule, and, given the data's ``vocab``, the vocabulary)."""
    latest = ckpt_lib.latest_in_run(run_dir)
    if latest is None:
        return None
    state = ckpt_lib.read_state(latest)
    ckpt_lib.check_compatible(state, cfg, str(latest))
    if vocab is not None:
        ckpt_lib.check_same_vocabulary(state, vocab, str(data_root), str(latest))
    return state


def _say(line: str) -> None:
    print(f"t2i: {line}", flush=True)


def use_gpu(cfg: Config) -> bool:
    if cfg.train.use_gpu != "auto":
        return cfg.train.use_gpu == "true"
    return cluster_has_gpus(cfg.train.num_workers)


def cluster_has_gpus(needed: int) -> bool:
    """Whether the connected cluster has, or its autoscaler could start, ``needed`` GPUs
    (also asked by t2i.serve for its replicas)."""
    try:  # what an autoscaling cluster's node types could provide (Ray Train V2 reads it too)
        limits = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler state (a local or fixed-size cluster)
        limits = None
    return decide_gpu(ray.cluster_resources().get("GPU", 0), (limits or {}).get("GPU"), needed)


# Up to this many CPUs in the whole cluster, Ray Data's read tasks and the training workers
# starve each other without a cap (the default run hung on 2 cores); above it the cap would
# only slow the feed, so Ray Data decides.
SMALL_CLUSTER_CPUS = 4


def data_cpu_budget(limit: float, cluster_cpus: float) -> float:
    """``train.data_cpu_limit`` where the cluster is small enough to need it, else 0 (no cap)."""
    return limit if 0 < cluster_cpus <= SMALL_CLUSTER_CPUS else 0.0


def decide_gpu(visible: float, could_scale_to: float | None, workers: int) -> bool:
    """``train.use_gpu = "auto"``: one GPU per worker from the GPUs up now, or, on an
    autoscaling cluster whose GPU nodes are still down (the shipped AWS and KubeRay configs
    start with none), from the most its node types could provide, so the autoscaler starts
    GPU nodes instead of the run landing on their CPUs."""
    needed = max(1, workers)
    return visible >= needed or (could_scale_to or 0) >= needed


@dataclass
class TrainerPlan:
    """A ready ``TorchTrainer``, its run folder, and what :func:`console.run_line` says."""
    trainer: TorchTrainer
    run_dir: str
    facts: dict


def make_trainer(cfg: Config, callbacks=(), run_name_override: str | None = None,
                 storage_override: str | None = None) -> TrainerPlan:
    """The TorchTrainer for ``cfg`` (also used by Tune trials)."""
    for warning in check_paths_under_job(cfg, os.environ.get(JOB_CONFIG_ENV)):
        _say(f"warning: {warning}")
    data_root = resolve_data(cfg)
    manifest = load_manifest(data_root)
    for split in cfg.data.eval_splits:
        if split not in manifest["splits"]:
            raise config_lib.ConfigError(f"data.eval_splits: {split!r} not in {data_root} "
                                         f"(has {sorted(manifest['splits'])})")
    name = run_name_override or run_name(cfg, manifest)
    storage_root = storage.absolute(storage_override or cfg.train.storage_path)
    check_cluster_storage(cfg, {"data.path": data_root, "train.storage_path": storage_root})
    run_dir = storage.join(storage_root, name)
    vocab = load_vocabulary(data_root)  # read once: the resume check and the loop config use it
    resumed = check_resume(run_dir, cfg, vocab, data_root)
    # The dashboard's Train view lists runs only when this is set in the driver (read there).
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    gpu = use_gpu(cfg)
    # With use_gpu each worker also gets one GPU; CPUs stay explicit (data decoding, threads).
    resources = {"CPU": cfg.train.cpus_per_worker}
    loop_config = loop_config_for(cfg, data_root, manifest, run_dir, vocab)
    if cfg.loss.align_weight > 0:  # trained once per dataset here on the driver, then cached
        aligner = encoders.load_or_train(encoders.ALIGNMENT_LOSS, data_root, manifest, vocab, log=_say)
        loop_config["alignment_encoder"] = aligner.state_dict()
    quiet_ray_data()  # before the datasets copy Ray Data's context
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.train.placement_strategy),
        datasets=build_datasets(data_root, manifest, cfg.data.eval_splits,
                                data_cpu_budget(cfg.train.data_cpu_limit, ray.cluster_resources().get("CPU", 0)),
                                eval_captions=cfg.data.eval_captions, seed=cfg.train.seed),
        dataset_config=ExactEvalDataConfig(cfg.data.eval_splits),
        run_config=RunConfig(
            name=name, storage_path=storage_root, callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.train.keep_best),
                                               checkpoint_score_attribute=METRIC, checkpoint_score_order="min"),
        ),
    )
    facts = {"family": cfg.model.family, "parameters": count_parameters(build_model(cfg.model, vocab.vectors)),
             "dataset": manifest["dataset"], "train_images": manifest["splits"]["train"]["images"],
             "workers": cfg.train.num_workers, "cpus_per_worker": cfg.train.cpus_per_worker,
             "device": "GPU" if gpu else "CPU", "data_mode": loop_config["data_info"]["mode"],
             "start_epoch": resumed["epoch"] + 1 if resumed else 0, "epochs": cfg.train.epochs, "run_dir": run_dir}
    return TrainerPlan(trainer, run_dir, facts)


class ExactEvalDataConfig(DataConfig):
    """Train splits evenly (DDP needs equal batches per worker); evaluation splits unevenly
    so that every dev pair is scored exactly once across the workers."""

    def __init__(self, eval_names: list[str]):
        super().__init__(datasets_to_split="all")
        self.eval_names = set(eval_names)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        # Ray Train V2 calls this once per dataset.
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if name not in self.eval_names:
                per_rank = super().configure({name: ds}, world_size, worker_handles, worker_node_ids, **kwargs)
                for i in range(world_size):
                    output[i][name] = per_rank[i][name]
                continue
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output


def summarize(run_dir: str, error: Exception | None = None) -> dict:
    """The JSON a job prints last, read from the run directory: where things are and the
    metrics of the latest epoch (also right when the run had finished before)."""
    checkpoints = ckpt_lib.run_checkpoints(run_dir)
    latest = checkpoints[-1] if checkpoints else None
    return {
        "run_dir": str(run_dir),
        "best_checkpoint": ckpt_lib.best_in_run(run_dir),
        "latest_checkpoint": latest[2] if latest else None,
        "samples": storage.join(run_dir, "samples"),
        "metrics_csv": storage.join(run_dir, monitor.METRICS_CSV),
        "loss_curve": storage.join(run_dir, monitor.LOSS_CURVE),
        "epochs_done": latest[0] + 1 if latest else 0,
        "data_mode": ckpt_lib.read_meta(latest[2]).get("data", {}).get("mode") if latest else None,
        "metrics": latest[1] if latest else {},
        "error": str(error) if error else None,
    }


def check_cluster_storage(cfg: Config, locations: dict[str, str]) -> None:
    """Refuse node-local paths on a cluster spread over several hosts (see t2i.storage)."""
    if cfg.train.assume_shared_storage or not ray.is_initialized():
        return
    hosts = {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}
    for what, location in locations.items():
        local_path = location.removeprefix("file://")
        problem = storage.node_local_problem(location, what, hosts, storage.mount_fs_type(local_path))
        if problem:
            raise config_lib.ConfigError(problem)


def ray_env_before_init() -> None:
    """Environment knobs Ray reads at import or start (before ``ray.init``; a local Ray's
    processes inherit them; a cluster's raylets keep their own). Each stays overridable."""
    # Ray starts workers at niceness 15, below its own raylet, GCS, dashboard and agents:
    # on a small machine every wake-up of those stalls the training worker's two-thread
    # kernels. At 0 the default run took 4 min 57 s instead of 5 min 24 s, same losses.
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
        "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
        # Train's preemption watcher (one more actor waking 100x/s) looks for cloud nodes
        # being drained; a Ray on one machine has none to lose.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }
    if cpus <= SMALL_CLUSTER_CPUS:
        env |= {"RAY_num_workers_soft_limit": "0", "RAY_prestart_worker_first_driver": "0"}
    return env


def start_ray() -> None:
    """Connect to the cluster at RAY_ADDRESS, or start a local one.

    Unless verbose, the output of Ray's workers and actors (Ray Data's execution plans,
    Train's state transitions, deprecation warnings) stays in Ray's log files
    (``log_to_driver=False``); the epoch lines reach the driver through :func:`following`.

    A local Ray started here inherits this process's environment (:func:`local_ray_env`):
    one Parquet footer-reader actor instead of Ray Data's default pool of 32, which on a
    small machine took seconds to start for every read and left dozens of killed actors
    ("failed" tasks) on the job page; no Train preemption watcher.
    On a machine of at most ``SMALL_CLUSTER_CPUS``, no pool of idle workers either: every
    Python process of Ray wakes 100 times a second (its signal check), and the idle ones
    (prestarted for the first driver, or left over from Ray Data's reads: three in a
    default run) took up to 0.05 of a core each while training; a local Ray there ends a
    worker one second after its last task (a streamed epoch then starts its read worker
    afresh: about 3 s more per whole epoch, the training phase unchanged, measured).
    A cluster keeps its own settings (set them in its runtime environment)."""
    if ray.is_initialized():
        return
    ray_env_before_init()
    if not os.environ.get("RAY_ADDRESS"):
        for key, value in local_ray_env(usable_cpus()).items():
            os.environ.setdefault(key, value)
    loud = console.verbose()
    context = ray.init(log_to_driver=loud, logging_level=logging.INFO if loud else logging.WARNING)
    if not loud:
        print(f"t2i: Ray {'cluster at ' + os.environ['RAY_ADDRESS'] if os.environ.get('RAY_ADDRESS') else 'started locally'}"
              f"; dashboard {'http://' + context.dashboard_url if context.dashboard_url else 'off'}; --verbose shows Ray's own logs", flush=True)


@ray.remote(num_cpus=0)
class EpochMailbox:
    """Messages from the Train controller to the driver. The driver long-polls
    :meth:`take`: one call per message or per ``wait_s`` of quiet, where polling a
    ``ray.util.queue.Queue``'s size twice a second had put ~240 ``qsize`` tasks of a
    2-minute run on the job's dashboard page (and a blocking ``Queue.get`` that times out
    shows as a failed task)."""

    def __init__(self):
        self.messages: list[dict] = []
        self.arrived = asyncio.Event()

    async def put(self, message: dict) -> None:
        self.messages.append(message)
        self.arrived.set()

    async def take(self, wait_s: float) -> list[dict]:
        """Every message waiting, after up to ``wait_s`` for the first (``[]`` if none came)."""
        if not self.messages:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), wait_s)
        taken, self.messages = self.messages, []
        self.arrived.clear()
        return taken

    async def wake(self) -> None:
        """End a waiting :meth:`take` now (the run is over)."""
        self.arrived.set()


class EpochRelay(ray.train.UserCallback):
    """On the Train controller: hand rank 0's metrics of every report to the driver."""

    def __init__(self, mailbox):
        self.mailbox = mailbox

    def _send(self, message: dict) -> None:
        if self.mailbox is None:
            return
        try:
            ray.get(self.mailbox.put.remote(message), timeout=10)
        except Exception:  # noqa: BLE001 - the console must never fail a training run
            self.mailbox = None

    def after_report(self, run_context, metrics, checkpoint):
        if metrics:
            self._send(metrics[0])

    def after_exception(self, run_context, worker_exceptions):
        self._send({"failure": {rank: (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                                for rank, exc in worker_exceptions.items()}})


@contextlib.contextmanager
def following(epochs: int, printer=print):
    """Yield an :class:`EpochRelay` to pass in ``RunConfig(callbacks=...)``; print one
    :func:`console.epoch_line` per report (and a line per worker failure) it relays until
    the block ends.

    Train V2 runs callbacks in a controller actor, not in the driver: its prints would reach
    the terminal only with Ray's forwarding (and everything else Ray forwards) on. A mailbox
    actor carries the metrics to a thread here instead, also under ``ray job submit``."""
    # On the driver's node: a mailbox placed on a worker node died with it in the node-loss
    # drill, and the controller's callback then failed the run.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    mailbox = EpochMailbox.options(scheduling_strategy=here).remote()
    stop = threading.Event()
    said: set[str] = set()
    printing = threading.Lock()  # the thread and the final drain below

    def show(messages: list[dict]) -> None:
        with printing:
            for message in messages:
                line = (console.failure_line(message["failure"]) if "failure" in message
                        else console.epoch_line(message, epochs))
                if line not in said:  # the controller may report one failure at several polls
                    printer(line, flush=True)
                    said.add(line)

    def loop() -> None:
        while not stop.is_set():
            try:
                show(ray.get(mailbox.take.remote(2.0)))
            except Exception:  # noqa: BLE001 - the mailbox is gone: the run is over
                return

    thread = threading.Thread(target=loop, name="t2i-epoch-lines", daemon=True)
    thread.start()
    try:
        yield EpochRelay(mailbox)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            ray.get(mailbox.wake.remote(), timeout=5)
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            show(ray.get(mailbox.take.remote(0.0)))  # the last epoch's line, if the thread had not shown it
            ray.kill(mailbox)


def fit(cfg: Config) -> dict:
    """Train (or resume) the run described by ``cfg``; returns :func:`summarize`'s dict."""
    start_ray()
    started = time.perf_counter()
    with following(cfg.train.epochs) as relay:
        plan = make_trainer(cfg, callbacks=[relay])  # has already checked the checkpoint it would resume
        checkpoints = ckpt_lib.run_checkpoints(plan.run_dir)  # epochs from meta.json: no second weights read
        if checkpoints and checkpoints[-1][0] + 1 >= cfg.train.epochs:
            print(f"{plan.run_dir} already finished epoch {checkpoints[-1][0]}; raise train.epochs to train longer")
            return summarize(plan.run_dir)
        print(console.run_line(plan.facts), flush=True)
        error = None
        try:
            error = plan.trainer.fit().error
        except ray.train.TrainingFailedError as exc:  # raised once max_failures is used up
            error = exc
    summary = summarize(plan.run_dir, error)
    print(console.summary_line(summary, time.perf_counter() - started), flush=True)
    return summary
