"""Data-parallel training with Ray Train (V2), on the driver.

``fit(cfg)`` resolves the data, checks everything a worker would trip over (paths under
``ray job submit``, storage every node sees, the checkpoint it would resume), decides the
:class:`~t2i.training.loop.WorkerPlan`, builds the Ray Datasets and runs a ``TorchTrainer``
whose workers run ``t2i.training.loop.train_func``. Re-running with the same
``train.name`` and ``train.storage_path`` resumes from the latest checkpoint. Data and
runs may live in a local folder or at a URI (``t2i.storage``).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from t2i import console, storage
from t2i.config import Config, ConfigError
from t2i.data.dataset import load_manifest, load_vocabulary, sample_caption_rows
from t2i.data.feed import ExactEvalDataConfig, build_datasets, worker_shard_bytes
from t2i.data.prepare import ensure_shapes
from t2i.data.text import Vocabulary
from t2i.models import build_model, count_parameters
from t2i.runtime.ray_env import (
    GPUUnavailableError,
    alive_hosts,
    choose_cpus_per_worker,
    cuda_problem,
    data_cpu_budget,
    node_shapes,
    quiet_ray_data,
    small_cluster_settings,
    start_ray,
    submitted_working_dir,
    use_gpu,
)
from t2i.runtime.relay import following
from t2i.training import checkpoint as ckpt_lib
from t2i.training import encoders, run_files
from t2i.training.families import DEV_ALIGN_DISTRACTORS
from t2i.training.loop import DataInfo, WorkerPlan, train_func
from t2i.training.tracking import DEFAULT_EXPERIMENT, plan_tracking


# ----------------------------------------------------------------------------- preflight
def check_paths_under_job(cfg: Config, working_dir: str | None) -> list[str]:
    """Under ``ray job submit --working-dir`` (``working_dir``: its URI), the driver runs in
    Ray's temporary copy of the working directory, which Ray deletes later: a relative
    ``train.storage_path`` would put the run (checkpoints included) there, and a relative
    ``data.path`` points at data that was never uploaded. Refuse those; a relative
    ``data.cache_dir`` only costs re-preparing the shapes set, so it gets a warning (returned)."""
    if not working_dir:
        return []
    where = f"Ray's temporary copy of the working directory ({os.getcwd()})"
    relative = {key: value for key, value in (("train.storage_path", cfg.train.storage_path),
                                              ("data.path", cfg.data.path), ("data.cache_dir", cfg.data.cache_dir))
                if value and not storage.is_uri(value) and not os.path.isabs(value)}
    refused = [f"{key}={value!r}" for key, value in relative.items() if key != "data.cache_dir"]
    if refused:
        raise ConfigError(
            f"{', '.join(refused)}: relative paths resolve inside {where}, which Ray deletes after the job; "
            f"give absolute paths on storage every node sees, or URIs (e.g. --set train.storage_path=$PWD/runs "
            f"--data $PWD/data/f8k, or s3://bucket/runs)")
    if "data.cache_dir" in relative and not cfg.data.path:
        return [f"data.cache_dir={cfg.data.cache_dir!r} is relative: the shapes set is prepared inside {where} "
                "and again for every job; set an absolute data.cache_dir to keep it"]
    return []


def check_cluster_storage(cfg: Config, locations: dict[str, str]) -> None:
    """Refuse node-local paths on a cluster spread over several hosts (see t2i.storage)."""
    if cfg.train.assume_shared_storage or not ray.is_initialized():
        return
    problem = storage.shared_storage_problem(locations, alive_hosts())
    if problem:
        raise ConfigError(f"{problem} If this path is shared in a way t2i cannot detect, set "
                          "train.assume_shared_storage=true.")


def check_resume(run_dir: str, cfg: Config, vocab: Vocabulary | None = None, data_root: str = "the data") -> dict | None:
    """Fail before Ray starts if the run we would resume is broken or built differently
    (model, optimizer, schedule, and, given the data's ``vocab``, the vocabulary)."""
    latest = ckpt_lib.latest_in_run(run_dir)
    if latest is None:
        return None
    return ckpt_lib.check_resumable(str(latest), cfg, vocab, str(data_root))


def usable_prompts(cfg: Config, manifest: dict, vocab: Vocabulary) -> tuple[str, ...]:
    """The validation prompts (the config's, else the dataset's), each with a known word."""
    prompts = cfg.data.prompts or manifest.get("prompts") or []
    for prompt in prompts:
        known, unknown = vocab.ids(prompt)
        if not known:
            raise ConfigError(f"validation prompt {prompt!r} has no word in the data's vocabulary "
                              f"(unknown: {', '.join(unknown)})")
    return tuple(prompts)


# ----------------------------------------------------------------------------- planning
def resolve_data(cfg: Config) -> str:
    """The prepared dataset's absolute location (folder or URI)."""
    if cfg.data.path:
        return storage.absolute(cfg.data.path)
    return storage.absolute(ensure_shapes(cfg.data.cache_dir, cfg.data.shapes_n, seed=0))


def run_name(cfg: Config, manifest: dict) -> str:
    return cfg.train.name or f"{manifest['dataset']}-{cfg.model.family}"


def data_mode(cfg: Config, manifest: dict) -> str:
    """"cache" when one worker's share of the data fits ``data.cache_mb``, else "stream"."""
    workers = max(1, cfg.train.num_workers)
    need = worker_shard_bytes(manifest, cfg.data.eval_splits, workers, cfg.data.eval_captions)
    return "cache" if need <= cfg.data.cache_mb * 2 ** 20 else "stream"


def _say(line: str) -> None:
    print(f"t2i: {line}", flush=True)


@ray.remote(num_cpus=1)
def _train_encoder(role: encoders.EncoderRole, root: str) -> dict:
    """One dual encoder trained where compute is (a GPU node when the run uses GPUs)."""
    import torch  # noqa: PLC0415 - on the worker

    manifest = load_manifest(root, verify_checksums=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return encoders.load_or_train(role, root, manifest, load_vocabulary(root), device=device).state_dict()


@ray.remote(num_cpus=0)
class _TrainOnce:
    """One per dataset and role, found by name: the first caller starts the training task,
    every later caller (a concurrent Tune trial) awaits the same result."""

    def __init__(self):
        self.result = None

    def start(self, role: encoders.EncoderRole, root: str, gpu: bool) -> list:
        if self.result is None:
            self.result = _train_encoder.options(num_gpus=1 if gpu else 0).remote(role, root)
        return [self.result]  # in a list: the caller gets the reference, not a copy of the weights yet


def shared_encoder(role: encoders.EncoderRole, root: str, manifest: dict, gpu: bool) -> dict:
    """The frozen weights of ``role``'s encoder: read from the cache beside the data, or
    trained once on the cluster (never in the driver, which Tune gives almost no CPU) and
    cached there; concurrent trials share one training."""
    cached = encoders.read_cached(role, root, manifest)
    if cached is not None:
        return cached
    _say(f"training the {role.purpose} on the cluster (cached beside the data afterwards)")
    once = _TrainOnce.options(name=f"t2i-encoder-{encoders.cache_key(role, manifest)}", namespace="t2i",
                              get_if_exists=True).remote()
    [result] = ray.get(once.start.remote(role, root, gpu))
    return ray.get(result)


@dataclass
class TrainerPlan:
    """A ready ``TorchTrainer``, its run folder, and what :func:`console.run_line` says."""
    trainer: TorchTrainer
    run_dir: str
    facts: dict


def make_trainer(cfg: Config, callbacks=(), run_name_override: str | None = None,
                 storage_override: str | None = None, fail_once_at_epoch: int = -1,
                 experiment: str = DEFAULT_EXPERIMENT) -> TrainerPlan:
    """The TorchTrainer for ``cfg`` (also used by Tune trials, with their sweep's name as
    the MLflow ``experiment``). ``fail_once_at_epoch``: a fault drill for tests (a worker
    raises once in that epoch)."""
    for warning in check_paths_under_job(cfg, submitted_working_dir()):
        _say(f"warning: {warning}")
    data_root = resolve_data(cfg)
    # Sizes only: the checksums were written at preparation; hashing every shard here would
    # read the whole data set (from S3) for every job and every Tune trial.
    manifest = load_manifest(data_root, verify_checksums=False)
    for split in cfg.data.eval_splits:
        if split not in manifest["splits"]:
            raise ConfigError(f"data.eval_splits: {split!r} not in {data_root} (has {sorted(manifest['splits'])})")
    name = run_name_override or run_name(cfg, manifest)
    storage_root = storage.absolute(storage_override or cfg.train.storage_path)
    check_cluster_storage(cfg, {"data.path": data_root, "train.storage_path": storage_root})
    run_dir = storage.join(storage_root, name)
    # One MLflow store for every run and sweep under train.storage_path (a trial's run folder
    # sits deeper, in its sweep).
    tracking = plan_tracking(cfg, storage.absolute(cfg.train.storage_path), experiment)
    vocab = load_vocabulary(data_root)  # read once: the resume check and the plan use it
    resumed = check_resume(run_dir, cfg, vocab, data_root)
    prompts = usable_prompts(cfg, manifest, vocab)
    # The dashboard's Train view lists runs only when this is set in the driver (read there).
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    gpu = use_gpu(cfg.train.use_gpu, cfg.train.num_workers, cfg.train.gpus_per_worker)
    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    cpus, cpus_reason = choose_cpus_per_worker(cfg.train.cpus_per_worker, gpu, cfg.train.num_workers, cluster_cpus,
                                               node_shapes(), cfg.train.gpus_per_worker)
    aligner, distractors = None, None
    if cfg.loss.align_weight > 0:
        aligner = shared_encoder(encoders.ALIGNMENT_LOSS, data_root, manifest, gpu)
        distractors = sample_caption_rows(data_root, manifest, "train", DEV_ALIGN_DISTRACTORS, seed=cfg.train.seed)
    plan = WorkerPlan(
        cfg=cfg, run_dir=str(run_dir), train_images=manifest["splits"]["train"]["images"],
        prompts=prompts, alignment_encoder=aligner, dev_distractors=distractors, fail_once_at_epoch=fail_once_at_epoch,
        tracking=tracking,
        data=DataInfo(dataset=manifest["dataset"], path=str(data_root), image_size=manifest["image_size"],
                      max_words=manifest["max_words"], embedding=manifest["embedding"], mode=data_mode(cfg, manifest)))
    quiet_ray_data()  # before the datasets copy Ray Data's context
    small_cluster_settings(cluster_cpus)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"plan": plan},
        # With use_gpu each worker also gets its GPU share; CPUs stay explicit (data decoding, threads).
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cpus, **worker_gpus(gpu, cfg.train.gpus_per_worker)},
                                     placement_strategy=cfg.train.placement_strategy),
        datasets=build_datasets(data_root, manifest, cfg.data.eval_splits,
                                data_cpu_budget(cfg.train.data_cpu_limit, cluster_cpus),
                                eval_captions=cfg.data.eval_captions, seed=cfg.train.seed),
        dataset_config=ExactEvalDataConfig(cfg.data.eval_splits),
        run_config=RunConfig(
            name=name, storage_path=storage_root, callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.train.keep_best),
                                               checkpoint_score_attribute=ckpt_lib.SELECTION_METRIC,
                                               checkpoint_score_order="min"),
        ),
    )
    facts = {"family": cfg.model.family, "parameters": count_parameters(build_model(cfg.model, vocab.vectors)),
             "dataset": manifest["dataset"], "train_images": plan.train_images,
             "workers": cfg.train.num_workers, "cpus_per_worker": cpus, "cpus_reason": cpus_reason,
             "placement": cfg.train.placement_strategy,
             "device": "GPU" if gpu else "CPU", "gpus_per_worker": cfg.train.gpus_per_worker if gpu else 0,
             "data_mode": plan.data.mode,
             "start_epoch": resumed["epoch"] + 1 if resumed else 0, "epochs": cfg.train.epochs, "run_dir": run_dir}
    return TrainerPlan(trainer, run_dir, facts)


