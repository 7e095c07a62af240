"""Shared fixtures: one Ray runtime for the whole session, tiny prepared datasets."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLICKR8K = (REPO.parent / "shared" / "data" / "flickr8k").resolve()

# Faster, quieter Ray Train in tests (measured: saves 2-4 s per fit).
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def needs_flickr8k():
    return pytest.mark.skipif(
        not (FLICKR8K / "Flickr8k_text").is_dir(),
        reason=f"real Flickr8k not found at {FLICKR8K} (only present beside the repo in CI and dev machines)",
    )


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for all tests (starting Ray costs ~5 s). With its dashboard, as t2i's
    own start_ray has: Train's placement-group cleaner asks the dashboard's State API
    whether a finished Tune trial's Train controller is gone; without it, every trial's
    worker bundle stays reserved and the next sweep in this process waits for CPUs forever."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False,
                 _temp_dir=None, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """A small prepared shapes set shared by the tests (read-only for them)."""
    from t2i.data.prepare import prepare_shapes

    out = tmp_path_factory.mktemp("data") / "shapes"
    prepare_shapes(out, n=600, seed=0, shard_rows=200)
    return out


@pytest.fixture(scope="session")
def checkpoint(shapes_dir, tmp_path_factory) -> Path:
    """An untrained tiny cvae (GRU captions) on the shapes vocabulary, saved as the 3rd epoch
    of a shapes run: enough for generate, evaluate and serve to run end to end."""
    import torch

    from t2i import config as config_lib
    from t2i.data.dataset import load_vocabulary
    from t2i.models import build_model
    from t2i.training import checkpoint as ckpt_lib

    cfg = config_lib.load(None, ["model.width=8", "model.hidden=64", "model.latent_dim=8", "model.family=cvae",
                                 "model.text_encoder=gru"])
    vocab = load_vocabulary(shapes_dir)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt")
    return ckpt_lib.save(folder, model=build_model(cfg.model, vocab.vectors), cfg=cfg, vocab=vocab, epoch=2,
                         metrics={"dev_loss": 1.0, "selection": 1.0, "selected_by": "dev_gen_mse"},
                         data={"max_words": 32, "dataset": "shapes"})


def chromium() -> tuple[str, str] | None:
    """The system's Chromium and chromedriver (.ci/run installs Debian's), or None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


needs_chromium = pytest.mark.skipif(chromium() is None, reason="no chromium + chromedriver here: `apt-get install -y "
                                                               "chromium chromium-driver` (.ci/run installs them)")


@contextlib.contextmanager
def headless_chromium(width: int = 900, height: int = 700):
    """A Selenium driver for the system Chromium, never Selenium Manager (which would try
    to download a browser or driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def s3_server(monkeypatch):
    """An S3 API on 127.0.0.1 (moto): the real pyarrow S3 client, no cloud account."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket="t2i-test")
    yield env
    server.stop()
