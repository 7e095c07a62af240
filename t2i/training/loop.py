"""The per-worker training loop (Ray Train's ``train_loop_per_worker``).

Each worker runs :func:`train_func` with the :class:`WorkerPlan` the driver decided: a
plain epoch loop over its model family's ``train_step`` and ``eval_terms``
(``t2i.training.families``: the same loop for VAEs and the GAN). Rank 0 writes a
checkpoint, a sample grid and the run's metrics files every epoch (:class:`EpochReporter`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from t2i import console, storage
from t2i.config import Config, ConfigError
from t2i.data.dataset import load_vocabulary
from t2i.data.feed import EpochFeed, FeedPlan, epoch_seed, to_model_inputs
from t2i.data.text import Vocabulary
from t2i.generation.generate import render_prompts
from t2i.runtime.ray_env import assigned_cpus, usable_cpus, worker_threads
from t2i.training import checkpoint as ckpt_lib
from t2i.training import encoders, run_files
from t2i.training.families import Family, make_family
from t2i.training.tracking import EpochRecord, TrackingPlan, open_trackers

EVAL_BATCH = 256  # evaluation batch size at least (training's may be smaller)


@dataclass(frozen=True)
class DataInfo:
    """What a run trains on; stored in every checkpoint (``data``) and in run summaries."""
    dataset: str
    path: str
    image_size: int
    max_words: int     # caption length in word ids (generation pads prompts to it)
    embedding: dict    # the word vectors' source, from the manifest
    mode: str          # "cache" (each worker keeps its share in memory) or "stream"


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs, decided once on the driver: the one contract between them."""
    cfg: Config
    run_dir: str
    data: DataInfo
    train_images: int                 # images in the train split (the KL warm-up's clock)
    prompts: tuple[str, ...]          # validation prompts drawn to a grid every epoch
    alignment_encoder: dict | None = None  # frozen weights of the gan's alignment-loss encoder
    dev_distractors: np.ndarray | None = None  # dev_align's fixed candidate captions (train rows)
    fail_once_at_epoch: int = -1      # fault drill for tests: raise once in this epoch
    tracking: TrackingPlan = field(default_factory=TrackingPlan)  # TensorBoard / MLflow besides the metrics files


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


