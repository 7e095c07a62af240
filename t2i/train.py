"""Data-parallel training with Ray Train (V2).

``fit(cfg)`` runs on the driver: it resolves the data, builds the Ray Datasets, checks any
checkpoint it would resume from, and runs a ``TorchTrainer``. Each worker runs
``train_func``, a plain epoch loop over the pure ``train_step`` and ``evaluate``;
rank 0 writes a checkpoint, a sample grid and the run's metrics files every epoch.
Re-running with the same ``train.name`` and ``train.storage_path`` resumes from the latest
checkpoint. Data and runs may live in a local folder or at a URI (``t2i.storage``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from t2i import checkpoint as ckpt_lib
from t2i import config as config_lib
from t2i import monitor, storage
from t2i.config import Config, OptimConfig
from t2i.data import build_datasets, ensure_shapes, load_manifest, load_vocabulary, to_model_inputs
from t2i.generate import render_prompts
from t2i.losses import elbo_loss, kl_weight
from t2i.models import build_model

METRIC = "dev_loss"


# ----------------------------------------------------------------------------- pure parts
def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int):
    """Stepped once per epoch (``plateau`` with the dev loss)."""
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "exponential":
        return sched.ExponentialLR(optimizer, gamma=cfg.gamma)
    if cfg.schedule == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.gamma, patience=cfg.patience)
    if cfg.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    return sched.ConstantLR(optimizer, factor=1.0, total_iters=0)


def train_step(model, images, word_ids, optimizer, beta: float, free_bits: float, grad_clip: float,
               autocast=contextlib.nullcontext) -> dict[str, torch.Tensor]:
    """One optimisation step on one batch; returns detached loss terms."""
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        out = model(images, word_ids)
    terms = elbo_loss(out.recon, images, out.mu, out.logvar, out.prior_mu, out.prior_logvar, beta, free_bits)
    terms["loss"].backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {k: v.detach() for k, v in terms.items()}


@torch.no_grad()
def evaluate(model, batches, device, beta: float, autocast=contextlib.nullcontext) -> dict[str, float]:
    """Sums of loss terms over ``batches`` (ELBO with a posterior sample, as in training)
    plus ``n``; combine across workers with :func:`all_reduce_sums` before dividing."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for batch in batches:
        images, word_ids = to_model_inputs(batch, device)
        with autocast():
            out = model(images, word_ids)
        t = elbo_loss(out.recon, images, out.mu, out.logvar, out.prior_mu, out.prior_logvar, beta)
        sums += batch_sums(t, images.shape[0])
    model.train()
    return sums


