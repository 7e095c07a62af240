"""Training on tiny shapes: loss falls, checkpoints reload, resume and fault tolerance."""

import contextlib
import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from t2i import config as config_lib
from t2i.config import ConfigError
from t2i.data.dataset import DatasetError, load_manifest
from t2i.data.text import Vocabulary
from t2i.generation.generate import sample_prompts
from t2i.training import checkpoint as ckpt_lib

TINY = ["model.width=8", "model.hidden=64", "model.latent_dim=8", "data.batch_size=32",
        "data.samples_per_prompt=2", "train.keep_best=10", "optim.lr=0.003", "optim.name=adam"]


def tiny_cfg(shapes_dir, tmp_path, *extra):
    return config_lib.load(None, TINY + [f"data.path={shapes_dir}", f"train.storage_path={tmp_path}",
                                         "train.name=run", *extra])


def dev_captions(shapes_dir):
    return load_manifest(shapes_dir)["splits"]["dev"]["captions"]


def assert_resumed_exactly(run_dir, epoch):
    """The latest attempt in workers.json restored exactly the state saved at ``epoch``:
    weights of every network, optimizer and scheduler states (digests compared)."""
    attempt = json.loads((run_dir / "workers.json").read_text())[-1]
    saved = next(ckpt_lib.read_state(p) for p in run_dir.glob("checkpoint_*/model.pt")
                 if ckpt_lib.read_state(p)["epoch"] == epoch)
    assert attempt["resumed"]["epoch"] == epoch
    assert attempt["resumed"]["restored_digest"] == ckpt_lib.state_digest(
        {"model": saved["model"], "training": saved["training"]})


def train_losses(run_dir) -> dict[int, float]:
    return {ckpt_lib.read_state(p)["epoch"]: ckpt_lib.read_state(p)["metrics"]["train_loss"]
            for p in run_dir.glob("checkpoint_*/model.pt")}


def epochs_on_disk(run_dir):
    return sorted(ckpt_lib.read_state(p)["epoch"] for p in run_dir.glob("checkpoint_*/model.pt"))


def test_config_typo_fails_fast_with_valid_keys():
    with pytest.raises(ConfigError, match="Valid keys in \\[model\\]:.*width"):
        config_lib.load(None, ["model.widht=3"])
    with pytest.raises(ConfigError, match="unknown config key 'modle.width'"):
        config_lib.load(None, ["modle.width=3"])
    with pytest.raises(ConfigError, match="must be one of"):
        config_lib.load(None, ["model.family=vqgan"])
    with pytest.raises(ConfigError, match="cannot use 'abc' as int"):
        config_lib.load(None, ["train.epochs=abc"])


def test_config_files_load_and_round_trip(tmp_path):
    from conftest import REPO

    for path in sorted((REPO / "t2i" / "configs").glob("*.toml")):
        cfg = config_lib.load(path)
        saved = tmp_path / path.name
        saved.write_text(config_lib.dumps(cfg))
        assert config_lib.load(saved) == cfg, path.name
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nwidht = 3\n")
    with pytest.raises(ConfigError, match="bad.toml.*widht"):
        config_lib.load(bad)