def eval_term_sums(family: Family, batches, device, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Sums of the family's evaluation terms over ``batches``, plus the count; combine across
    workers with :func:`all_reduce_sums` before :func:`means`."""
    family.train(False)
    sums = term_sums(family.EVAL_TERMS, device)
    for batch in batches:
        images, word_ids = to_model_inputs(batch, device)
        add_terms(sums, family.EVAL_TERMS, family.eval_terms(images, word_ids, autocast), images.shape[0])
    family.train(True)
    return sums


def feed_plan(cfg: Config, data: DataInfo) -> FeedPlan:
    # No gradients and BatchNorm in eval mode: larger batches score the same numbers faster.
    return FeedPlan(cached=data.mode == "cache", image_size=data.image_size, batch_size=cfg.data.batch_size,
                    eval_batch_size=max(cfg.data.batch_size, EVAL_BATCH), seed=cfg.train.seed)


def local_mode(cfg: Config) -> bool:
    """num_workers=0: the loop runs in the driver process (debugging)."""
    return cfg.train.num_workers == 0


# ----------------------------------------------------------------------------- per worker
def train_func(config: dict) -> None:
    """Ray Train's entry point on every worker; ``config["plan"]`` is the :class:`WorkerPlan`."""
    plan: WorkerPlan = config["plan"]
    cfg, run_dir = plan.cfg, plan.run_dir
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    # Ray starts workers with OMP_NUM_THREADS=1; a worker granted 4 CPUs would use one.
    # Local mode runs in the driver, which has no resource grant.
    granted = 0.0 if local_mode(cfg) else assigned_cpus()
    torch.set_num_threads(cfg.train.torch_threads or worker_threads(granted, usable_cpus(),
                                                                    context.get_local_world_size()))
    device = ray.train.torch.get_device()
    # bf16 needs no loss scaling, but only Ampere and later compute it natively; older GPUs
    # (and CPUs) train in fp32.
    use_amp = cfg.train.amp and device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext

    vocab = load_vocabulary(plan.data.path)
    aligner = (encoders.build(encoders.ALIGNMENT_LOSS, vocab.vectors, plan.alignment_encoder)
               if plan.alignment_encoder else None)
    family = make_family(cfg, vocab.vectors, aligner, plan.dev_distractors)
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
    family.move_frozen_helpers(device)
    resume = None
    if resumed:
        family.load_training_state(resumed)
        # What this attempt really restored, in workers.json: a digest of the weights and the
        # optimizer and scheduler states, comparable with the checkpoint's own (tests do).
        resume = {"epoch": resumed["epoch"], "restored_digest": ckpt_lib.state_digest(
            {"model": family.generator.state_dict(), "training": family.state_dict()})}
        print(f"[rank {rank}] resumed from epoch {resumed['epoch']}, continuing at epoch {start_epoch}")
    workers = record_placement(run_dir, rank, device, resume)
    check_run_dir_shared(run_dir, cfg, workers, rank)

    feed = EpochFeed({"train": ray.train.get_dataset_shard("train"),
                      **{s: ray.train.get_dataset_shard(s) for s in cfg.data.eval_splits}},
                     feed_plan(cfg, plan.data), device, rank)
    reporter = EpochReporter(plan, vocab, rank)
    for epoch in range(start_epoch, cfg.train.epochs):
        fault_drill(plan.fail_once_at_epoch, epoch, rank, run_dir)
        # Noise, dropout and the gan's draws restart from (seed, epoch, rank) each epoch, so
        # a resumed run trains its next epoch exactly as the uninterrupted run did.
        torch.manual_seed(epoch_seed(cfg.train.seed, epoch, rank))
        started = time.perf_counter()
        sums = term_sums(family.TRAIN_TERMS, device)
        seen = 0
        family.train(True)
        for batch in feed.train_batches(epoch):
            images, word_ids = to_model_inputs(batch, device)
            terms = family.train_step(images, word_ids, epoch + seen * world / max(plan.train_images, 1), autocast)
            seen += images.shape[0]
            add_terms(sums, family.TRAIN_TERMS, terms, images.shape[0])
        train_seconds = time.perf_counter() - started
        sums = all_reduce_sums(sums)
        # epochs_done: Tune's clock (ASHA's time_attr). Its own training_iteration restarts at 1
        # when a restored sweep resumes a trial that Ray Train continues at a later epoch.
        metrics = {"epoch": epoch, "epochs_done": epoch + 1, **means("train", family.TRAIN_TERMS, sums),
                   "samples_per_s": sums[-1].item() / train_seconds, "lr": family.lr}
        for split in cfg.data.eval_splits:
            split_sums = all_reduce_sums(eval_term_sums(family, feed.eval_batches(split), device, autocast))
            metrics.update(means(split, family.EVAL_TERMS, split_sums))
            metrics[f"{split}_pairs"] = int(split_sums[-1].item())  # every pair once, across all workers
        metrics[ckpt_lib.SELECTION_METRIC], metrics["selected_by"] = family.selection(metrics)
        family.end_epoch(metrics[ckpt_lib.SELECTION_METRIC])
        metrics["epoch_s"] = time.perf_counter() - started
        reporter.report(family, metrics, epoch)


class EpochReporter:
    """Ends each epoch: rank 0 saves the checkpoint, the sample grid, the run's metrics
    files and its tracking (TensorBoard, MLflow); every rank reports to Ray Train (which
    keeps the best checkpoints)."""

    def __init__(self, plan: WorkerPlan, vocab: Vocabulary, rank: int):
        self.plan, self.vocab, self.rank = plan, vocab, rank
        self.trackers = (open_trackers(plan.tracking, plan.run_dir, storage.name(plan.run_dir), plan.cfg)
                         if rank == 0 else [])

    def report(self, family: Family, metrics: dict, epoch: int) -> None:
        cfg, run_dir = self.plan.cfg, self.plan.run_dir
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                ckpt_lib.save(folder, model=family.generator, cfg=cfg, vocab=self.vocab, epoch=epoch,
                              metrics=metrics, training=family.state_dict(), data=asdict(self.plan.data))
                grid = render_prompts(family.generator, self.vocab, list(self.plan.prompts),
                                      cfg.data.samples_per_prompt, self.plan.data.max_words, cfg.train.seed,
                                      Path(folder) / "samples.png")
                storage.upload(grid, storage.join(run_dir, "samples", f"epoch_{epoch:03d}.png"))
                history = run_files.record_epoch(run_dir, metrics)
                record = EpochRecord(epoch=epoch, metrics=metrics, history=history, grid_png=Path(grid),
                                     learning_rates=family.learning_rates(), final=epoch + 1 >= cfg.train.epochs)
                for tracker in self.trackers:
                    tracker.log(record)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
                if local_mode(cfg):  # Ray persists nothing in local mode: keep every epoch ourselves
                    storage.copy_dir(folder, storage.join(run_dir, f"checkpoint_local_epoch{epoch:04d}"))
                    print(console.epoch_line(metrics, cfg.train.epochs), flush=True)  # no controller to relay it
            ray.train.report(metrics, checkpoint=checkpoint)


def fault_drill(fail_epoch: int, epoch: int, rank: int, run_dir: str) -> None:
    """Raise once in ``fail_epoch`` (marker file in the run dir) to exercise max_failures."""
    marker = storage.join(run_dir, ".fault_drill_done")
    if epoch == fail_epoch and rank == 0 and not storage.is_file(marker):
        storage.write_text(marker, f"injected failure at epoch {epoch}\n")
        raise RuntimeError(f"fault drill: injected worker failure at epoch {epoch}")


def record_placement(run_dir: str, rank: int, device, resume: dict | None = None) -> list[dict]:
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
        raise ConfigError(
            f"train.storage_path: the run folder {run_dir!r} is not shared: workers on {', '.join(blind)} cannot "
            f"see what rank 0 wrote there, so checkpoints would stay on one node's disk. Use a URI "
            f"(s3://bucket/runs) or a folder every node mounts (NFS), or train.assume_shared_storage=true "
            f"if it really is shared.")
