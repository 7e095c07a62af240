"""Set-level distances: the judge's Fréchet / kernel distances and the power-spectrum grid check."""

import pytest
import torch
import torch.nn.functional as F

from t2i.data.dataset import load_manifest, load_vocabulary, read_split_arrays, to_float
from t2i.evaluation.distribution import (
    JudgeFeatures,
    isolated_excess,
    judge_distances,
    log_power_spectrum,
    spectrum_check,
)
from t2i.training.encoders import EncoderRecipe, train_dual_encoder


@pytest.fixture(scope="module")
def shapes_images(shapes_dir):
    data = read_split_arrays(shapes_dir, load_manifest(shapes_dir), "train")
    judge = train_dual_encoder(data["images"], data["word_ids"], data["caption_image"],
                               load_vocabulary(shapes_dir).vectors, None, recipe=EncoderRecipe(epochs=1, batch=32), width=8,
                               log=lambda _: None)
    return judge, to_float(data["images"])


def with_upsampling_grid(images: torch.Tensor, period: int = 2, amplitude: float = 0.01) -> torch.Tensor:
    """What an upsampling layer with uneven overlap leaves: a faint periodic pattern."""
    grid = torch.zeros(images.shape[-2:])
    grid[::period, ::period] = amplitude
    return (images + grid).clamp(0, 1)


def test_real_halves_are_close_and_noise_is_far(shapes_images):
    judge, images = shapes_images
    half = len(images) // 2
    noise = torch.rand_like(images[:half])
    out = judge_distances(judge, images[:half], {"real": images[half:], "noise": noise})
    assert out["real"]["fd"] < 0.2 * out["noise"]["fd"]
    assert out["real"]["kd"] < out["noise"]["kd"] and out["real"]["n"] == len(images) - half
    assert JudgeFeatures(judge)(images[:2]).shape == (2, judge.image[-1].in_features)


def test_the_spectrum_check_sees_an_upsampling_grid(shapes_images):
    _, images = shapes_images
    half = len(images) // 2
    real, other = images[:half], images[half:]
    blurred = F.interpolate(F.interpolate(other, scale_factor=0.5, mode="bilinear"), size=other.shape[-2:],
                            mode="bilinear")
    mean = other.mean(dim=(1, 2, 3), keepdim=True)
    contrasty = (other - mean) * 3 + mean  # 9x the power at every frequency, no grid
    out = spectrum_check(real, {"real": other, "grid2": with_upsampling_grid(other),
                                "grid4": with_upsampling_grid(other, period=4, amplitude=0.02), "blurred": blurred,
                                "contrasty": contrasty})
    assert out["real"]["peak"] < 0.7 and out["real"]["spike"] < 0.7
    assert out["grid2"]["peak"] > 1.2 and out["grid4"]["peak"] > 1.2  # 1% brightness, 16x the real power
    assert out["grid2"]["spike"] > 1.2 and out["grid4"]["spike"] > 1.2  # ... at isolated frequencies
    assert out["grid2"]["spike_at"] == out["grid2"]["peak_at"]
    # A broad excess reaches the peak but not the spike: only a grid's power swings between neighbours.
    assert out["contrasty"]["peak"] > out["real"]["peak"] + 0.9, out
    assert abs(out["contrasty"]["spike"] - out["real"]["spike"]) < 0.05, out
    # The zero frequency holds no power once each mean is removed: never a spike, however far
    # its neighbours fall below the real spectrum (a blurred set's do).
    dip = -torch.ones(8, 8)
    dip[4, 4] = 0.0
    assert isolated_excess(dip)[4, 4] == float("-inf") and int(isolated_excess(dip).argmax()) != 4 * 8 + 4
    # Where: a period of 2 pixels sits at 32 cycles per 64-pixel image, a period of 4 at 16 or 32.
    assert {abs(f) for f in out["grid2"]["peak_at"]} <= {0, 32} and any(out["grid2"]["peak_at"])
    assert {abs(f) for f in out["grid4"]["peak_at"]} <= {0, 16, 32} and any(out["grid4"]["peak_at"])
    assert out["blurred"]["distance"] > 5 * out["real"]["distance"]     # missing high frequencies
    spectrum = log_power_spectrum(real)
    assert spectrum.shape == real.shape[-2:] and torch.isfinite(spectrum).all()


