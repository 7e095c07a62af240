"""Run tracking: TensorBoard files in every run folder, read by a real TensorBoard and seen
in a browser; MLflow in its local store and on a real ``mlflow server``; a redone epoch
replaces its points instead of adding a second one."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import headless_chromium, needs_chromium

from t2i import config as config_lib
from t2i.config import ConfigError
from t2i.training import tracking

TINY = ["model.width=8", "model.hidden=64", "model.latent_dim=8", "data.batch_size=32",
        "data.samples_per_prompt=2", "optim.lr=0.003", "optim.name=adam", "train.num_workers=0"]


def tiny_cfg(shapes_dir, tmp_path, *extra):
    return config_lib.load(None, TINY + [f"data.path={shapes_dir}", f"train.storage_path={tmp_path}",
                                         "train.name=run", *extra])


def scalar_points(run_dir, tag) -> list[tuple[int, float]]:
    """Every (step, value) TensorBoard's own reader finds for ``tag`` in a run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert process.poll() is None, process.stdout.read()[-3000:]
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds} s")


def test_metrics_become_grouped_tags_and_the_config_flat_hyperparameters():
    metrics = {"epoch": 3, "epochs_done": 4, "train_loss": 2.0, "dev_gen_mse": 0.1, "dev_pairs": 50,
               "samples_per_s": 900.0, "epoch_s": 2.5, "lr": 1e-3, "selection": 0.1, "selected_by": "dev_gen_mse"}
    assert tracking.curve_tags(metrics, ("train", "dev")) == {
        "train/loss": 2.0, "dev/gen_mse": 0.1, "speed/samples_per_s": 900.0, "speed/epoch_s": 2.5,
        "selection/value": 0.1}
    hp = tracking.hyperparameters(config_lib.load("gan"))
    assert hp["model.family"] == "gan" and hp["data.eval_splits"] == "dev" and hp["optim.ema_decay"] == 0.0
    assert "data.path" not in hp and "train.storage_path" not in hp  # places, not hyperparameters
    assert all(isinstance(v, (str, int, float, bool)) for v in hp.values())
    assert tracking.best_so_far([{"selection": 0.3}, {"selection": 0.2}, {"selection": 0.4}], "selection") == 0.2


def test_mlflow_missing_is_named_before_training(monkeypatch, tmp_path):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(ConfigError, match=r"needs the mlflow package.*pip install 't2i\[mlflow\]'"):
        tracking.plan_tracking(config_lib.load(None, ["train.tracking=mlflow"]), str(tmp_path))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="set MLFLOW_TRACKING_URI"):
        tracking.plan_tracking(config_lib.load(None, ["train.tracking=mlflow"]), "s3://bucket/runs")
    with pytest.raises(ConfigError, match="train.tracking must be one of"):
        config_lib.load(None, ["train.tracking=wandb"])


@pytest.fixture(scope="module")
def tracked_run(shapes_dir, tmp_path_factory, ray_session):
    from t2i.training.driver import fit

    runs = tmp_path_factory.mktemp("tracked")
    summary = fit(tiny_cfg(shapes_dir, runs, "train.epochs=2"))
    assert summary["error"] is None
    return runs, summary


def test_tensorboard_event_files_hold_curves_grids_and_hyperparameters(tracked_run):
    runs, summary = tracked_run
    run_dir = runs / "run"
    assert sorted(p.name for p in run_dir.glob("events.out.tfevents.*")) == [
        "events.out.tfevents.000000.t2i", "events.out.tfevents.000001.t2i"]  # one per epoch
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert scalar_points(run_dir, "dev/gen_mse") == [
        (row["epoch"], pytest.approx(row["dev_gen_mse"], rel=1e-6)) for row in history]
    assert [s for s, _ in scalar_points(run_dir, "optim/lr_model")] == [0, 1]
    assert scalar_points(run_dir, "selection/best")[-1][1] == pytest.approx(min(r["selection"] for r in history))
    assert summary["tensorboard"] == f"tensorboard --logdir {runs}"


