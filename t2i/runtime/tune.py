"""Hyperparameter search with Ray Tune over the Ray Train job (Train V2 + Tune pattern).

Each Tune trial runs :func:`trial_driver`, a tiny function that builds the same
``TorchTrainer`` as ``train_job.py`` (``t2i.training.driver.make_trainer``) with the trial's
hyperparameters and reports every epoch to Tune through ``TuneReportCallback``. Trials are
proposed at random, by Optuna's TPE or by BOHB (``search.algorithm``), and stopped early by
ASHA (BOHB: its own HyperBand). The sweep lives in ``<storage>/<name>``: Tune's state (for
``Tuner.restore``, the search algorithm's included), one Train run per trial under
``trials/`` (checkpoints, sample grids, TensorBoard files with the trial's hyperparameters),
``results.csv`` and ``best_config.toml``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, HyperBandForBOHB
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from t2i import config as config_lib
from t2i import console, storage
from t2i.config import Config, ConfigError
from t2i.errors import T2IError
from t2i.runtime.ray_env import start_ray, submitted_working_dir
from t2i.training import run_files
from t2i.training.driver import (
    check_cluster_storage,
    check_gpu_workers,
    check_paths_under_job,
    make_trainer,
    resolve_data,
    summarize,
)
from t2i.training.families import FAMILIES

OTHER_METRICS = ("samples_per_s", "epoch_s", "lr", "epoch", "epochs_done", "selection")
PROGRESS = "epochs_done"  # ASHA's clock: epochs trained, also across a restored sweep
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")
# Search algorithm -> the packages it needs (module name, pip name).
ALGORITHMS = {"random": (), "optuna": (("optuna", "optuna"),),
              "bohb": (("hpbandster", "hpbandster"), ("ConfigSpace", "ConfigSpace"))}


@dataclass
class SearchConfig:
    name: str = "sweep"             # sweep folder under train.storage_path; the same name resumes
    base_config: str = "shapes"  # training config the hyperparameters modify (a path or a built-in name)
    # What ASHA and the ranking minimise/maximise: by default the error of images drawn from
    # dev captions alone (a model's ELBO lets its encoder see the image: not generation).
    metric: str = "dev_gen_mse"
    mode: str = "min"
    # "random", "optuna" (Tree-structured Parzen Estimator; Bergstra et al. 2011) or "bohb"
    # (Bayesian optimisation + HyperBand; Falkner et al. 2018); benchmarks/bench_search.py compares them.
    algorithm: str = "random"
    num_samples: int = 8            # trials
    max_concurrent_trials: int = 1  # 1 on a 2-core machine; more on a cluster
    grace_period: int = 1           # epochs every trial gets before ASHA may stop it (not BOHB's HyperBand)
    reduction_factor: int = 2       # ASHA (or HyperBand) keeps 1/reduction_factor of trials at each rung
    seed: int = 0
    # {config key: {type: loguniform|uniform|choice|randint, low/high or values}}
    space: dict[str, dict[str, Any]] = field(default_factory=dict)


def reported_metrics(cfg: Config) -> set[str]:
    """Every metric the training loop reports for ``cfg`` (its family's terms per split)."""
    family = FAMILIES[cfg.model.family]
    names = {f"train_{m}" for m in family.TRAIN_TERMS}
    names |= {f"{s}_{m}" for s in cfg.data.eval_splits for m in family.EVAL_TERMS}
    return names | set(OTHER_METRICS)


def _domain(key: str, spec: dict[str, Any]):
    kind = spec.get("type")
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"space.{key}: type must be one of {DISTRIBUTIONS}, got {kind!r}")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"space.{key}: 'choice' needs a non-empty list 'values'")
        return tune.choice(values)
    low, high = spec.get("low"), spec.get("high")
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or not low < high:
        raise ConfigError(f"space.{key}: needs numbers low < high, got low={low!r} high={high!r} (empty range)")
    if kind == "loguniform":
        if low <= 0:
            raise ConfigError(f"space.{key}: loguniform needs low > 0")
        return tune.loguniform(low, high)
    if kind == "randint":
        return tune.randint(int(low), int(high) + 1)
    return tune.uniform(low, high)


def plain(value: Any) -> Any:
    """A Python value for a numpy scalar (BOHB proposes them), anything else as it is."""
    return value.item() if hasattr(value, "item") else value


def with_hyperparameters(base: Config, hp: dict[str, Any]) -> Config:
    """A copy of ``base`` with ``{"section.key": value}`` applied and validated."""
    cfg = config_lib.from_dict(base.to_dict())
    for key, value in hp.items():
        section, _, name = key.partition(".")
        config_lib.apply(cfg, {section: {name: plain(value)}})
    config_lib.validate(cfg)
    return cfg


def build_space(search: SearchConfig, base: Config) -> dict[str, Any]:
    if not search.space:
        raise ConfigError("the search space is empty: add a [space] table")
    space = {}
    for key, spec in search.space.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"space.{key} must be a table like {{type = \"choice\", values = [...]}}")
        samples = (spec["values"] if spec.get("type") == "choice" and isinstance(spec.get("values"), list)
                   else [spec.get("low", 1)])
        for value in samples:
            # A real key, a value of its type, and a valid config on top of the base one, so
            # no trial fails on a bad combination later.
            with_hyperparameters(base, {key: value})
        space[key] = _domain(key, spec)
    return space


