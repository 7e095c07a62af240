"""Careless or hostile configuration: every bad value is refused before Ray starts, with one
line naming the key; Ctrl-C stops a run with one line and keeps what it finished."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from t2i import config as config_lib
from t2i.config import ConfigError


@pytest.mark.parametrize("override, says", [
    ("optim.lr=nan", "optim.lr: must be a finite number"),
    ("optim.lr=inf", "optim.lr: must be a finite number"),
    ("loss.beta=nan", "loss.beta: must be a finite number"),
    ("loss.free_bits=nan", "loss.free_bits: must be a finite number"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
    ("optim.weight_decay=-5", "optim.weight_decay must be >= 0"),
    ("train.cpus_per_worker=-0.5", "train.cpus_per_worker must be >= 0"),
    ("train.keep_best=-4", "train.keep_best must be >= 1"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("loss.spectrum_weighting=ring", "spectrum_weighting: gan-family settings"),
    ("model.noise_basis=flat", "noise_basis: gan-family settings"),
    ("model.noise_images=per_channel", "noise_images: gan-family settings"),
    ("train.max_failures=-9", "train.max_failures must be >= -1"),
    ("model.width=100000", "GB to train); at most 1,000M"),
    ("data.shapes_n=-5", "data.shapes_n must be >= 50"),
    ("train.name=../../etc", "must be one folder name"),
    ("train.name=a/b", "must be one folder name"),
    ("train.name=..", "must be one folder name"),
    ("model.upsample=bilinear", "model.upsample: the plain decoder upsamples with transposed convs"),
    ("model.upsample=bicubic", "model.upsample"),
    ("model.block=residual", "model.block: the plain decoder upsamples with transposed convs"),
    ("model.block=resnet", "model.block"),
    ("model.padding=reflect", "model.padding: the plain decoder upsamples with transposed convs"),
    ("model.padding=circular", "model.padding"),
    ("model.activation=filtered", "model.activation: the plain decoder upsamples with transposed convs"),
    ("model.activation=relu", "model.activation"),
    ("train.gpus_per_worker=0", "train.gpus_per_worker must be in (0, 1]"),
    ("train.gpus_per_worker=2", "train.gpus_per_worker must be in (0, 1]"),
])
def test_bad_values_are_refused_by_name(override, says):
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f".*{says.replace('(', '.').replace(')', '.')}"):
        config_lib.load(None, [override])
    assert time.monotonic() - started < 10  # the size check allocates nothing


def test_a_gpu_share_is_for_one_worker_runs():
    assert config_lib.load(None, ["train.gpus_per_worker=0.5"]).train.gpus_per_worker == 0.5
    with pytest.raises(ConfigError, match="NCCL refuses two ranks of one run on one GPU.*got 0.5 with 2 workers"):
        config_lib.load(None, ["train.gpus_per_worker=0.5", "train.num_workers=2"])


def test_a_non_utf8_config_file_is_one_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[train]\nname = \"caf\xe9\"\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        config_lib.load(path)
    job = subprocess.run([sys.executable, "train_job.py", "--config", str(path)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert job.returncode == 2 and job.stderr.strip().count("\n") == 0 and "not UTF-8 text" in job.stderr


def test_ctrl_c_stops_a_run_with_one_line_and_it_resumes(shapes_dir, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    argv = [sys.executable, "train_job.py", "--smoke-test", "--data", str(shapes_dir),
            "--set", f"train.storage_path={tmp_path}", "--set", "train.epochs=30"]
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "smoke-test").glob("checkpoint_*/meta.json")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (out[-2000:], err[-2000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1].startswith("t2i: interrupted (Ctrl-C)")
    assert list((tmp_path / "smoke-test").glob("checkpoint_*/model.pt"))  # what finished is kept


def test_a_config_extends_another_and_names_only_what_it_changes(tmp_path):
    coco = config_lib.load("gan_coco")  # extends gan_flickr30k, which extends gan
    gan = config_lib.load("gan")
    assert coco.model.family == "gan" and coco.loss.augment == gan.loss.augment  # from gan
    assert coco.model.width == 64 and coco.data.batch_size == 64                 # from gan_flickr30k
    assert coco.train.epochs == 60 and coco.data.eval_captions == 1               # its own
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n[train]\nepochs = 3\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="'extends' loops back"):
        config_lib.load(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text("extends = 3\n")
    with pytest.raises(ConfigError, match="c.toml: 'extends' must name a config"):
        config_lib.load(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text('extends = "gna"\n')
    with pytest.raises(ConfigError, match="d.toml: config file not found: gna"):
        config_lib.load(tmp_path / "d.toml")
    (tmp_path / "e.toml").write_text('extends = "shapes"\n[model]\nwidth = 9\n')
    assert config_lib.load(tmp_path / "e.toml").model.width == 9 and config_lib.load(tmp_path / "e.toml").data.shapes_n == 6000
