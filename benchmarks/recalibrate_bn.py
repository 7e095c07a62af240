"""An experiment, not a timing: a checkpoint's batch-norm statistics recomputed with its final
weights ("precise BN", Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"), written as a new
checkpoint for ``t2i evaluate`` / ``generate`` to read like any other.

Training keeps each batch-norm layer's running mean and variance as an exponential moving
average (PyTorch's momentum 0.1: about the last ten steps, taken while the weights still moved);
``sample`` normalises with them, so a generator trained against batch statistics can draw
differently after training than during it (``probe_spectrum.py --modes``). Here every layer's
statistics are reset and re-estimated as a plain mean over ``--captions`` random train captions
drawn in training mode, in batches of the run's ``data.batch_size`` (the batches the generator
was trained on), the weights untouched; nothing else in the checkpoint changes.

    python benchmarks/recalibrate_bn.py --checkpoint runs/exp/RUN --data data/f8k --out runs/exp/RUN-precise-bn [--captions 8192]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from torch import nn

from t2i.data.dataset import load_manifest, read_split_arrays
from t2i.training import checkpoint as ckpt_lib


def recalibrate(model: nn.Module, word_ids: torch.Tensor, batch_size: int, seed: int = 0) -> int:
    """Reset every batch-norm layer of ``model`` and re-estimate its running statistics as the
    mean over batches of ``word_ids`` drawn in training mode (each layer's momentum restored
    after); returns how many layers. The model is left in eval mode."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative mean over the passes below, not an EMA
    model.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        for start in range(0, len(word_ids) - batch_size + 1, batch_size):  # full batches only, as in training
            model(word_ids[start: start + batch_size])
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum  # as the layers were built
    model.eval()
    return len(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run folder (its best checkpoint) or a model.pt")
    parser.add_argument("--data", default=str(REPO / "data" / "f8k"), help="the prepared data set it trained on")
    parser.add_argument("--out", required=True, help="a new folder for the recalibrated checkpoint")
    parser.add_argument("--captions", type=int, default=8192, help="random train captions to estimate with")
    args = parser.parse_args()

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} already exists and is not empty; choose a new --out folder")
    source = ckpt_lib.model_file(args.checkpoint)
    loaded = ckpt_lib.load(source)
    train = read_split_arrays(args.data, load_manifest(args.data), "train")
    order = torch.randperm(len(train["word_ids"]), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor(train["word_ids"])[order[: args.captions]].long()
    layers = recalibrate(loaded.model, ids, loaded.config.data.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    path = ckpt_lib.save(out, model=loaded.model, cfg=loaded.config, vocab=loaded.vocab, epoch=loaded.state["epoch"],
                         metrics=loaded.state["metrics"], data=loaded.state["data"])
    print(f"{layers} batch-norm layers re-estimated over {len(ids)} train captions "
          f"(batches of {loaded.config.data.batch_size}) -> {path} (from {source})")


if __name__ == "__main__":
    main()
