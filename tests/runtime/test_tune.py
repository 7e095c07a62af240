"""Ray Tune sweeps: validation before trials, random / Optuna / BOHB search on tiny data,
an interrupted Optuna sweep resumed, each trial's hyperparameters in TensorBoard."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from t2i import config as config_lib
from t2i.config import ConfigError
from t2i.training import checkpoint as ckpt_lib

SMOKE = ["train.epochs=2", "data.batch_size=32", "model.hidden=64", "data.samples_per_prompt=2",
         "search.num_samples=2", "search.grace_period=2"]


def write_space(tmp_path, space: str) -> str:
    path = tmp_path / "sweep.toml"
    path.write_text(f'[search]\nbase_config = "shapes"\n[space]\n{space}\n')
    return str(path)


def test_bad_search_spaces_fail_before_any_trial(tmp_path):
    from t2i.runtime.tune import load_search

    with pytest.raises(ConfigError, match="model.widht"):
        load_search(write_space(tmp_path, '"model.widht" = { type = "choice", values = [8] }'))
    with pytest.raises(ConfigError, match="empty range"):
        load_search(write_space(tmp_path, '"optim.lr" = { type = "loguniform", low = 0.01, high = 0.001 }'))
    with pytest.raises(ConfigError, match="non-empty list"):
        load_search(write_space(tmp_path, '"model.width" = { type = "choice", values = [] }'))
    with pytest.raises(ConfigError, match="never reported"):
        load_search(write_space(tmp_path, '"optim.lr" = { type = "uniform", low = 0.001, high = 0.01 }'),
                    ["search.metric=test_accuracy"])
    # Each value is checked on top of the base config: the seed family has no caption-reading decoder.
    with pytest.raises(ConfigError, match="seed family decodes z alone"):
        load_search(write_space(tmp_path, '"model.family" = { type = "choice", values = ["cvae", "seed"] }'))
    with pytest.raises(ConfigError, match="unknown search option"):
        load_search(None, ["search.nmu_samples=3"])


def test_every_shipped_sweep_file_is_valid():
    from t2i.runtime.tune import load_search

    files = sorted((REPO / "t2i" / "configs" / "sweeps").glob("*.toml"))
    assert {f.name for f in files} >= {"default.toml", "gan.toml"}
    for path in files:
        search, base = load_search(path)
        assert search.space, path.name
    search, base = load_search(REPO / "t2i" / "configs" / "sweeps" / "gan.toml")
    assert search.metric == "dev_align" and base.loss.align_weight > 0  # a generation metric, not blur-loving MSE


def trial_epochs(sweep_dir):
    return {d.name: sorted(ckpt_lib.read_state(p)["epoch"] for p in d.glob("checkpoint_*/model.pt"))
            for d in (sweep_dir / "trials").iterdir() if d.is_dir()}


def trial_hyperparameters(trial_dir) -> dict:
    """The hyperparameters TensorBoard's HParams view shows for a trial (its event files)."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata

    events = EventMultiplexer()
    events.AddRunsFromDirectory(str(trial_dir))
    events.Reload()
    [content] = events.PluginRunToTagToContent(metadata.PLUGIN_NAME).values()
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    return {key: value.number_value if value.HasField("number_value") else value.string_value
            for key, value in start.hparams.items()}


def assert_trials_in_tensorboard(sweep_dir, summary):
    """Every trial's curves and hyperparameters sit in its own run folder, and nothing else
    in the sweep (Tune's automatic TensorBoardX copies) adds a second run per trial."""
    events = sorted(p.relative_to(sweep_dir).parts[:2] for p in sweep_dir.rglob("events.out.tfevents.*"))
    trial_dirs = sorted(d.name for d in (sweep_dir / "trials").iterdir() if d.is_dir())
    assert sorted(set(events)) == [("trials", name) for name in trial_dirs], events
    with open(summary["table"]) as table:
        rows = {row["trial"]: row for row in csv.DictReader(table)}
    for name in trial_dirs:
        hp = trial_hyperparameters(sweep_dir / "trials" / name)
        for key in summary["best_hyperparameters"]:
            assert str(hp[key]) == rows[name][key] or float(hp[key]) == pytest.approx(float(rows[name][key])), key