def load_search(path: str | Path | None, overrides: list[str] = ()) -> tuple[SearchConfig, Config]:
    """Read a sweep file ([search] + [space] tables) and its base training config.

    ``--set search.key=value`` sets sweep options; any other key is a training override
    applied to every trial (e.g. ``train.epochs=3``).
    """
    raw: dict[str, Any] = {}
    if path:
        path = config_lib.resolve_config_file(path, config_lib.SWEEP_CONFIGS)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: not a UTF-8 TOML file: {exc}") from None
    unknown = set(raw) - {"search", "space"}
    if unknown:
        raise ConfigError(f"{path}: unknown tables {sorted(unknown)}; a sweep file has [search] and [space]")
    search = SearchConfig(space=dict(raw.get("space", {})))
    valid = {f.name: f.type for f in fields(SearchConfig) if f.name != "space"}
    train_overrides = []
    items = [(f"search.{k}", v) for k, v in raw.get("search", {}).items()]
    items += [config_lib.parse_override(o) for o in overrides]
    for key, value in items:
        section, _, name = key.partition(".")
        if section != "search":
            train_overrides.append(f"{key}={value}")
            continue
        if name not in valid:
            raise ConfigError(f"unknown search option {key!r}; valid: {', '.join('search.' + k for k in valid)}")
        current = getattr(search, name)
        setattr(search, name, type(current)(value) if not isinstance(value, type(current)) else value)
    if search.mode not in ("min", "max"):
        raise ConfigError("search.mode must be 'min' or 'max'")
    check_algorithm(search.algorithm)
    base = config_lib.load(search.base_config, train_overrides)  # a path or a built-in name
    if search.metric not in reported_metrics(base):
        raise ConfigError(f"search.metric {search.metric!r} is never reported by training; "
                          f"reported: {', '.join(sorted(reported_metrics(base)))}")
    build_space(search, base)  # validate before any trial starts
    return search, base