def test_train_rejects_typo_before_ray(capsys):
    from t2i.cli import main

    assert main(["train", "--set", "optim.lrr=0.1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_local_mode_loss_falls(shapes_dir, tmp_path, ray_session):
    from t2i.training.driver import fit

    # data.cache_mb=0: every epoch streams from Ray Data (the other tests cache their shards).
    summary = fit(tiny_cfg(shapes_dir, tmp_path, "train.num_workers=0", "train.epochs=3", "data.cache_mb=0"))
    assert summary["error"] is None and summary["epochs_done"] == 3 and summary["data_mode"] == "stream"
    assert summary["metrics"]["dev_pairs"] == dev_captions(shapes_dir)  # every dev pair scored once
    first = ckpt_lib.read_state(min(tmp_path.glob("run/checkpoint_*/model.pt"), key=lambda p: ckpt_lib.read_state(p)["epoch"]))
    assert summary["metrics"]["train_loss"] < first["metrics"]["train_loss"]
    assert summary["metrics"]["dev_mse"] < 0.2
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == [
        "epoch_000.png", "epoch_001.png", "epoch_002.png", "loss_curve.png"]
    # Metrics where common tools read them: one row per epoch, same numbers as the checkpoints.
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert float(rows[-1]["dev_loss"]) == pytest.approx(summary["metrics"]["dev_loss"])
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    assert Image.open(summary["loss_curve"]).size[0] >= 400


@pytest.fixture(scope="module")
def two_worker_run(shapes_dir, tmp_path_factory, ray_session):
    from t2i.training.driver import fit

    tmp = tmp_path_factory.mktemp("runs2")
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        summary = fit(tiny_cfg(shapes_dir, tmp, "train.num_workers=2", "train.epochs=3"))
    return summary, tmp, console.getvalue()


def test_two_workers_loss_falls_and_dev_is_exact(two_worker_run, shapes_dir):
    summary, tmp, _ = two_worker_run
    assert summary["error"] is None and summary["data_mode"] == "cache"
    states = sorted((ckpt_lib.read_state(p) for p in tmp.glob("run/checkpoint_*/model.pt")), key=lambda s: s["epoch"])
    assert [s["epoch"] for s in states] == [0, 1, 2]
    # Two workers split the dev set unevenly, yet together score each pair exactly once.
    assert all(s["metrics"]["dev_pairs"] == dev_captions(shapes_dir) for s in states)
    assert states[-1]["metrics"]["train_loss"] < states[0]["metrics"]["train_loss"]
    assert states[-1]["metrics"]["dev_loss"] < states[0]["metrics"]["dev_loss"]
    json.dumps(summary)  # the job's last line must be valid JSON


def test_driver_prints_one_line_per_epoch(two_worker_run):
    """The epoch lines come from the Train controller through the relay to the driver."""
    summary, _, console = two_worker_run
    lines = console.strip().splitlines()
    assert lines[0].startswith("t2i: seed (") and "data: cache" in lines[0]
    assert "2 workers x 0.45 CPU (small-machine profile: the cluster has 2 CPUs) on CPU" in lines[0]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(" | ")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("dev MSE from caption" in line and "img/s" in line and "ETA" in line for line in epochs)
    assert epochs[-1].endswith("ETA 0s")
    assert lines[-1].startswith("t2i: 3 epoch(s) done in ") and summary["best_checkpoint"] in lines[-1]


def test_checkpoint_reloads_and_generates_same_images(two_worker_run):
    summary, _, _ = two_worker_run
    loaded = ckpt_lib.load(summary["best_checkpoint"])
    prompts = ["a small red circle in the top left corner", "a big blue square"]
    a = sample_prompts(loaded.model, loaded.vocab, prompts, 3, 32, seed=7)
    b = sample_prompts(ckpt_lib.load(summary["best_checkpoint"]).model, loaded.vocab, prompts, 3, 32, seed=7)
    c = sample_prompts(loaded.model, loaded.vocab, prompts, 3, 32, seed=8)
    assert a.shape == (2, 3, 3, 64, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_worker_failure_is_retried_from_last_checkpoint(shapes_dir, tmp_path, ray_session, capsys):
    from t2i.training.driver import fit

    summary = fit(tiny_cfg(shapes_dir, tmp_path, "train.epochs=2", "train.max_failures=1"), fail_once_at_epoch=1)
    assert summary["error"] is None
    # The driver's console says what happened (relayed from the Train controller).
    assert "t2i: worker failure (rank 0: fault drill: injected worker failure at epoch 1)" in capsys.readouterr().out
    assert (tmp_path / "run" / ".fault_drill_done").exists()
    assert epochs_on_disk(tmp_path / "run") == [0, 1]  # each epoch checkpointed once
    # The restarted workers restored exactly epoch 0's weights, optimizer and schedule. (A
    # run that died and is re-run resumes the same way: the gan test below.)
    assert_resumed_exactly(tmp_path / "run", 0)
    # ...and then trained as if nothing had happened: the same batches and noise, so the same
    # losses as an uninterrupted run of the seed, epoch by epoch (and two runs of one seed agree).
    again = fit(tiny_cfg(shapes_dir, tmp_path, "train.epochs=2", "train.name=uninterrupted"))
    assert [train_losses(tmp_path / "run")[e] for e in range(2)] == \
        [train_losses(tmp_path / "uninterrupted")[e] for e in range(2)], again


def test_resume_refuses_other_model_config_and_corrupt_checkpoint(shapes_dir, tmp_path):
    from t2i.training.driver import check_resume

    cfg = tiny_cfg(shapes_dir, tmp_path)
    run_dir = tmp_path / "run" / "checkpoint_a"
    run_dir.mkdir(parents=True)
    from t2i.data.dataset import load_vocabulary
    from t2i.models import build_model

    vocab = load_vocabulary(shapes_dir)
    ckpt_lib.save(run_dir, model=build_model(cfg.model, vocab.vectors), cfg=cfg, vocab=vocab, epoch=0, metrics={})
    assert check_resume(tmp_path / "run", cfg, vocab, shapes_dir)["epoch"] == 0
    other = tiny_cfg(shapes_dir, tmp_path, "model.width=16")
    with pytest.raises(ckpt_lib.CheckpointError, match="width: checkpoint 8 vs config 16"):
        check_resume(tmp_path / "run", other)
    # Another optimizer cannot take this one's state (RMSprop's into Adam: KeyError 'betas').
    with pytest.raises(ckpt_lib.CheckpointError, match="optim.name: checkpoint 'adam' vs config 'rmsprop'"):
        check_resume(tmp_path / "run", tiny_cfg(shapes_dir, tmp_path, "optim.name=rmsprop"))
    with pytest.raises(ckpt_lib.CheckpointError, match="optim.schedule: checkpoint 'constant' vs config 'cosine'"):
        check_resume(tmp_path / "run", tiny_cfg(shapes_dir, tmp_path, "optim.schedule=cosine"))
    # Other data: word ids would point at other words' vectors.
    state = ckpt_lib.read_state(run_dir / "model.pt")
    fewer = Vocabulary(vocab.words[:-1], vocab.vectors[:-1])
    with pytest.raises(ckpt_lib.CheckpointError, match="another vocabulary"):
        ckpt_lib.check_same_vocabulary(state, fewer, "other-data", "ckpt")
    with pytest.raises(ckpt_lib.CheckpointError, match="other word vectors"):
        ckpt_lib.check_same_vocabulary(state, Vocabulary(vocab.words, vocab.vectors * 2), "other-data", "ckpt")
    data = (run_dir / "model.pt").read_bytes()
    (run_dir / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt_lib.CheckpointError, match="corrupt or truncated"):
        check_resume(tmp_path / "run", cfg)
    assert (run_dir / "model.pt").stat().st_size == len(data) // 2  # nothing deleted or rewritten
    (run_dir / "other.pt").write_bytes(b"")
    torch.save({"hello": 1}, run_dir / "foreign.pt")
    with pytest.raises(ckpt_lib.CheckpointError, match="not a t2i checkpoint"):
        ckpt_lib.read_state(run_dir / "foreign.pt")


def test_bad_data_folders_are_named(shapes_dir, tmp_path):
    with pytest.raises(DatasetError, match="data folder not found"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="it is empty"):
        load_manifest(tmp_path / "empty")
    copy = tmp_path / "copy"
    shutil.copytree(shapes_dir, copy)
    shard = next((copy / "train").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="truncated"):
        load_manifest(copy)
    shard.unlink()
    with pytest.raises(DatasetError, match="manifest/shard mismatch.*missing"):
        load_manifest(copy)


GAN_TINY = ["model.width=8", "model.hidden=32", "model.latent_dim=8", "data.batch_size=32",
            "data.samples_per_prompt=2", "train.keep_best=10"]


def test_gan_killed_run_resumes_at_next_epoch_with_both_networks(shapes_dir, tmp_path, ray_session):
    """The gan family in the same Ray Train loop: a crash after epoch 0, a re-run resumes at
    epoch 1 from a checkpoint holding both networks and both optimizers."""
    from conftest import REPO

    from t2i.training.driver import check_resume, fit

    cfg = config_lib.load(REPO / "t2i" / "configs" / "gan.toml", GAN_TINY + [
        f"data.path={shapes_dir}", f"train.storage_path={tmp_path}", "train.name=gan", "train.epochs=3",
        "train.max_failures=0"])
    first = fit(cfg, fail_once_at_epoch=1)
    assert first["error"] is not None and "fault drill" in first["error"]
    assert epochs_on_disk(tmp_path / "gan") == [0]
    state = ckpt_lib.read_state(next((tmp_path / "gan").glob("checkpoint_*/model.pt")))
    assert set(state["training"]["optimizers"]) == {"model", "discriminator"}
    assert "discriminator" in state["training"]["networks"]
    second = fit(cfg)
    assert second["error"] is None and epochs_on_disk(tmp_path / "gan") == [0, 1, 2]
    assert_resumed_exactly(tmp_path / "gan", 0)  # both networks, both optimizers
    assert {"dev_gen_mse", "train_d_loss", "train_g_adv", "dev_d_mismatch", "dev_align"} <= set(second["metrics"])
    # gan.toml's alignment loss: its encoder trained once as a Ray task, cached beside the data.
    assert second["metrics"]["train_align"] > 0 and (shapes_dir / "alignment_loss_encoder.pt").is_file()
    # A gan checkpoint is never resumed with another family's config.
    other = tiny_cfg(shapes_dir, tmp_path, "train.name=gan", "model.family=cvae")
    with pytest.raises(ckpt_lib.CheckpointError, match="family: checkpoint 'gan' vs config 'cvae'"):
        check_resume(tmp_path / "gan", other)


def test_rank_zero_refuses_a_run_folder_other_hosts_cannot_see(tmp_path, monkeypatch):
    """Workers on two hosts and a node-local run folder: the host that does not see rank 0's
    workers.json is named (the driver's check saw only the head of an autoscaling cluster)."""
    from t2i.training.loop import check_run_dir_shared

    cfg = config_lib.Config()
    workers = [{"node_ip": "10.0.0.1"}, {"node_ip": "10.0.0.2"}]
    (tmp_path / "workers.json").write_text("[]")
    answers = [("10.0.0.1", True), ("10.0.0.2", False)]  # what each rank reported
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), answers))
    with pytest.raises(ConfigError, match=r"not shared: workers on 10\.0\.0\.2 cannot see"):
        check_run_dir_shared(str(tmp_path), cfg, workers, rank=0)
    answers[1] = ("10.0.0.2", True)  # an NFS folder both hosts see
    check_run_dir_shared(str(tmp_path), cfg, workers, rank=0)
    answers[1] = ("10.0.0.2", False)
    check_run_dir_shared("s3://bucket/runs/x", cfg, workers, rank=0)  # URIs are shared by nature
    check_run_dir_shared(str(tmp_path), cfg, workers[:1], rank=0)  # one host: its own disk is fine