def worker_gpus(gpu: bool, share: float) -> dict[str, float]:
    """A GPU worker's ``resources_per_worker`` GPU entry: only a share below one needs it
    (``use_gpu`` alone reserves one GPU)."""
    return {"GPU": share} if gpu and share < 1 else {}


@ray.remote(num_cpus=0)
def _cuda_check() -> str | None:
    return cuda_problem()


def check_gpu_workers(facts: dict) -> None:
    """Before training on GPUs: reserve each worker's bundle as Ray Train will (same
    resources, same placement strategy) and try CUDA in every one, so a node whose driver
    cannot run this torch stops the run with one line (t2i.runtime.ray_env.cuda_problem)
    instead of a traceback from NCCL's setup in the middle of Ray Train's."""
    if facts["device"] != "GPU":
        return
    if facts["workers"] == 0:  # local mode: the loop runs here
        if problem := cuda_problem():
            raise GPUUnavailableError(problem)
        return
    bundles = [{"CPU": facts["cpus_per_worker"], "GPU": facts["gpus_per_worker"]}] * facts["workers"]
    group = placement_group(bundles, strategy=facts["placement"], name="t2i-gpu-preflight")
    try:
        while not ray.wait([group.ready()], timeout=60)[0]:
            _say(f"waiting for {len(bundles)} GPU worker slot(s) {bundles[0]} (an autoscaler may be starting nodes)")
        problems = ray.get([_cuda_check.options(
            num_gpus=facts["gpus_per_worker"],
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)).remote()
            for i in range(len(bundles))])
    finally:
        remove_placement_group(group)
    for problem in problems:
        if problem:
            raise GPUUnavailableError(problem)