@needs_chromium
def test_tensorboard_shows_the_run_in_a_browser(tracked_run, tmp_path):
    """A real ``tensorboard --logdir`` on 127.0.0.1: the run's scalar tags and its sample
    grid in Chromium, its hyperparameters in the HParams plugin."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    runs, _ = tracked_run
    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(runs), "--host", "127.0.0.1",
                              "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base + "/data/runs", board)
        request = urllib.request.Request(
            base + "/data/plugin/hparams/session_groups", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN"],
                             "colParams": [], "startIndex": 0, "sliceSize": 10}).encode())
        groups = json.loads(urllib.request.urlopen(request, timeout=30).read())["sessionGroups"]
        assert [g["name"] for g in groups] == ["run"]
        assert groups[0]["hparams"]["model.width"] == 8 and groups[0]["hparams"]["optim.name"] == "adam"
        with headless_chromium(1400, 1000) as driver:
            driver.get(base + "/#timeseries")
            body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
            WebDriverWait(driver, 90).until(lambda d: "gen_mse" in body(d))  # the first group's cards
            # Tags of the other groups (drawn as they scroll into view): through the page's tag filter.
            search = driver.find_element(By.CSS_SELECTOR, "input[placeholder^='Filter tags']")
            for tag in ("train/loss", "speed/samples_per_s", "optim/lr_model", "selection/best"):
                search.clear()
                search.send_keys(tag)
                WebDriverWait(driver, 30).until(lambda d, t=tag: t.split("/")[-1] in body(d))
            search.clear()
            search.send_keys("samples$")  # the sample grid's image card: a decoded PNG wider than one tile
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(
                "return Array.from(document.querySelectorAll('img')).some(i => i.complete && i.naturalWidth > 64)"))
            assert driver.save_screenshot(str(tmp_path / "board.png"))
    finally:
        board.terminate()
        board.wait(timeout=30)


def test_a_redone_epoch_replaces_its_points_and_mlflow_continues_its_run(shapes_dir, tmp_path, ray_session):
    """A run that lost its last checkpoint redoes that epoch: TensorBoard shows one point per
    step (the new one), and the MLflow run (local SQLite store) is continued, not doubled."""
    from mlflow.tracking import MlflowClient

    from t2i.training.driver import fit

    assert fit(tiny_cfg(shapes_dir, tmp_path, "train.epochs=2", "train.tracking=mlflow"))["error"] is None
    run_dir = tmp_path / "run"
    first = json.loads((run_dir / tracking.MLFLOW_RUN_FILE).read_text())
    assert first["tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    shutil.rmtree(run_dir / "checkpoint_local_epoch0001")  # as if the run died before saving epoch 1
    assert fit(tiny_cfg(shapes_dir, tmp_path, "train.epochs=3", "train.tracking=mlflow"))["error"] is None
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    points = scalar_points(run_dir, "dev/gen_mse")
    assert [step for step, _ in points] == [0, 1, 2]  # no second point at step 1
    assert points[1][1] == pytest.approx(history[1]["dev_gen_mse"], rel=1e-6)  # the redone epoch's value

    client = MlflowClient(first["tracking_uri"])
    assert json.loads((run_dir / tracking.MLFLOW_RUN_FILE).read_text())["run_id"] == first["run_id"]
    [run] = client.search_runs(client.get_experiment_by_name("t2i").experiment_id)
    assert run.info.run_id == first["run_id"] and run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["model.width"] == "8" and run.data.params["train.tracking"] == "mlflow"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "dev/gen_mse")} == {0, 1, 2}
    assert run.data.metrics["dev/gen_mse"] == pytest.approx(history[-1]["dev_gen_mse"], rel=1e-6)
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert grids == ["samples/epoch_000.png", "samples/epoch_001.png", "samples/epoch_002.png"]
    assert (tmp_path / "mlartifacts").is_dir()  # beside the runs, not in a worker's working directory


def test_a_run_logs_to_a_real_mlflow_server(shapes_dir, tmp_path, ray_session, monkeypatch):
    from mlflow.tracking import MlflowClient

    from t2i.training.driver import fit

    port = free_port()
    server = subprocess.Popen(
        [shutil.which("mlflow", path=str(sys.prefix) + "/bin") or "mlflow", "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(uri + "/health", server)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        summary = fit(tiny_cfg(shapes_dir, tmp_path / "runs", "train.epochs=1", "train.tracking=mlflow",
                               "train.name=served"))
        assert summary["error"] is None
        client = MlflowClient(uri)
        [run] = client.search_runs(client.get_experiment_by_name("t2i").experiment_id)
        assert run.info.run_name == "served" and run.info.status == "FINISHED"
        assert "dev/gen_mse" in run.data.metrics and run.data.params["optim.name"] == "adam"
        assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/epoch_000.png"]
        assert list((tmp_path / "server-artifacts").rglob("epoch_000.png"))  # uploaded through the server
        assert not (tmp_path / "runs" / "mlflow.db").exists()  # no local store beside it
    finally:
        server.terminate()
        server.wait(timeout=30)
