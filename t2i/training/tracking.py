"""Run tracking: TensorBoard event files in every run folder, an MLflow run when asked.

Rank 0 writes, once per epoch, what ``metrics.csv`` holds plus the learning rate of every
optimizer, the fixed-prompt sample grid as an image, and the config as TensorBoard
hyperparameters (the HParams view) with the best selection metric so far. So
``tensorboard --logdir runs`` shows every run on the machine (or on shared storage), and a
sweep's trials under ``<sweep>/trials/<trial>``.

Each epoch goes to its own event file, named by the epoch (``events.out.tfevents.000003.t2i``),
written locally and then copied to the run folder (which may be an object store, where
files cannot be appended to). A resumed run, or one restarted after a worker failure,
rewrites the file of an epoch it redoes instead of adding a second point at that step,
so its curves continue without duplicates.

``train.tracking = "mlflow"`` also logs the same metrics, grids and config to an MLflow
tracking server (``MLFLOW_TRACKING_URI``, else a local SQLite store ``mlflow.db`` beside
the runs, MLflow's own default since it retired its file store) with Ray's ``setup_mlflow``;
a resumed run continues its MLflow run (id kept in ``mlflow_run.json``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from t2i import storage
from t2i.config import Config, ConfigError
from t2i.training.checkpoint import SELECTION_METRIC

EVENT_FILE = "events.out.tfevents.{epoch:06d}.t2i"  # "tfevents" is what TensorBoard looks for
MLFLOW_RUN_FILE = "mlflow_run.json"
DEFAULT_EXPERIMENT = "t2i"
# Not hyperparameters: where things are, and the prompts drawn (long text, one per run).
NOT_HPARAMS = ("data.path", "data.cache_dir", "data.prompts", "train.storage_path", "train.name")
NOT_CURVES = ("epoch", "epochs_done", "lr")  # the step itself; lr comes per optimizer; *_pairs: counts


@dataclass(frozen=True)
class TrackingPlan:
    """Decided on the driver: where a run's curves go besides its metrics files."""
    kind: str = "tensorboard"   # train.tracking: "tensorboard", "mlflow" or "none"
    experiment: str = DEFAULT_EXPERIMENT  # MLflow experiment: a sweep's name, else "t2i"
    mlflow_uri: str = ""        # resolved on the driver, so every worker node logs to the same place
    mlflow_artifacts: str = ""  # with the local store: its artifact folder (a server chooses its own)


# ----------------------------------------------------------------------------- pure parts
def hyperparameters(cfg: Config) -> dict[str, str | int | float | bool]:
    """The config as flat ``section.key`` hyperparameters (lists joined), the same keys for
    every run and trial so TensorBoard's HParams view lines them up."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in NOT_HPARAMS:
                flat[name] = " | ".join(value) if isinstance(value, list) else value
    return flat


def curve_tags(metrics: dict, splits: tuple[str, ...]) -> dict[str, float]:
    """Epoch metrics as grouped tags: ``dev_gen_mse`` -> ``dev/gen_mse``,
    ``samples_per_s`` -> ``speed/samples_per_s``, ``selection`` -> ``selection/value``."""
    tags = {}
    for key, value in metrics.items():
        if (key in NOT_CURVES or key.endswith("_pairs") or isinstance(value, bool)
                or not isinstance(value, (int, float))):
            continue
        split = next((s for s in splits if key.startswith(f"{s}_")), None)
        if split:
            tags[f"{split}/{key[len(split) + 1:]}"] = float(value)
        elif key in ("samples_per_s", "epoch_s"):
            tags[f"speed/{key}"] = float(value)
        else:
            tags[f"{key}/value"] = float(value)
    return tags


def best_so_far(history: list[dict], metric: str) -> float:
    """Lowest ``metric`` over the run's epochs (checkpoints are ranked lower-is-better)."""
    values = [row[metric] for row in history if isinstance(row.get(metric), (int, float))]
    return float(min(values)) if values else float("nan")


