"""A diagnostic, not a timing: what the gan's alignment loss teaches when nothing else pulls.

Pixels of mid-grey images (no generator, no discriminator) are optimised with Adam against the
frozen alignment-loss encoder alone, one image per test caption, and the result is scored by
that encoder and by the evaluation judge (another network, never trained against). Run once
on the images as drawn and once on a fresh random view per step (``loss.align_augment``'s
DiffAugment ops). An image that fits the loss encoder but not the judge carries that one
encoder's blind spots (an adversarial texture), not its caption; that is what a generator
trained with a large ``loss.align_weight`` learns too. Printed per policy: each encoder's
InfoNCE of the images against their own captions among the batch (chance = ln(batch)) and its
top-1 accuracy, and the fitted images' spectrum peak against the real test photos (evaluate's
grid check: a periodic texture shows as a large excess at its frequency); ``--out`` saves the
images to look at.

    python benchmarks/probe_alignment.py --data data/f8k [--steps 150] [--captions 32] [--out probe.png]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from torchvision.utils import save_image

from t2i.data.dataset import load_manifest, load_vocabulary, read_split_arrays, to_float
from t2i.evaluation.distribution import spectrum_check
from t2i.models.dual_encoder import contrastive_loss
from t2i.training import encoders
from t2i.training.augment import diff_augment, parse_policy
from t2i.training.losses import alignment_loss

POLICIES = ("", "translation,cutout", "scale,translation,cutout")


def fit_pixels(encoder, word_ids: torch.Tensor, policy: tuple[str, ...], steps: int) -> torch.Tensor:
    """Images in [0, 1] (a sigmoid over free pixels, from mid-grey) fitted to ``encoder``."""
    torch.manual_seed(0)
    raw = torch.zeros(len(word_ids), 3, 64, 64, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=0.05)
    for _ in range(steps):
        loss = alignment_loss(encoder, diff_augment(torch.sigmoid(raw), policy), word_ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.sigmoid(raw).detach()


@torch.no_grad()
def scores(encoder, images: torch.Tensor, word_ids: torch.Tensor) -> tuple[float, float]:
    """(InfoNCE, top-1 accuracy) of each image picking out its own caption among the batch's."""
    img, txt = encoder.embed_images(images), encoder.embed_text(word_ids)  # once, for both numbers
    top1 = ((img @ txt.t()).argmax(1) == torch.arange(len(images))).float().mean().item()
    return contrastive_loss(img, txt, encoder.log_scale).item(), top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data" / "f8k"), help="a prepared Flickr8k")
    parser.add_argument("--steps", type=int, default=150, help="Adam steps on the pixels")
    parser.add_argument("--captions", type=int, default=32, help="test captions (one image each), evenly spaced")
    parser.add_argument("--out", help="also save the fitted images (a row per policy) as a PNG")
    args = parser.parse_args()
    manifest, vocab = load_manifest(args.data), load_vocabulary(args.data)
    loss_encoder = encoders.load_or_train(encoders.ALIGNMENT_LOSS, args.data, manifest, vocab).eval()
    judge = encoders.load_or_train(encoders.JUDGE, args.data, manifest, vocab).eval()
    for net in (loss_encoder, judge):
        net.requires_grad_(False)
    test = read_split_arrays(args.data, manifest, "test")
    step = max(1, len(test["word_ids"]) // args.captions)
    word_ids = torch.tensor(test["word_ids"][::step][: args.captions]).long()
    real = to_float(test["images"])
    print(f"{len(word_ids)} test captions, {args.steps} steps; chance InfoNCE {math.log(len(word_ids)):.2f}, "
          f"chance top-1 {1 / len(word_ids):.3f}")
    rows = []
    for policy in POLICIES:
        images = fit_pixels(loss_encoder, word_ids, parse_policy(policy), args.steps)
        own, judged = scores(loss_encoder, images, word_ids), scores(judge, images, word_ids)
        spectrum = spectrum_check(real, {"fitted": images})["fitted"]
        print(f"align_augment={policy or '(none)':26s} loss encoder: InfoNCE {own[0]:.2f}, top-1 {own[1]:.3f} | "
              f"judge: InfoNCE {judged[0]:.2f}, top-1 {judged[1]:.3f} | spectrum peak {spectrum['peak']:.2f} "
              f"at {spectrum['peak_at']}", flush=True)
        rows.append(images[:8])
    if args.out:
        save_image(torch.cat(rows), args.out, nrow=8)


if __name__ == "__main__":
    main()