def test_checkpoints_without_a_dev_split_rank_by_an_unweighted_train_number():
    from types import SimpleNamespace

    from t2i.training.families import Family

    def selection(metrics, family):
        return Family.selection(family, metrics)

    vae = SimpleNamespace(selection_metric="dev_gen_mse", FALLBACK_SELECTION="train_elbo")
    gan = SimpleNamespace(selection_metric="dev_align", FALLBACK_SELECTION=None)
    epoch = {"epoch": 2, "train_loss": 40.0, "train_elbo": 55.0}
    assert selection({**epoch, "dev_gen_mse": 0.01}, vae) == (0.01, "dev_gen_mse")
    assert selection({**epoch, "dev_gen_mse": 0.01, "dev_align": 2.5}, gan) == (2.5, "dev_align")
    # Not train_loss: during KL warm-up it is smaller for the earlier (less trained) epochs.
    assert selection(epoch, vae) == (55.0, "train_elbo")
    assert selection(epoch, gan) == (-2.0, "latest epoch")  # a gan: the latest ranks first


def test_relative_paths_are_refused_under_ray_job_submit():
    """Under `ray job submit --working-dir .` the driver runs in Ray's temporary copy of the
    code: a relative run folder would be deleted with it."""
    from t2i.training.driver import check_paths_under_job

    submitted = "gcs://_ray_pkg_abc.zip"  # the driver's runtime_env["working_dir"] under `ray job submit`
    cfg = config_lib.Config()  # train.storage_path = "runs", data.cache_dir = "data/cache"
    assert check_paths_under_job(cfg, None) == []  # plain `python train_job.py`, or a job without a working dir
    with pytest.raises(ConfigError, match=r"train.storage_path='runs': relative paths resolve inside Ray's temporary"):
        check_paths_under_job(cfg, submitted)
    cfg.train.storage_path = "/shared/runs"
    cfg.data.path = "data/f8k"
    with pytest.raises(ConfigError, match=r"data.path='data/f8k'"):
        check_paths_under_job(cfg, submitted)
    cfg.data.path = ""
    warnings = check_paths_under_job(cfg, submitted)  # the shapes set is re-prepared: a warning only
    assert len(warnings) == 1 and "data.cache_dir='data/cache' is relative" in warnings[0]
    cfg.data.cache_dir, cfg.train.storage_path = "/shared/cache", "s3://bucket/runs"
    assert check_paths_under_job(cfg, submitted) == []