def batch_sums(terms: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """(loss, mse, kl, count) summed over a batch of ``n``, for exact means across batches/workers."""
    loss = terms["loss"]
    return torch.stack([loss * n, terms["mse"] * n, terms["kl"] * n, loss.new_tensor(float(n))]).double()


def all_reduce_sums(sums: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    return sums


def means(prefix: str, sums: torch.Tensor) -> dict[str, float]:
    loss, mse, kl, n = sums.tolist()
    n = max(n, 1.0)
    return {f"{prefix}_loss": loss / n, f"{prefix}_mse": mse / n, f"{prefix}_kl": kl / n}


# ----------------------------------------------------------------------------- per worker
def train_func(loop_config: dict) -> None:
    cfg = config_lib.from_dict(loop_config["cfg"])
    run_dir = loop_config["run_dir"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    # Ray starts workers with OMP_NUM_THREADS=1 (fractional CPUs); a CPU worker that owns
    # the node would then use one core of many.
    torch.set_num_threads(cfg.train.torch_threads or max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    device = ray.train.torch.get_device()
    use_amp = cfg.train.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext

    vocab = load_vocabulary(loop_config["data_root"])
    model = build_model(cfg.model, vocab.vectors)
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
        model.load_state_dict(resumed["model"])
        start_epoch = resumed["epoch"] + 1
    model = ray.train.torch.prepare_model(model)
    _record_placement(run_dir, rank, device)
    raw_model = getattr(model, "module", model)
    optimizer = make_optimizer(model.parameters(), cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.epochs)
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        print(f"[rank {rank}] resumed from epoch {resumed['epoch']}, continuing at epoch {start_epoch}")

    train_shard = ray.train.get_dataset_shard("train")
    eval_shards = {s: ray.train.get_dataset_shard(s) for s in cfg.data.eval_splits}
    n_train = loop_config["train_images"]
    for epoch in range(start_epoch, cfg.train.epochs):
        _fault_drill(cfg.train.fail_once_at_epoch, epoch, rank, run_dir)
        started = time.perf_counter()
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        seen = 0
        model.train()
        for batch in train_shard.iter_torch_batches(batch_size=cfg.data.batch_size,
                                                    local_shuffle_buffer_size=4 * cfg.data.batch_size):
            images, word_ids = to_model_inputs(batch, device)
            weight = kl_weight(cfg.loss.beta, cfg.loss.kl_warmup_epochs, epoch + seen * world / max(n_train, 1))
            t = train_step(model, images, word_ids, optimizer, weight, cfg.loss.free_bits,
                           cfg.optim.grad_clip, autocast)
            seen += images.shape[0]
            sums += batch_sums(t, images.shape[0])
        train_seconds = time.perf_counter() - started
        sums = all_reduce_sums(sums)
        metrics = {"epoch": epoch, **means("train", sums), "samples_per_s": sums[3].item() / train_seconds,
                   "kl_weight": weight if seen else cfg.loss.beta, "lr": optimizer.param_groups[0]["lr"]}
        # Dev loss is the plain negative ELBO (beta = 1): comparable across runs and sweeps
        # whatever beta, warm-up or free bits they train with.
        for split, shard in eval_shards.items():
            batches = shard.iter_torch_batches(batch_size=cfg.data.batch_size)
            metrics.update(means(split, all_reduce_sums(evaluate(raw_model, batches, device, 1.0, autocast))))
        if cfg.optim.schedule == "plateau":
            scheduler.step(metrics.get(METRIC, metrics["train_loss"]))
        else:
            scheduler.step()
        metrics["epoch_s"] = time.perf_counter() - started
        metrics.setdefault(METRIC, metrics["train_loss"])
        _report(metrics, rank, raw_model, optimizer, scheduler, cfg, vocab, loop_config, run_dir, epoch)


def local_mode(cfg: Config) -> bool:
    """num_workers=0: the loop runs in the driver process (debugging)."""
    return cfg.train.num_workers == 0


def _fault_drill(fail_epoch: int, epoch: int, rank: int, run_dir: str) -> None:
    """Raise once in ``fail_epoch`` (marker file in the run dir) to exercise max_failures."""
    marker = storage.join(run_dir, ".fault_drill_done")
    if epoch == fail_epoch and rank == 0 and not storage.is_file(marker):
        storage.write_text(marker, f"injected failure at epoch {epoch}\n")
        raise RuntimeError(f"fault drill: injected worker failure at epoch {epoch}")


def _record_placement(run_dir: str, rank: int, device) -> None:
    """Where each worker of this attempt runs, appended to ``workers.json`` by rank 0: after a
    node loss the run's history shows the worker group moving."""
    here = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(), "device": str(device)}
    everyone = [here]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, here)
    if rank != 0:
        return
    path = storage.join(run_dir, "workers.json")
    attempts = json.loads(storage.read_text(path)) if storage.is_file(path) else []
    attempts.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "workers": everyone})
    storage.write_text(path, json.dumps(attempts, indent=1))
    print(f"workers on nodes: {sorted({w['node_id'][:12] for w in everyone})}")


def _report(metrics, rank, raw_model, optimizer, scheduler, cfg, vocab, loop_config, run_dir, epoch) -> None:
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            ckpt_lib.save(folder, model=raw_model, cfg=cfg, vocab=vocab, epoch=epoch, metrics=metrics,
                          optimizer=optimizer, scheduler=scheduler, data=loop_config["data_info"])
            grid = render_prompts(raw_model, vocab, loop_config["prompts"], cfg.data.samples_per_prompt,
                                  loop_config["max_words"], cfg.train.seed, Path(folder) / "samples.png")
            storage.upload(grid, storage.join(run_dir, "samples", f"epoch_{epoch:03d}.png"))
            monitor.record_epoch(run_dir, metrics)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
            if local_mode(cfg):  # Ray persists nothing in local mode: keep every epoch ourselves
                storage.copy_dir(folder, storage.join(run_dir, f"checkpoint_local_epoch{epoch:04d}"))
        ray.train.report(metrics, checkpoint=checkpoint)