# ----------------------------------------------------------------------------- running
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
        "metrics_csv": storage.join(run_dir, run_files.METRICS_CSV),
        "loss_curve": storage.join(run_dir, run_files.LOSS_CURVE),
        "tensorboard": f"tensorboard --logdir {storage.parent(run_dir)}",
        "epochs_done": latest[0] + 1 if latest else 0,
        "data_mode": ckpt_lib.read_meta(latest[2]).get("data", {}).get("mode") if latest else None,
        "metrics": latest[1] if latest else {},
        "error": str(error) if error else None,
    }


def fit_in_background(trainer: TorchTrainer) -> Exception | None:
    """``trainer.fit()``'s error (None on success). It runs in a thread, so Ctrl-C reaches
    this one as a plain KeyboardInterrupt (Ray Train's own handler, installed only in the
    main thread, would exit the process from inside Ray with a status and no word); the
    caller stops Ray, which ends the workers; finished checkpoints are kept."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["error"] = trainer.fit().error
        except ray.train.TrainingFailedError as exc:  # raised once max_failures is used up
            outcome["error"] = exc
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as it is
            outcome["crash"] = exc

    thread = threading.Thread(target=run, name="t2i-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "crash" in outcome:
        raise outcome["crash"]
    return outcome.get("error")


def fit(cfg: Config, fail_once_at_epoch: int = -1) -> dict:
    """Train (or resume) the run described by ``cfg``; returns :func:`summarize`'s dict.
    ``fail_once_at_epoch``: a fault drill for tests (see :func:`make_trainer`)."""
    start_ray()
    started = time.perf_counter()
    with following(cfg.train.epochs) as relay:
        plan = make_trainer(cfg, callbacks=[relay], fail_once_at_epoch=fail_once_at_epoch)
        checkpoints = ckpt_lib.run_checkpoints(plan.run_dir)  # epochs from meta.json: no second weights read
        if checkpoints and checkpoints[-1][0] + 1 >= cfg.train.epochs:
            print(f"{plan.run_dir} already finished epoch {checkpoints[-1][0]}; raise train.epochs to train longer")
            return summarize(plan.run_dir)
        print(console.run_line(plan.facts), flush=True)
        check_gpu_workers(plan.facts)
        error = fit_in_background(plan.trainer)
    summary = summarize(plan.run_dir, error)
    print(console.summary_line(summary, time.perf_counter() - started), flush=True)
    return summary