def test_auto_gpu_counts_what_an_autoscaling_cluster_could_start():
    from t2i.runtime.ray_env import decide_gpu

    assert decide_gpu(visible=0, could_scale_to=None, needed=2) is False  # a CPU machine, no autoscaler
    assert decide_gpu(visible=2, could_scale_to=None, needed=2) is True
    # cluster/aws.yaml: head only at submit, up to 4 g5 workers with 1 GPU each.
    assert decide_gpu(visible=0, could_scale_to=4, needed=2) is True
    assert decide_gpu(visible=0, could_scale_to=4, needed=8) is False
    assert decide_gpu(visible=1, could_scale_to=0, needed=0) is True  # local mode still uses the GPU
    assert decide_gpu(visible=0.5, could_scale_to=None, needed=0.5) is True  # a worker's share (gpus_per_worker)
    assert decide_gpu(visible=0.25, could_scale_to=None, needed=0.5) is False


def test_torch_threads_follow_the_cpus_ray_assigned():
    from t2i.runtime.ray_env import usable_cpus, worker_threads

    assert worker_threads(4.0, usable=16, local_workers=2) == 4  # not 16 // 2: Ray Data keeps its CPUs
    assert worker_threads(8.0, usable=4, local_workers=1) == 4  # never more than the cgroup allows
    assert worker_threads(0.45, usable=2, local_workers=1) == 2  # this machine's default setting
    assert worker_threads(0.45, usable=2, local_workers=2) == 1
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)


