"""A diagnostic, not a timing: where a checkpoint's power-spectrum excess over real photos lies,
and whether it is an upsampling replica.

``evaluate``'s grid check reports the largest excess (``spectrum_peak``, ``spectrum_peak_at``).
This lists the largest few and, for each, the chain of frequencies the generator's nearest 2x
upsamplings (8 -> 16 -> 32 -> 64 pixels) would have copied it from: a frequency a side-s map
cannot hold (|f| >= s/2 cycles per image) is the copy of f - s * sign(f) on that axis, and
nearest upsampling repeats the coarse spectrum there, damped only by its 2-pixel hold and
whatever the next 3x3 convolution filters (Durall et al. 2020, "Watch your Up-Convolution").
Printed per frequency: log10 power of the generated draws and of the real test photos along
the chain, so a replica shows as an excess that its source carries too.

With ``--rank spike`` the frequencies are ranked by their excess above their 8 neighbours'
(``spectrum_spike``: a grid's swing, which a broad excess of contrast does not have).
With ``--windowed`` both spectra are taken through a Hann window (``spectrum_windowed_*``).
With ``--angles`` it also prints the mean excess by ring and direction: an excess of texture in
one direction (or a shortfall of the photos' horizontal and vertical structure) shows there.
With ``--modes`` it also prints, by ring, the excess over the train photos of draws for train
captions made as in training (batch norm on each batch of 32's statistics) and as ``sample``
makes them after training (its running statistics): what ``loss.spectrum_measure`` is about.
With ``--integral`` it also prints the spectral term's integral (``loss.spectrum_integral``) as
saved in the checkpoint, in decades of the gap whose proportional pull it equals.

    python benchmarks/probe_spectrum.py --checkpoint runs/table2/gan --data data/f8k [--captions 1000] [--top 6] [--rank spike] [--windowed] [--angles] [--modes] [--integral]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from t2i.data.dataset import load_manifest, read_split_arrays, to_float
from t2i.evaluation.distribution import isolated_excess, log_power_spectrum
from t2i.training import checkpoint as ckpt_lib
from t2i.training.spectrum import SpectrumTracker

COARSE_SIDES = (32, 16, 8)  # the maps the generator's blocks upsample, last first
RINGS = ((1, 4), (4, 10), (10, 20), (20, 32))  # radii in cycles per image, [low, high)
SECTORS = 8  # directions over half a turn (the spectra are point-symmetric)


def upsampling_chain(fy: int, fx: int) -> list[tuple[int, int]]:
    """[(fy, fx), its source in the 32-pixel map, that one's in the 16-pixel map, ...] as far
    as a nearest 2x upsampling could have copied it (a frequency the coarser map holds stops)."""
    chain = [(fy, fx)]
    for side in COARSE_SIDES:
        source = tuple(f - side * (1 if f > 0 else -1) if abs(f) >= side // 2 else f for f in chain[-1])
        if source == chain[-1]:
            break
        chain.append(source)
    return chain


def largest_frequencies(values: torch.Tensor, side: int, top: int) -> list[tuple[int, int]]:
    """The ``top`` frequencies (fy, fx) of the largest ``values`` (flattened, zero frequency at the
    centre), one of each +-f pair: real images' spectra are point-symmetric."""
    centre, listed = side // 2, []
    for index in values.argsort(descending=True).tolist():
        fy, fx = index // side - centre, index % side - centre
        if (-fy, -fx) not in listed:
            listed.append((fy, fx))
        if len(listed) == top:
            break
    return listed


def centred_frequencies(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fy, fx), each (side, side), in cycles per image with the zero frequency at the centre
    (where fftshift puts it in ``log_power_spectrum``)."""
    fy, fx = torch.meshgrid(*(torch.arange(side) - side // 2,) * 2, indexing="ij")
    return fy.float(), fx.float()


def excess_by_direction(excess: torch.Tensor) -> list[tuple[tuple[int, int], list[float]]]:
    """[((low, high), mean excess in each of SECTORS directions)] for each of RINGS. Direction
    0 starts at the fx axis (power there is the images' vertical edges) and turns towards +fy."""
    fy, fx = centred_frequencies(excess.shape[0])
    radius, angle = torch.hypot(fy, fx), torch.atan2(fy, fx) % math.pi
    sector = (angle / (math.pi / SECTORS)).long().clamp(max=SECTORS - 1)
    return [((low, high), [float(excess[(radius >= low) & (radius < high) & (sector == k)].mean())
                           for k in range(SECTORS)]) for low, high in RINGS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run folder (its best checkpoint) or a model.pt")
    parser.add_argument("--data", default=str(REPO / "data" / "f8k"), help="a prepared data set")
    parser.add_argument("--captions", type=int, default=1000, help="test captions, one random draw each")
    parser.add_argument("--top", type=int, default=6, help="how many of the largest excesses to list")
    parser.add_argument("--rank", choices=("peak", "spike"), default="peak",
                        help="rank by the excess (peak) or by the excess above the neighbours' (spike)")
    parser.add_argument("--windowed", action="store_true", help="Hann-window the images first (no edge jumps)")
    parser.add_argument("--angles", action="store_true", help="also print the mean excess by ring and direction")
    parser.add_argument("--modes", action="store_true", help="also compare draws made as in training and after it")
    parser.add_argument("--integral", action="store_true", help="also print the spectral term's saved integral")
    args = parser.parse_args()
    loaded = ckpt_lib.load(ckpt_lib.model_file(args.checkpoint))
    model = loaded.model.eval()
    test = read_split_arrays(args.data, load_manifest(args.data), "test")
    ids = torch.tensor(test["word_ids"][: args.captions]).long()
    torch.manual_seed(0)
    with torch.no_grad():
        drawn = torch.cat([model.sample(ids[i: i + 250])[:, 0] for i in range(0, len(ids), 250)])
    fake, real = log_power_spectrum(drawn, args.windowed), log_power_spectrum(to_float(test["images"]), args.windowed)
    side, centre = fake.shape[1], fake.shape[1] // 2
    excess = fake - real
    ranked = (isolated_excess(excess) if args.rank == "spike" else excess).flatten()
    listed = largest_frequencies(ranked, side, args.top)

    def power(spectrum: torch.Tensor, f: tuple[int, int]) -> float:
        return float(spectrum[f[0] + centre, f[1] + centre])

    print(f"{len(ids)} draws against {len(test['images'])} real test images; log10 power per frequency "
          f"(cycles per {side} px)")
    for f in listed:
        chain = upsampling_chain(*f)
        spike = f" (above its neighbours' {float(ranked[(f[0] + centre) * side + f[1] + centre]):+.2f})" if args.rank == "spike" else ""
        print(f"{f!s:>10s}: excess {power(fake, f) - power(real, f):+.2f}{spike}" + "".join(
            f"{' <- ' if i else ' | '}{g}: generated {power(fake, g):.2f}, real {power(real, g):.2f}"
            for i, g in enumerate(chain)))
    if args.angles:
        print("mean excess by radius (cycles per image) and direction (degrees from the fx axis):")
        print(" " * 8 + "".join(f"{f'{k * 180 / SECTORS:.0f}-{(k + 1) * 180 / SECTORS:.0f}':>8s}" for k in range(SECTORS)))
        for (low, high), means in excess_by_direction(excess):
            print(f"{low:>3d}-{high:<4d}" + "".join(f"{m:+8.2f}" for m in means))
    if args.modes:
        print_mode_gap(model, args.data, args.captions, args.windowed)
    if args.integral:
        print_integral(loaded, args.top)


def print_integral(loaded: ckpt_lib.LoadedCheckpoint, top: int) -> None:
    """The integral per frequency over 2 x its weight: the gap (decades) whose proportional pull it
    adds. Its size by quantile, the largest, and the share of it that stands out from its 8
    neighbours (the isolated part, as the grid check's spike reads an excess). Each view the run
    trained (plain, Hann-windowed) has its own."""
    spectra = loaded.state["training"].get("spectra", {})
    views = [view for view in ("", "windowed_") if f"{view}integral" in spectra]
    if not views:
        print("no integral saved: the run trained with loss.spectrum_integral = 0")
    for view in views:
        real = spectra[f"{view}real"]
        side, centre = real.shape[0], real.shape[0] // 2
        tracker = SpectrumTracker(side, weighting=loaded.config.loss.spectrum_weighting)  # the run's weights, as it pulled
        pull = spectra[f"{view}integral"] / (2 * tracker.base_weights(real))
        size = pull.abs().flatten()
        print(f"{view.replace('_', ' ')}integral as decades of gap: "
              + ", ".join(f"{q:.0%} {float(size.quantile(q)):.3f}" for q in (0.5, 0.9, 0.99))
              + f", max {float(size.max()):.3f}; isolated share {float(isolated_excess(pull).clamp(min=0).mean() / size.mean()):.2f}")
        print("largest: " + ", ".join(f"{f}: {float(pull[f[0] + centre, f[1] + centre]):+.2f}"
                                      for f in largest_frequencies(size, side, top)))


def print_mode_gap(model: torch.nn.Module, data: str, captions: int, windowed: bool) -> None:
    """Mean excess over the train photos by ring, of random train captions' draws in batches of 32
    with batch norm as in training (the batch's statistics) and as after it (running statistics)."""
    train = read_split_arrays(data, load_manifest(data), "train")
    real = log_power_spectrum(to_float(train["images"]), windowed)
    order = torch.randperm(len(train["word_ids"]), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor(train["word_ids"])[order[:captions]].long()  # the split's first rows are a few hundred images' captions
    radius = torch.hypot(*centred_frequencies(real.shape[0]))
    rings = (*RINGS, (32, 46))  # and the corners beyond the Nyquist circle
    print(f"mean excess over the {len(train['images'])} train photos by radius, {len(ids)} random train captions:")
    print(" " * 20 + "".join(f"{f'{low}-{high}':>8s}" for low, high in rings))
    for mode in ("eval", "train"):
        model = copy.deepcopy(model) if mode == "train" else model  # a training-mode pass moves the running stats
        getattr(model, mode)()
        torch.manual_seed(0)
        with torch.no_grad():
            drawn = torch.cat([model.sample(ids[i: i + 32])[:, 0] for i in range(0, len(ids), 32)])
        excess = log_power_spectrum(drawn, windowed) - real
        label = "as in training" if mode == "train" else "as sampled after"
        print(f"{label:>20s}" + "".join(f"{float(excess[(radius >= low) & (radius < high)].mean()):+8.3f}"
                                         for low, high in rings))


if __name__ == "__main__":
    main()