# ----------------------------------------------------------------------------- driver
def resolve_data(cfg: Config) -> str:
    """The prepared dataset's absolute location (folder or URI)."""
    if cfg.data.path:
        return storage.absolute(cfg.data.path)
    return storage.absolute(ensure_shapes(cfg.data.cache_dir, cfg.data.shapes_n, seed=0))


def run_name(cfg: Config, manifest: dict) -> str:
    return cfg.train.name or f"{manifest['dataset']}-{cfg.model.family}"


def loop_config_for(cfg: Config, data_root: str, manifest: dict, run_dir: str) -> dict:
    vocab = load_vocabulary(data_root)
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
                      "max_words": manifest["max_words"], "embedding": json.dumps(manifest["embedding"])},
    }


def check_resume(run_dir: str, cfg: Config) -> dict | None:
    """Fail before Ray starts if the run we would resume is broken or built differently."""
    latest = ckpt_lib.latest_in_run(run_dir)
    if latest is None:
        return None
    state = ckpt_lib.read_state(latest)
    ckpt_lib.check_compatible(state, cfg, str(latest))
    return state


def use_gpu(cfg: Config) -> bool:
    if cfg.train.use_gpu != "auto":
        return cfg.train.use_gpu == "true"
    return ray.cluster_resources().get("GPU", 0) >= max(1, cfg.train.num_workers)


def make_trainer(cfg: Config, callbacks=(), run_name_override: str | None = None, storage_override: str | None = None):
    """The TorchTrainer for ``cfg`` (also used by Tune trials). Returns (trainer, run_dir)."""
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
    check_resume(run_dir, cfg)
    # The dashboard's Train view lists runs only when this is set in the driver (read there).
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    gpu = use_gpu(cfg)
    # With use_gpu each worker also gets one GPU; CPUs stay explicit (data decoding, threads).
    resources = {"CPU": cfg.train.cpus_per_worker}
    trainer = TorchTrainer(
        train_func,
        train_loop_config=loop_config_for(cfg, data_root, manifest, run_dir),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.train.placement_strategy),
        datasets=build_datasets(data_root, manifest, cfg.data.eval_splits, cfg.train.data_cpu_limit),
        dataset_config=ExactEvalDataConfig(cfg.data.eval_splits),
        run_config=RunConfig(
            name=name, storage_path=storage_root, callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.train.keep_best),
                                               checkpoint_score_attribute=METRIC, checkpoint_score_order="min"),
        ),
    )
    return trainer, run_dir


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
    best = min(checkpoints, key=lambda c: (c[1].get(METRIC, math.inf), -c[0])) if checkpoints else None
    return {
        "run_dir": str(run_dir),
        "best_checkpoint": best[2] if best else None,
        "latest_checkpoint": latest[2] if latest else None,
        "samples": storage.join(run_dir, "samples"),
        "metrics_csv": storage.join(run_dir, monitor.METRICS_CSV),
        "loss_curve": storage.join(run_dir, monitor.LOSS_CURVE),
        "epochs_done": latest[0] + 1 if latest else 0,
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


def fit(cfg: Config) -> dict:
    """Train (or resume) the run described by ``cfg``; returns :func:`summarize`'s dict."""
    if not ray.is_initialized():
        ray.init()
    trainer, run_dir = make_trainer(cfg)  # has already checked the checkpoint it would resume
    checkpoints = ckpt_lib.run_checkpoints(run_dir)  # epochs from meta.json: no second weights read
    if checkpoints and checkpoints[-1][0] + 1 >= cfg.train.epochs:
        print(f"{run_dir} already finished epoch {checkpoints[-1][0]}; raise train.epochs to train longer")
        return summarize(run_dir)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:  # raised once max_failures is used up
        return summarize(run_dir, exc)
    return summarize(run_dir, result.error)