def test_ray_data_is_capped_only_on_small_clusters():
    from t2i.runtime.ray_env import data_cpu_budget

    assert data_cpu_budget(1.0, 2) == 1.0 and data_cpu_budget(1.0, 4) == 1.0  # this machine: the cap that avoids the hang
    assert data_cpu_budget(1.0, 64) == 0.0                                   # a real cluster: Ray Data decides
    assert data_cpu_budget(0.0, 2) == 0.0                                    # switched off


def test_a_local_ray_on_a_small_machine_keeps_no_idle_processes():
    from t2i.runtime.ray_env import SMALL_CLUSTER_CPUS, local_ray_env

    small, big = local_ray_env(2), local_ray_env(SMALL_CLUSTER_CPUS + 1)
    for env in (small, big):  # one machine: nothing to preempt, one footer reader
        assert env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
        assert env["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == "1"
    assert small["RAY_num_workers_soft_limit"] == "0" and small["RAY_prestart_worker_first_driver"] == "0"
    assert "RAY_num_workers_soft_limit" not in big  # enough cores: Ray's worker pool as it is


def test_one_gpu_script_trains_outside_ray_and_writes_a_loadable_checkpoint(shapes_dir, tmp_path):
    """benchmarks/train_gpu.py (for GPU machines without Ray), on the CPU: the worker's step,
    a time budget turned into an epoch count, and t2i's checkpoint format."""
    import subprocess
    import sys

    out = tmp_path / "run"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "train_gpu.py"
    done = subprocess.run([sys.executable, str(script), "--config", "seed_model1", "--data", str(shapes_dir),
                           "--minutes", "0.05", "--out", str(out), "--device", "cpu", "--set", "model.width=8",
                           "--set", "model.hidden=16", "--set", "model.latent_dim=8", "--set", "data.batch_size=64"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(epochs) == summary["epochs"] >= 2 and summary["config_epochs"] == 10
    assert [e["epoch"] for e in epochs] == list(range(len(epochs))) and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    loaded = ckpt_lib.load(out)
    assert loaded.state["epoch"] == len(epochs) - 1 and loaded.config.train.epochs == len(epochs)
    assert loaded.config.model.width == 8