@pytest.mark.parametrize("algorithm", ["random", "bohb"])
def test_random_and_bohb_sweeps_run_and_rank_their_trials(algorithm, shapes_dir, tmp_path, ray_session):
    from t2i.runtime.tune import load_search, run

    # The random sweep also logs to MLflow (local store), each trial a run in the sweep's experiment.
    tracking = "mlflow" if algorithm == "random" else "tensorboard"
    search, base = load_search("default", SMOKE + [f"data.path={shapes_dir}", f"train.storage_path={tmp_path}",
                                                   f"search.algorithm={algorithm}", "search.name=sw",
                                                   f"train.tracking={tracking}"])
    summary = run(search, base)
    assert summary["trials"] == 2 and summary["best_checkpoint"]
    json.dumps(summary)  # plain values (BOHB proposes numpy scalars)
    assert set(summary["best_hyperparameters"]) == set(search.space)
    assert_trials_in_tensorboard(tmp_path / "sw", summary)
    if tracking == "mlflow":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        runs = client.search_runs(client.get_experiment_by_name("sw").experiment_id)
        trials = {d.name for d in (tmp_path / "sw" / "trials").iterdir()}
        assert {r.info.run_name for r in runs} == trials and all("dev/gen_mse" in r.data.metrics for r in runs)


def test_a_missing_search_package_is_named(monkeypatch):
    from t2i.runtime import tune as sweep

    real = sweep.importlib.util.find_spec
    monkeypatch.setattr(sweep.importlib.util, "find_spec", lambda name: None if name == "hpbandster" else real(name))
    with pytest.raises(ConfigError, match="search.algorithm='bohb' needs hpbandster, not installed"):
        sweep.load_search("default", ["search.algorithm=bohb"])
    with pytest.raises(ConfigError, match="search.algorithm must be one of random, optuna, bohb"):
        sweep.load_search("default", ["search.algorithm=grid"])


def test_interrupted_optuna_sweep_resumes_without_repeating_trials(shapes_dir, tmp_path, ray_session):
    from t2i.runtime.tune import load_search, run

    args = [f"--set={o}" for o in SMOKE + [f"data.path={shapes_dir}", f"train.storage_path={tmp_path}",
                                          "search.name=sw", "search.algorithm=optuna"]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "tune_search.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trials = tmp_path / "sw" / "trials"
    deadline = time.time() + 400
    # Interrupt (Ctrl-C) once the second trial has checkpointed its first epoch: the first
    # trial is finished, and the restored sweep must continue the second at its epoch 1.
    while time.time() < deadline and proc.poll() is None:
        try:
            if trials.is_dir() and sorted(trial_epochs(tmp_path / "sw").values()) == [[0], [0, 1]]:
                break
        except Exception:  # noqa: BLE001 - a checkpoint being written right now
            pass
        time.sleep(0.3)
    assert proc.poll() is None, "the sweep ended before it could be interrupted:\n" + proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    # A person's console: one line per trial epoch, prefixed by the trial; Ray's internals quiet.
    assert re.search(r"^\[trial_\w+\] epoch 1/2 \| train loss [\d.]+ \| dev loss", output, re.M), output[-3000:]
    for noise in ("Execution plan", "State Transition", "TrainController", "TrainingReport("):
        assert noise not in output, (noise, output[-3000:])
    before = trial_epochs(tmp_path / "sw")
    finished = [name for name, epochs in before.items() if epochs == [0, 1]]
    # Usually [[0], [0, 1]]; the second trial may just finish its last epoch while stopping.
    assert len(before) == 2 and [0, 1] in before.values() and all(e[:1] == [0] for e in before.values()), before

    search, base = load_search(REPO / "t2i" / "configs" / "sweeps" / "default.toml",
                               SMOKE + [f"data.path={shapes_dir}", f"train.storage_path={tmp_path}", "search.name=sw",
                                        "search.algorithm=optuna"])
    summary = run(search, base)
    after = trial_epochs(tmp_path / "sw")
    assert all(after[name] == [0, 1] for name in finished)  # a finished trial is not trained again
    assert len(after) == 2 and all(epochs == [0, 1] for epochs in after.values()), after
    with open(summary["table"]) as table:
        rows = list(csv.DictReader(table))
    # Tune counts epochs trained (epochs_done), not results since the restore: the resumed
    # trial ran 2 epochs, not "1 then stopped early by ASHA".
    assert len(rows) == 2 and {r["stop_reason"] for r in rows} == {"completed"}, rows
    assert {r["epochs"] for r in rows} == {"2"}
    assert float(rows[0]["best_dev_gen_mse"]) <= float(rows[1]["best_dev_gen_mse"])
    assert summary["best_checkpoint"] and os.path.exists(summary["best_checkpoint"])
    json.dumps(summary)
    assert_trials_in_tensorboard(tmp_path / "sw", summary)

    # The best config retrains with train_job's loader.
    best = config_lib.load(summary["best_config_file"], [f"train.storage_path={tmp_path / 'retrain'}",
                                                        "train.epochs=1"])
    for key, value in summary["best_hyperparameters"].items():
        section, name = key.split(".")
        assert getattr(getattr(best, section), name) == value
    from t2i.training.driver import fit

    retrained = fit(best)
    assert retrained["error"] is None and retrained["epochs_done"] == 1
