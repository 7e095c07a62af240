"""The gan's training step: images/s of this checkout against another commit's, in one run.

Both sides train the built-in `gan` config (its alignment loss included) from the same seed
on the same fixed sequence of batches, in plain PyTorch (no Ray, 2 torch threads), and the
runs alternate (before, after, before, after, ...) because this machine's speed drifts. The
other commit runs from a temporary `git worktree`, in its own process. Also printed: the
first step's discriminator terms on each side, which agree wherever the maths is unchanged.

    python benchmarks/bench_gan_step.py --before HEAD~1 [--data data/f8k] [--steps 60] [--rounds 2]

Without --data it uses a shapes set of 2,000 images prepared in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(repo: Path, data: str, steps: int, warmup: int, batch: int) -> dict:
    """One timed run of ``repo``'s gan step (imports t2i from ``repo``)."""
    sys.path.insert(0, str(repo))  # this side's t2i, imported only now: noqa below for that reason
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from t2i import config as config_lib  # noqa: PLC0415
    from t2i.data.dataset import load_manifest, load_vocabulary, read_split_arrays, to_float  # noqa: PLC0415
    from t2i.training import encoders  # noqa: PLC0415
    from t2i.training.families import make_family  # noqa: PLC0415

    assert Path(config_lib.__file__).is_relative_to(repo), config_lib.__file__  # this side's code
    torch.set_num_threads(2)
    cfg = config_lib.load(str(repo / "t2i" / "configs" / "gan.toml"), [f"data.batch_size={batch}"])
    manifest, vocab = load_manifest(data), load_vocabulary(data)
    train = read_split_arrays(data, manifest, "train")
    aligner = encoders.load_or_train(encoders.ALIGNMENT_LOSS, data, manifest, vocab, train, log=lambda _: None)
    torch.manual_seed(0)
    family = make_family(cfg, vocab.vectors, aligner)
    family.wrap(lambda net: net)
    family.train()
    rng = np.random.default_rng(0)
    first_caption = np.unique(train["caption_image"], return_index=True)[1]
    first_terms, started = None, None
    for step in range(warmup + steps):
        rows = rng.choice(len(train["images"]), size=batch, replace=False)
        images = to_float(train["images"][rows]).contiguous(memory_format=torch.channels_last)
        word_ids = torch.as_tensor(train["word_ids"][first_caption[rows]]).long()
        terms = family.train_step(images, word_ids, epoch_progress=0.0)
        if step == 0:
            first_terms = {k: round(float(v), 6) for k, v in terms.items()}
        if step == warmup - 1:
            started = time.perf_counter()
    seconds = time.perf_counter() - started
    return {"images_per_s": steps * batch / seconds, "first_step": first_terms}


def run_child(repo: Path, args) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import bench_gan_step as b; "
            f"print(json.dumps(b.child(__import__('pathlib').Path({str(repo)!r}), {args.data!r}, "
            f"{args.steps}, {args.warmup}, {args.batch})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git ref of the step to compare against")
    parser.add_argument("--data", help="prepared data set (default: 2,000 shapes in a temporary folder)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.data:
            sys.path.insert(0, str(REPO))
            from t2i.data.prepare import prepare_shapes  # noqa: PLC0415 - the checkout's, after the path is set

            args.data = str(Path(tmp) / "shapes")
            prepare_shapes(args.data, n=2000, seed=0)
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(before), args.before],
                       check=True)
        try:
            results = {"before": [], "after": []}
            for _ in range(args.rounds):
                for side, repo in (("before", before), ("after", REPO)):
                    results[side].append(run_child(repo, args))
                    print(f"{side}: {results[side][-1]['images_per_s']:.1f} images/s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False)
    rate = {side: sum(r["images_per_s"] for r in runs) / len(runs) for side, runs in results.items()}
    print(json.dumps({"before": args.before, "data": args.data, "batch": args.batch, "steps": args.steps,
                      "images_per_s": rate, "speedup": rate["after"] / rate["before"],
                      "first_step": {side: runs[0]["first_step"] for side, runs in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
