"""Training benchmarks, all measured in one run on this machine; prints ratios.

1. Ray overhead: steps/s of the Ray Train loop (1 worker, Ray Data feed) / steps/s of a
   plain PyTorch loop over the same data held in memory (same model, batch, threads).
2. Feed headroom: Ray Data batches/s alone / training steps/s.
3. Memory: peak PSS of the whole job (driver + every Ray process) on 10x replicated shards
   / on 1x (streaming means ~1).
4. Compute efficiency: achieved training FLOP/s / this CPU's measured fp32 matmul FLOP/s.

    python benchmarks/bench_train.py [--config configs/shapes.toml] [--n 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from t2i import config as config_lib, storage  # noqa: E402
from t2i.data import load_manifest, load_vocabulary, read_split_arrays  # noqa: E402
from t2i.families import make_family  # noqa: E402
from t2i.prepare import prepare_shapes, write_manifest  # noqa: E402


def plain_steps_per_s(cfg, root, manifest, steps: int = 40) -> tuple[float, float]:
    """(steps/s, FLOPs per step) of a plain loop over in-memory tensors."""
    torch.set_num_threads(os.cpu_count())
    data = read_split_arrays(root, manifest, "train")
    images = torch.as_tensor(data["images"]).permute(0, 3, 1, 2).float().div(255)
    first = np.unique(data["caption_image"], return_index=True)[1]
    ids = torch.as_tensor(data["word_ids"][first]).long()
    vocab = load_vocabulary(root)
    torch.manual_seed(0)
    family = make_family(cfg, vocab.vectors)
    family.wrap(lambda net: net)  # no DDP in a plain loop
    b = cfg.data.batch_size
    batches = [(images[i: i + b], ids[i: i + b]) for i in range(0, len(images) - b + 1, b)]
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    with FlopCounterMode(display=False) as counter:
        family.train_step(*batches[0], epoch_progress=1.0)
    flops = counter.get_total_flops()
    for x, y in batches[:3]:  # warm-up
        family.train_step(x, y, epoch_progress=1.0)
    start = time.perf_counter()
    for i in range(steps):
        family.train_step(*batches[i % len(batches)], epoch_progress=1.0)
    return steps / (time.perf_counter() - start), flops


def matmul_flops(n: int = 1024, reps: int = 20) -> float:
    torch.set_num_threads(os.cpu_count())
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def ray_steps_per_s(cfg, root: Path, storage: Path) -> float:
    """Steps/s of the second epoch of a 1-worker Ray Train run (the first warms up)."""
    import ray  # noqa: PLC0415

    from t2i.train import fit  # noqa: PLC0415

    run = config_lib.from_dict(cfg.to_dict())
    run.data.path, run.train.storage_path, run.train.name = str(root), str(storage), "bench"
    run.train.epochs, run.train.num_workers = 2, 1
    summary = fit(run)
    ray.shutdown()
    return summary["metrics"]["samples_per_s"] / cfg.data.batch_size


def feed_batches_per_s(cfg, root, manifest) -> float:
    import ray  # noqa: PLC0415

    from t2i.data import build_datasets  # noqa: PLC0415

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ds = build_datasets(root, manifest, [], cfg.train.data_cpu_limit)["train"]
    for _ in ds.iter_torch_batches(batch_size=cfg.data.batch_size):  # warm-up pass
        pass
    start, n = time.perf_counter(), 0
    for _ in range(2):
        for _ in ds.iter_torch_batches(batch_size=cfg.data.batch_size,
                                       local_shuffle_buffer_size=4 * cfg.data.batch_size):
            n += 1
    rate = n / (time.perf_counter() - start)
    ray.shutdown()
    return rate


def replicate(root: Path, out: Path, times: int) -> Path:
    """A prepared dataset whose train split is ``times`` hard-linked copies of the original."""
    shutil.copytree(root, out, ignore=shutil.ignore_patterns("train"))
    manifest = load_manifest(root, verify_checksums=False)
    shards = []
    (out / "train").mkdir()
    for k in range(times):
        for shard in manifest["splits"]["train"]["shards"]:
            rel = f"train/copy{k:02d}-{Path(shard['file']).name}"
            os.link(root / shard["file"], out / rel)
            shards.append({**shard, "file": rel})
    splits = dict(manifest["splits"])
    splits["train"] = {"images": manifest["splits"]["train"]["images"] * times,
                       "captions": manifest["splits"]["train"]["captions"] * times, "shards": shards}
    fields = {k: v for k, v in manifest.items() if k not in ("format", "created", "splits")}
    write_manifest(out, splits=splits, **fields)
    assert storage.sha256(out / shards[-1]["file"]) == shards[-1]["sha256"]
    return out


def _tree_pss_bytes(root_pid: int) -> int:
    """PSS (shared pages split fairly) of a process and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, p in parents.items() if p == pid and c not in tree]
        tree.update(kids)
        frontier += kids
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def peak_job_pss_mb(data: Path, storage: Path, overrides: list[str]) -> float:
    """Run one epoch of train_job.py and sample the PSS of its whole process tree."""
    cmd = [sys.executable, str(REPO / "train_job.py"), "--data", str(data),
           "--set", f"train.storage_path={storage}", "--set", "train.epochs=1", *sum((["--set", o] for o in overrides), [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _tree_pss_bytes(proc.pid) / 2 ** 20)
        time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed with {proc.returncode}")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "shapes.toml"))
    parser.add_argument("--n", type=int, default=3000, help="shapes images for the speed runs")
    args = parser.parse_args()
    cfg = config_lib.load(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "shapes"
        prepare_shapes(root, n=args.n, seed=0, shard_rows=500)
        manifest = load_manifest(root)
        plain, flops_per_step = plain_steps_per_s(cfg, root, manifest)
        peak = matmul_flops()
        ray_rate = ray_steps_per_s(cfg, root, tmp / "runs")
        feed = feed_batches_per_s(cfg, root, manifest)
        tiny = ["model.width=8", "model.hidden=64", "model.latent_dim=8", "data.samples_per_prompt=1"]
        pss1 = peak_job_pss_mb(root, tmp / "m1", tiny)
        pss10 = peak_job_pss_mb(replicate(root, tmp / "shapes10", 10), tmp / "m10", tiny)
    result = {
        "plain_steps_per_s": plain, "ray_steps_per_s": ray_rate, "ray_overhead_ratio": ray_rate / plain,
        "feed_batches_per_s": feed, "feed_headroom_ratio": feed / ray_rate,
        "job_peak_pss_mb_1x": pss1, "job_peak_pss_mb_10x": pss10, "memory_ratio_10x": pss10 / pss1,
        "train_flop_per_step": flops_per_step, "achieved_flop_per_s": flops_per_step * ray_rate,
        "matmul_flop_per_s": peak, "compute_efficiency": flops_per_step * ray_rate / peak,
        "batch_size": cfg.data.batch_size, "config": args.config, "cpus": os.cpu_count(),
    }
    print(f"Ray overhead:  {ray_rate:.2f} / {plain:.2f} steps/s = {ray_rate / plain:.3f} (goal >= 0.90)")
    print(f"Feed headroom: {feed:.1f} batches/s / {ray_rate:.2f} steps/s = {feed / ray_rate:.1f} (goal >= 5)")
    print(f"Memory:        peak PSS {pss10:.0f} MB (10x shards) / {pss1:.0f} MB (1x) = {pss10 / pss1:.3f} (goal <= 1.1)")
    print(f"Compute:       {flops_per_step * ray_rate / 1e9:.1f} GFLOP/s / matmul {peak / 1e9:.1f} GFLOP/s "
          f"= {flops_per_step * ray_rate / peak:.3f} (goal >= 0.4)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
