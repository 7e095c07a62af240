"""The console a person reads: epoch lines, quiet Ray unless verbose, smoke runs apart."""

import ray.data

from t2i import config as config_lib
from t2i import console
from t2i.runtime.ray_env import quiet_ray_data
from t2i.training.driver import run_name

METRICS = {"epoch": 2, "train_loss": 73.9, "dev_loss": 80.12, "dev_mse": 0.0054, "dev_gen_mse": 0.00841,
           "samples_per_s": 112.4, "epoch_s": 52.2, "lr": 0.002}


def test_epoch_line_says_progress_losses_speed_and_time_left():
    assert console.epoch_line(METRICS, 8) == ("epoch 3/8 | train loss 73.9 | dev loss 80.12 | dev MSE 0.0054 | "
                                              "dev MSE from caption 0.0084 | 112 img/s | 52s | ETA 4m21s")
    last = console.epoch_line({**METRICS, "epoch": 7}, 8)
    assert last.startswith("epoch 8/8 |") and last.endswith("ETA 0s")
    # A family without some terms (the gan reports no reconstruction) shows what it has.
    gan = console.epoch_line({"epoch": 0, "train_loss": 1.5, "dev_gen_mse": 0.1, "epoch_s": 3725}, 2)
    assert gan == "epoch 1/2 | train loss 1.5 | dev MSE from caption 0.1000 | 1h02m | ETA 1h02m"


def test_failure_line_names_the_ranks_and_what_happens_next():
    line = console.failure_line({1: "The actor died because its node has died.", 0: "fault drill"})
    assert line == ("t2i: worker failure (rank 0: fault drill; rank 1: The actor died because its node has died.); "
                    "Ray Train restarts the workers from the latest checkpoint while train.max_failures allows")


def test_duration():
    assert [console.duration(s) for s in (0, 59.4, 61, 3599, 3600, 7322)] == ["0s", "59s", "1m01s", "59m59s",
                                                                            "1h00m", "2h02m"]


def test_summary_line_names_the_best_checkpoint_or_the_error():
    done = {"epochs_done": 8, "best_checkpoint": "runs/x/checkpoint_1/model.pt", "samples": "runs/x/samples",
            "error": None}
    assert console.summary_line(done, 292) == ("t2i: 8 epoch(s) done in 4m52s; best checkpoint "
                                               "runs/x/checkpoint_1/model.pt; sample grids in runs/x/samples")
    failed = {**done, "epochs_done": 3, "error": "worker died"}
    assert console.summary_line(failed, 30) == "t2i: run stopped after 3 epoch(s) (30s): worker died"


def test_ray_data_is_quiet_unless_verbose(monkeypatch):
    context = ray.data.DataContext.get_current()
    saved = (context.enable_progress_bars, context.print_on_execution_start)
    try:
        context.enable_progress_bars = context.print_on_execution_start = True
        monkeypatch.setenv(console.VERBOSE_ENV, "1")
        quiet_ray_data()
        assert context.enable_progress_bars and context.print_on_execution_start
        monkeypatch.delenv(console.VERBOSE_ENV)
        quiet_ray_data()
        assert not context.enable_progress_bars and not context.print_on_execution_start
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved


def test_verbose_flag_reaches_the_environment(monkeypatch):
    monkeypatch.setenv(console.VERBOSE_ENV, "")  # recorded first: the variable is unset again afterwards
    assert not console.verbose()
    console.set_verbose(True)
    assert console.verbose()
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert not console.verbose()


def test_smoke_tests_never_share_a_users_run_folder():
    from t2i.cli import TRAIN, TUNE
    from t2i.runtime.tune import load_search

    manifest = {"dataset": "shapes"}
    default = config_lib.load(TRAIN.default_config)
    args, overrides = TRAIN.parse(["--smoke-test"])
    smoke = config_lib.load(args.config, overrides)
    assert run_name(smoke, manifest) == "smoke-test" != run_name(default, manifest)
    search, _ = load_search(TUNE.default_config)
    args, overrides = TUNE.parse(["--smoke-test"])
    smoke_search, _ = load_search(args.config, overrides)
    assert smoke_search.name == "smoke-sweep" != search.name