class TrialLines(tune.Callback):
    """On the sweep's driver: a line when a trial starts, one per trial epoch (the run's
    epoch line prefixed by the trial), and one when it ends. Unless verbose, these replace
    Tune's status tables (``RunConfig(verbose=0)``)."""

    def __init__(self, epochs: int, printer=print):
        self.epochs = epochs
        self.printer = printer

    def _say(self, trial, text: str) -> None:
        self.printer(f"[trial_{trial.trial_id}] {text}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(trial, "started: " + ", ".join(f"{k}={v}" for k, v in trial.config.get("hp", {}).items()))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" in result:
            self._say(trial, console.epoch_line(result, self.epochs))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._say(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(trial, f"failed (details in {trial.local_path or 'the sweep folder'})")


def check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"search.algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    missing = [pip for module, pip in ALGORITHMS[algorithm] if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"search.algorithm={algorithm!r} needs {' and '.join(missing)}, not installed here: "
                          f"pip install 't2i[search]' (or: pip install {' '.join(missing)})")


def search_strategy(search: SearchConfig, epochs: int):
    """(search algorithm, trial scheduler) for ``search.algorithm``; at most
    ``max_concurrent_trials`` trials run at once, whichever proposes them."""
    if search.algorithm == "bohb":
        from ray.tune.search.bohb import TuneBOHB  # noqa: PLC0415 - optional packages

        # BOHB's model-based proposals go with its own HyperBand brackets (Falkner et al. 2018).
        return (ConcurrencyLimiter(TuneBOHB(seed=search.seed), max_concurrent=search.max_concurrent_trials),
                HyperBandForBOHB(time_attr=PROGRESS, max_t=epochs, reduction_factor=search.reduction_factor))
    asha = ASHAScheduler(time_attr=PROGRESS, max_t=epochs, grace_period=search.grace_period,
                         reduction_factor=search.reduction_factor)
    if search.algorithm == "optuna":
        from optuna.samplers import TPESampler  # noqa: PLC0415
        from ray.tune.search.optuna import OptunaSearch  # noqa: PLC0415

        # TPE's default of 10 random start-up trials would leave a small sweep random
        # search; a third of the budget (at least 2) starts its model.
        sampler = TPESampler(seed=search.seed, n_startup_trials=max(2, search.num_samples // 3))
        return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=search.max_concurrent_trials), asha
    return BasicVariantGenerator(random_state=search.seed, max_concurrent=search.max_concurrent_trials), asha


def trial_driver(params: dict) -> None:
    """One Tune trial: the training job with this trial's hyperparameters."""
    cfg = with_hyperparameters(config_lib.from_dict(params["base"]), params["hp"])
    trial_name = f"trial_{tune.get_context().get_trial_id()}"
    plan = make_trainer(cfg, callbacks=[TuneReportCallback()], run_name_override=trial_name,
                        storage_override=params["trials_dir"], experiment=params["sweep"])
    check_gpu_workers(plan.facts)
    plan.trainer.fit()


def sweep_dir(search: SearchConfig, base: Config) -> str:
    return storage.join(storage.absolute(base.train.storage_path), search.name)


def run(search: SearchConfig, base: Config) -> dict:
    """Run (or resume) the sweep; returns the summary printed as the last line."""
    start_ray()
    for warning in check_paths_under_job(base, submitted_working_dir()):
        print(f"t2i: warning: {warning}", flush=True)
    root = sweep_dir(search, base)
    # Trials run in their own working dirs: hand them absolute paths, and prepare the
    # built-in data once here rather than in every trial.
    base = config_lib.from_dict(base.to_dict())
    base.data.path = resolve_data(base)
    base.train.storage_path = storage.absolute(base.train.storage_path)
    check_cluster_storage(base, {"data.path": base.data.path, "train.storage_path": base.train.storage_path})
    trainable = tune.with_resources(trial_driver, {"CPU": 0.01})  # the driver itself is idle
    # Each trial's own run folder has its TensorBoard files (t2i.training.tracking); Tune's
    # automatic TensorBoardX logger would add a second, differently named copy of every trial.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    loggers = [CSVLoggerCallback(), JsonLoggerCallback()]  # what ResultGrid reads back
    if tune.Tuner.can_restore(root):
        print(f"resuming sweep {root}")
        tuner = tune.Tuner.restore(root, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        search_alg, scheduler = search_strategy(search, base.train.epochs)
        param_space = {"base": base.to_dict(), "trials_dir": storage.join(root, "trials"), "sweep": search.name,
                       "hp": build_space(search, base)}
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=search.metric, mode=search.mode, scheduler=scheduler,
                                        num_samples=search.num_samples,
                                        max_concurrent_trials=search.max_concurrent_trials, search_alg=search_alg),
            run_config=tune.RunConfig(name=search.name, storage_path=base.train.storage_path,
                                      callbacks=[TrialLines(base.train.epochs), *loggers],
                                      verbose=None if console.verbose() else 0),
        )
    grid = tuner.fit()
    return report(grid, search, base, root)


def report(grid, search: SearchConfig, base: Config, root: str) -> dict:
    rows = []
    for result in grid:
        # A trial that failed before it started has no config: its row keeps the columns.
        proposed = (result.config or {}).get("hp") or dict.fromkeys(search.space)
        hp = {key: plain(value) for key, value in proposed.items()}
        trial_id = result.metrics.get("trial_id") if result.metrics else storage.name(result.path)
        # The trial's run folder is the truth: Tune's last result misses an epoch finished
        # while the sweep was being interrupted, and a restored trial with nothing left to
        # train reports nothing new.
        history = run_files.read_history(storage.join(root, "trials", f"trial_{trial_id}"))
        if not history and result.metrics_dataframe is not None:
            history = result.metrics_dataframe.to_dict("records")
        values = [row[search.metric] for row in history
                  if isinstance(row.get(search.metric), (int, float)) and not math.isnan(row[search.metric])]
        best = (min(values) if search.mode == "min" else max(values)) if values else math.nan
        epochs = max((int(row.get(PROGRESS) or row.get("epoch", -1) + 1) for row in history), default=0)
        if result.error:
            reason = f"error ({type(result.error).__name__}; see {result.path})"
        elif epochs < base.train.epochs:
            reason = "stopped early (ASHA)"
        else:
            reason = "completed"
        rows.append({"trial": f"trial_{trial_id}", **hp, f"best_{search.metric}": best,
                     "epochs": epochs, "stop_reason": reason})
    sign = 1 if search.mode == "min" else -1
    rows.sort(key=lambda r: (math.isnan(r[f"best_{search.metric}"]), sign * r[f"best_{search.metric}"]))
    table = storage.write_csv(storage.join(root, "results.csv"), rows)
    print_table(rows)
    best_row = rows[0]
    if math.isnan(best_row[f"best_{search.metric}"]):
        raise T2IError(f"no trial of sweep {search.name} reported {search.metric}; each trial's error is in "
                       f"{table} and its folder under {root}")
    best_cfg = with_hyperparameters(base, {key: best_row[key] for key in search.space})
    best_cfg.train.name = f"{search.name}-best"
    best_path = storage.join(root, "best_config.toml")
    storage.write_text(best_path, f"# Best trial {best_row['trial']} of sweep {search.name} "
                                  f"({search.metric} = {best_row[f'best_{search.metric}']:.6g}).\n"
                                  f"# Retrain: python train_job.py --config {best_path}\n" + config_lib.dumps(best_cfg))
    trial_run = summarize(storage.join(root, "trials", best_row["trial"]))
    return {"sweep_dir": root, "table": table, "best_trial": best_row["trial"],
            "best_config_file": best_path, "best_hyperparameters": {k: best_row[k] for k in search.space},
            "metric": search.metric, "best_metric": best_row[f"best_{search.metric}"],
            "best_checkpoint": trial_run["best_checkpoint"], "trials": len(rows)}


def print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    cells = [[f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