def test_the_windowed_check_sees_the_grid_but_not_the_edge_jump(shapes_images):
    _, images = shapes_images
    half = len(images) // 2
    real, other = images[:half], images[half:]
    # A left-to-right brightness ramp is smooth inside the image, but the FFT's periodic copy
    # jumps from its right edge back to its left: power along the fx axis, which a window tapers.
    ramped = (other + torch.linspace(-0.15, 0.15, other.shape[-1])).clamp(0, 1)
    sets = {"real": other, "ramped": ramped, "grid2": with_upsampling_grid(other)}
    plain, windowed = spectrum_check(real, sets), spectrum_check(real, sets, windowed=True)
    assert plain["ramped"]["spike_at"][0] == 0 and plain["ramped"]["spike"] > plain["real"]["spike"] + 0.1, plain
    assert abs(windowed["ramped"]["spike"] - windowed["real"]["spike"]) < 0.05, windowed
    assert windowed["grid2"]["peak"] > 1.2 and windowed["grid2"]["spike"] > 0.6, windowed  # a grid shows through it
    assert windowed["grid2"]["peak_at"] == plain["grid2"]["peak_at"]
    assert not torch.equal(log_power_spectrum(real, windowed=True), log_power_spectrum(real))


def load_benchmark(name: str = "probe_spectrum"):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_probe_sorts_an_excess_by_direction():
    """benchmarks/probe_spectrum.py --angles: an excess on the fx axis (the images' vertical
    edges) lands in direction 0 only, and a texture along one oblique line in that line's sector
    (its mirror image stays at 0)."""
    probe = load_benchmark()
    offsets = torch.arange(64) - 32
    fy, fx = torch.meshgrid(offsets, offsets, indexing="ij")
    for excess_at, sector in (((fy == 0) & (fx != 0), 0), ((fy == -2 * fx) & (fy != 0), 5)):
        table = dict(probe.excess_by_direction(excess_at.float()))
        assert list(table) == list(probe.RINGS)
        for means in table.values():
            assert means[sector] > 0 and all(m == 0 for k, m in enumerate(means) if k != sector), (sector, means)


def test_the_probe_reads_a_saved_integral_as_decades_and_tells_a_checkerboard(capsys):
    """benchmarks/probe_spectrum.py --integral: the integral over 2 x its (power) weight; a smooth
    integral has almost no isolated share, a checkerboard of signs (a run-away integral) most of it;
    a run without one says so."""
    from types import SimpleNamespace

    from t2i import config as config_lib

    probe = load_benchmark()
    real = torch.ones(64, 64)  # power weights 2 everywhere
    offsets = torch.arange(64) - 32
    fy, fx = torch.meshgrid(offsets, offsets, indexing="ij")
    cfg = config_lib.load("gan")
    shares = {}
    for name, integral in (("smooth", 0.4 * torch.ones(64, 64)), ("checkerboard", 0.4 * (-1.0) ** (fy + fx))):
        saved = SimpleNamespace(config=cfg, state={"training": {"spectra": {"real": real, "integral": integral}}})
        probe.print_integral(saved, top=2)
        out = capsys.readouterr().out
        assert "50% 0.100" in out and "max 0.100" in out, out  # 0.4 / (2 x 2)
        shares[name] = float(out.split("isolated share ")[1].split()[0])
    assert shares["smooth"] < 0.05 and shares["checkerboard"] > 0.5, shares
    probe.print_integral(SimpleNamespace(config=cfg, state={"training": {"spectra": {"real": real}}}), top=2)
    assert "no integral saved" in capsys.readouterr().out
    windowed_only = {"windowed_real": real, "windowed_integral": 0.4 * torch.ones(64, 64)}  # loss.spectrum_window = "hann"
    probe.print_integral(SimpleNamespace(config=cfg, state={"training": {"spectra": windowed_only}}), top=2)
    assert capsys.readouterr().out.startswith("windowed integral as decades of gap: 50% 0.100")


def test_precise_bn_replaces_the_moving_average_by_the_final_weights_mean_batch_statistics():
    """benchmarks/recalibrate_bn.py: after training-mode passes whose statistics drifted, the
    running mean and variance are the plain mean of the recalibration batches' (not the last
    few batches' moving average); the weights stay, the momentum is back to 0.1, eval mode."""
    from torch import nn

    recalibrate = load_benchmark("recalibrate_bn").recalibrate
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():  # an EMA over drifting inputs, as training leaves it
        for shift in range(20):
            model(torch.randn(8, 3) + shift)
    weights = model[0].weight.clone()
    inputs = torch.randn(64, 3) * 2 + 1
    with torch.no_grad():
        features = [model[0](inputs[i: i + 8]) for i in range(0, 64, 8)]
    assert not torch.allclose(model[1].running_mean, torch.stack([f.mean(0) for f in features]).mean(0), atol=0.5)
    assert recalibrate(model, inputs, batch_size=8) == 1
    norm = model[1]
    assert torch.allclose(norm.running_mean, torch.stack([f.mean(0) for f in features]).mean(0), atol=1e-5)
    assert torch.allclose(norm.running_var, torch.stack([f.var(0) for f in features]).mean(0), atol=1e-5)
    assert norm.momentum == 0.1 and not model.training and torch.equal(model[0].weight, weights)