def mlflow_store(storage_root: str) -> tuple[str, str]:
    """(tracking URI, artifact folder): ``MLFLOW_TRACKING_URI`` (the server keeps the
    artifacts), else ``sqlite:///<storage_root>/mlflow.db`` with artifacts in
    ``<storage_root>/mlartifacts`` (never the worker's working directory, which Ray deletes)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], ""
    if storage.is_uri(storage_root):
        raise ConfigError(f"train.tracking='mlflow' with runs at {storage_root}: the local MLflow store needs a "
                          f"local or mounted folder; set MLFLOW_TRACKING_URI to your tracking server")
    root = Path(storage_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()


def plan_tracking(cfg: Config, storage_root: str, experiment: str = DEFAULT_EXPERIMENT) -> TrackingPlan:
    """Check that the chosen tracker can run here, and where it logs."""
    if cfg.train.tracking != "mlflow":
        return TrackingPlan(kind=cfg.train.tracking, experiment=experiment)
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("train.tracking='mlflow' needs the mlflow package, which is not installed: "
                          "pip install 't2i[mlflow]' (or pip install mlflow), or use train.tracking=tensorboard")
    uri, artifacts = mlflow_store(storage_root)
    return TrackingPlan(kind="mlflow", experiment=experiment, mlflow_uri=uri, mlflow_artifacts=artifacts)


# ----------------------------------------------------------------------------- writers
@dataclass(frozen=True)
class EpochRecord:
    """What one epoch hands the trackers."""
    epoch: int
    metrics: dict
    history: list[dict]             # every epoch so far, this one last (run_files.record_epoch)
    learning_rates: dict[str, float]  # per optimizer, e.g. {"generator": 1e-4, "discriminator": 4e-4}
    grid_png: Path                  # the fixed prompts' sample grid
    final: bool                     # the run's last epoch

    def scalars(self, splits: tuple[str, ...]) -> dict[str, float]:
        """Every curve point of this epoch, by tag: the metrics, each optimizer's learning
        rate, and the best checkpoint-ranking value so far (the same for every tracker)."""
        values = curve_tags(self.metrics, splits)
        values |= {f"optim/lr_{name}": lr for name, lr in self.learning_rates.items()}
        values["selection/best"] = best_so_far(self.history, SELECTION_METRIC)
        return values


class TensorBoardLog:
    """One event file per epoch in the run folder (see the module's docstring)."""

    def __init__(self, run_dir: str, cfg: Config):
        self.run_dir, self.cfg = run_dir, cfg
        self.splits = ("train", *cfg.data.eval_splits)

    def log(self, record: EpochRecord) -> None:
        from PIL import Image  # noqa: PLC0415 - rank 0 only
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - imports TensorBoard (~1 s)
        from torch.utils.tensorboard.summary import hparams  # noqa: PLC0415

        with tempfile.TemporaryDirectory() as folder:
            writer = SummaryWriter(log_dir=folder)
            step = record.epoch
            for tag, value in record.scalars(self.splits).items():
                writer.add_scalar(tag, value, step)
            grid = np.asarray(Image.open(record.grid_png).convert("RGB"))
            writer.add_image("samples", grid, step, dataformats="HWC")
            # The HParams view: this run's config; its metric columns are the run's scalars
            # (selection/best: what its checkpoints are ranked by). No experiment summary,
            # so TensorBoard builds one from every run's and trial's own.
            _, session_start, session_end = hparams(hyperparameters(self.cfg), {})
            writer.file_writer.add_summary(session_start)
            if record.final:
                writer.file_writer.add_summary(session_end)
            writer.close()
            [written] = Path(folder).glob("events.out.tfevents.*")
            storage.upload(written, storage.join(self.run_dir, EVENT_FILE.format(epoch=record.epoch)))


class MLflowLog:
    """An MLflow run per t2i run (a sweep's trials in the sweep's experiment), through Ray's
    ``setup_mlflow``; rank 0 only, like every other file a run writes."""

    def __init__(self, run_dir: str, run_name: str, cfg: Config, plan: TrackingPlan):
        from ray.air.integrations.mlflow import setup_mlflow  # noqa: PLC0415 - optional dependency

        self.splits = ("train", *cfg.data.eval_splits)
        id_file = storage.join(run_dir, MLFLOW_RUN_FILE)
        if storage.is_file(id_file):  # resumed: continue the same MLflow run and its curves
            import mlflow  # noqa: PLC0415

            saved = json.loads(storage.read_text(id_file))
            mlflow.set_tracking_uri(saved["tracking_uri"])
            mlflow.start_run(run_id=saved["run_id"])
            self.mlflow = mlflow
            return
        self.mlflow = setup_mlflow(config=hyperparameters(cfg), tracking_uri=plan.mlflow_uri,
                                   experiment_name=plan.experiment, run_name=run_name,
                                   artifact_location=plan.mlflow_artifacts or None,
                                   create_experiment_if_not_exists=True, tags={"t2i.run_dir": run_dir},
                                   rank_zero_only=False)  # the caller is rank 0 already
        run = self.mlflow.active_run()
        storage.write_text(id_file, json.dumps({"run_id": run.info.run_id, "tracking_uri": plan.mlflow_uri,
                                                "experiment": plan.experiment}))

    def log(self, record: EpochRecord) -> None:
        self.mlflow.log_metrics(record.scalars(self.splits), step=record.epoch)
        with tempfile.TemporaryDirectory() as folder:
            named = Path(folder) / f"epoch_{record.epoch:03d}.png"
            named.write_bytes(record.grid_png.read_bytes())
            self.mlflow.log_artifact(str(named), artifact_path="samples")
        if record.final:
            self.mlflow.end_run()


def open_trackers(plan: TrackingPlan, run_dir: str, run_name: str, cfg: Config) -> list:
    """The trackers rank 0 feeds every epoch (none for ``train.tracking = "none"``)."""
    if plan.kind == "none":
        return []
    trackers = [TensorBoardLog(run_dir, cfg)]
    if plan.kind == "mlflow":
        trackers.append(MLflowLog(run_dir, run_name, cfg, plan))
    return trackers
