"""Training benchmarks, all measured in one run on this machine; prints ratios.

Same model, batch and threads everywhere (the default run's config unless --config), on
the default run's data (shapes, 6,000 images). Rates are at steady state: the training
phase of the epochs after the first (the first pulls the cache, starts the workers, and
warms up oneDNN); each epoch's evaluation and checkpoint are not in them (the plain loop
has neither) and are printed apart.

1. Ray overhead: images/s of a 1-worker Ray Train run (Ray Data feed; the shard cached,
   and streamed with data.cache_mb=0) / images/s of a plain PyTorch loop over the same
   data in memory (t2i's pure training step, no Ray). Plain loops and cached runs
   alternate (--rounds cached runs, each between two plain loops) because this machine's
   speed drifts by tens of percent within minutes.
2. Two workers vs one on this machine, the same total batch (half per worker), cached.
3. Feed headroom (streaming): batches/s of the streamed feed alone (Ray Data read + caption
   draw, consumed by nothing) / training steps/s in streaming mode.
4. Memory (streaming): peak PSS of the whole job (driver + every Ray process) on 10x
   hard-linked copies of the train shards / on 1x.
5. Compute efficiency: training FLOP/s (FLOPs of one step counted by torch's
   FlopCounterMode x steady steps/s of the cached Ray run) / this CPU's fp32 matmul
   FLOP/s measured with the same threads. benchmarks/bench_compute.py tries what could
   raise it.

    python benchmarks/bench_train.py [--config shapes] [--n 6000] [--epochs 5] [--rounds 2]
                                     [--parts speed memory]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq
import torch

from t2i import config as config_lib
from t2i import storage
from t2i.data.dataset import load_manifest, load_vocabulary, shard_paths
from t2i.data.feed import EpochFeed, FeedPlan, ShardCache, build_datasets, to_model_inputs
from t2i.data.prepare import prepare_shapes, write_manifest
from t2i.runtime.ray_env import usable_cpus
from t2i.training.families import make_family


def plain_loop(cfg, root, epochs: int, threads: int, prepare_net=None, channels_last: bool = True) -> dict:
    """A plain PyTorch loop over the train split in memory (the worker's ShardCache without
    Ray: seeded shuffle, one caption per image), channels-last like the worker unless told
    otherwise. Returns steady images/s (epochs after the first) and FLOPs per step."""
    torch.set_num_threads(threads)
    manifest = load_manifest(root, verify_checksums=False)
    tables = [pq.read_table(p, columns=["image", "word_ids", "image_id"]) for p in shard_paths(root, manifest, "train")]
    cache = ShardCache.from_train_tables(tables, manifest["image_size"], "cpu")
    torch.manual_seed(cfg.train.seed)
    family = make_family(cfg, load_vocabulary(root).vectors)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for net in family.networks().values():
        net.to(memory_format=layout)
    family.wrap(prepare_net or (lambda net: net))  # no DDP in a plain loop

    def inputs(batch_dict):
        images, word_ids = to_model_inputs(batch_dict, "cpu")
        return images.contiguous(memory_format=layout), word_ids
    batch = cfg.data.batch_size
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    with FlopCounterMode(display=False) as counter:
        family.train_step(*inputs(next(cache.epoch_batches(batch, 0, 0, 0))), epoch_progress=1.0)
    rates, seconds = [], []
    for epoch in range(epochs):
        started, seen = time.perf_counter(), 0
        for b in cache.epoch_batches(batch, cfg.train.seed, epoch, 0):
            images, word_ids = inputs(b)
            family.train_step(images, word_ids, epoch + 0.5)
            seen += images.shape[0]
        seconds.append(time.perf_counter() - started)
        rates.append(seen / seconds[-1])
    return {"images_per_s": sum(rates[1:]) / len(rates[1:]), "epoch_rates": rates, "epoch_s": seconds,
            "flop_per_step": counter.get_total_flops()}


def matmul_flops(threads: int, n: int = 1024, reps: int = 30) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def ray_run(config_path: str, root: Path, runs: Path, name: str, *overrides: str) -> dict:
    """A Ray Train run of the config (overrides applied); steady images/s from its metrics."""
    import ray  # noqa: PLC0415

    from t2i.training.driver import fit  # noqa: PLC0415

    run = config_lib.load(config_path, [f"data.path={root}", f"train.storage_path={runs}", f"train.name={name}",
                                        *overrides])
    summary = fit(run)
    ray.shutdown()
    if summary["error"]:
        raise RuntimeError(f"{name}: {summary['error']}")
    rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    return {"images_per_s": sum(r["samples_per_s"] for r in rows[1:]) / len(rows[1:]),
            "epoch_rates": [r["samples_per_s"] for r in rows], "epoch_s": [r["epoch_s"] for r in rows],
            "data_mode": summary["data_mode"]}


def feed_batches_per_s(cfg, root: Path, epochs: int = 3, max_batches: int | None = None) -> float:
    """The streamed feed alone, as a worker consumes it (steady: epochs after the first; one
    epoch of at most ``max_batches``: that epoch)."""
    import ray  # noqa: PLC0415

    from t2i.runtime.ray_env import data_cpu_budget, start_ray  # noqa: PLC0415

    start_ray()
    manifest = load_manifest(root, verify_checksums=False)
    ds = build_datasets(root, manifest, [], data_cpu_budget(cfg.train.data_cpu_limit, ray.cluster_resources()["CPU"]),
                        seed=cfg.train.seed)["train"]
    if max_batches:  # the stream ends there (leaving a Ray Data iterator half-read kills the process at shutdown)
        ds = ds.limit(max_batches * cfg.data.batch_size)
    plan = FeedPlan(cached=False, image_size=manifest["image_size"], batch_size=cfg.data.batch_size,
                    eval_batch_size=256, seed=cfg.train.seed)
    feed = EpochFeed({"train": ds.iterator()}, plan, "cpu")
    rates = []
    for epoch in range(epochs):
        started, n = time.perf_counter(), 0
        for batch in feed.train_batches(epoch):
            to_model_inputs(batch, "cpu")
            n += 1
        rates.append(n / (time.perf_counter() - started))
    ray.shutdown()
    steady = rates[1:] or rates  # one epoch: a big set's first epoch is mostly steady
    return sum(steady) / len(steady)


def replicate(root: Path, out: Path, times: int) -> Path:
    """A prepared dataset whose train split is ``times`` hard-linked copies of the original."""
    shutil.copytree(root, out, ignore=shutil.ignore_patterns("train"))
    manifest = load_manifest(root, verify_checksums=False)
    shards = []
    (out / "train").mkdir()
    for k in range(times):
        for shard in manifest["splits"]["train"]["shards"]:
            rel = f"train/copy{k:03d}-{Path(shard['file']).name}"
            os.link(root / shard["file"], out / rel)
            shards.append({**shard, "file": rel})
    splits = dict(manifest["splits"])
    splits["train"] = {"images": manifest["splits"]["train"]["images"] * times,
                       "captions": manifest["splits"]["train"]["captions"] * times, "shards": shards}
    fields = {k: v for k, v in manifest.items() if k not in ("format", "created", "splits")}
    write_manifest(out, splits=splits, **fields)
    assert storage.sha256(out / shards[-1]["file"]) == shards[-1]["sha256"]
    return out


def process_tree(root_pid: int) -> set[int]:
    """A process and all its descendants, from /proc."""
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
    return tree


def tree_pss(root_pid: int) -> dict[int, tuple[int, str]]:
    """PSS in bytes (shared pages split fairly) and command line of a process and all its
    descendants: {pid: (pss, cmdline)}."""
    found = {}
    for pid in process_tree(root_pid):
        try:
            pss = sum(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                      if line.startswith("Pss:"))
            found[pid] = (pss, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return found


def peak_job_pss_mb(data: Path, storage_dir: Path, overrides: list[str], window_s: float | None = None) -> dict:
    """Run one epoch of train_job.py and sample the PSS of its whole process tree every 0.5 s:
    peak MB of the job (driver + every Ray process) and of its Ray Train worker process, and
    the job's peak in the first and second half of the time sampled. With ``window_s`` the job
    is stopped after that many seconds (Ctrl-C to its process group, as a terminal sends it)."""
    cmd = [sys.executable, str(REPO / "train_job.py"), "--data", str(data),
           "--set", f"train.storage_path={storage_dir}", "--set", "train.epochs=1",
           *[arg for o in overrides for arg in ("--set", o)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started, samples = time.monotonic(), []  # (seconds, job MB, train worker MB)
    while proc.poll() is None and (window_s is None or time.monotonic() - started < window_s):
        processes = tree_pss(proc.pid).values()
        samples.append((time.monotonic() - started, sum(pss for pss, _ in processes) / 2 ** 20,
                        max([0.0, *(pss / 2 ** 20 for pss, cmd in processes if "RayTrainWorker" in cmd)])))
        time.sleep(0.5)
    if proc.poll() is None:
        tree = process_tree(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        for pid in tree:  # whatever did not stop (Ray's processes keep their own sessions)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    elif proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed with {proc.returncode}")
    half = samples[-1][0] / 2
    return {"job": max(s[1] for s in samples), "train_worker": max(s[2] for s in samples),
            "job_first_half": max(s[1] for s in samples if s[0] <= half),
            "job_second_half": max(s[1] for s in samples if s[0] > half), "sampled_s": samples[-1][0]}


def speed(args, cfg, root: Path, tmp: Path) -> dict:
    batch = cfg.data.batch_size
    threads = usable_cpus()  # what a lone Ray worker gets here (t2i.runtime.ray_env.worker_threads)
    epochs = f"train.epochs={args.epochs}"
    # This machine's speed drifts by tens of percent within minutes: plain loops and cached
    # Ray runs alternate (P C P C P), each cached run compared with the plain runs on either
    # side of it; the other runs compare with the mean of every plain run.
    plains, matmuls, cached_runs = [plain_loop(cfg, root, args.epochs, threads)], [matmul_flops(threads)], []
    for k in range(args.rounds):
        cached_runs.append(ray_run(args.config, root, tmp / "runs", f"cached{k}", epochs, "train.num_workers=1"))
        plains.append(plain_loop(cfg, root, args.epochs, threads))
        matmuls.append(matmul_flops(threads))
    streamed = ray_run(args.config, root, tmp / "runs", "streamed", epochs, "train.num_workers=1", "data.cache_mb=0")
    two = ray_run(args.config, root, tmp / "runs", "two", epochs, "train.num_workers=2", f"data.batch_size={batch // 2}")
    feed = feed_batches_per_s(cfg, root, args.epochs)
    plain_rates = [p["images_per_s"] for p in plains]
    plain_rate = sum(plain_rates) / len(plain_rates)
    matmul = sum(matmuls) / len(matmuls)
    cached_rate = sum(c["images_per_s"] for c in cached_runs) / len(cached_runs)
    round_ratios = [c["images_per_s"] / ((plain_rates[k] + plain_rates[k + 1]) / 2) for k, c in enumerate(cached_runs)]
    assert all(c["data_mode"] == "cache" for c in cached_runs) and streamed["data_mode"] == "stream"
    assert two["data_mode"] == "cache"
    steps = {"cached": cached_rate / batch, "streamed": streamed["images_per_s"] / batch}
    achieved = plains[0]["flop_per_step"] * steps["cached"]
    result = {
        "plain_images_per_s": plain_rate, "cached_images_per_s": cached_rate,
        "streamed_images_per_s": streamed["images_per_s"], "two_workers_images_per_s": two["images_per_s"],
        "overhead_ratio_cached": sum(round_ratios) / len(round_ratios), "overhead_ratio_cached_rounds": round_ratios,
        "overhead_ratio_streamed": streamed["images_per_s"] / plain_rate,
        "two_vs_one_workers": two["images_per_s"] / cached_rate,
        "feed_batches_per_s": feed, "feed_headroom_streamed": feed / steps["streamed"],
        "flop_per_step": plains[0]["flop_per_step"], "achieved_flop_per_s": achieved, "matmul_flop_per_s": matmul,
        "compute_efficiency": achieved / matmul, "plain_runs": plain_rates, "matmul_runs": matmuls,
        "epoch_rates": {"plain": [p["epoch_rates"] for p in plains], "cached": [c["epoch_rates"] for c in cached_runs],
                        "streamed": streamed["epoch_rates"], "two": two["epoch_rates"]},
        "epoch_s": {"cached": [c["epoch_s"] for c in cached_runs], "streamed": streamed["epoch_s"], "two": two["epoch_s"]},
        "batch_size": batch, "threads": threads,
    }
    print(f"steady state = the training phase of epochs 2..{args.epochs} (images/s); batch {batch}, {threads} threads")
    print(f"Plain loop runs (between the cached runs): {', '.join(f'{r:.0f}' for r in plain_rates)} images/s")
    cached_rates = ", ".join(f"{c['images_per_s']:.0f}" for c in cached_runs)
    print(f"Ray overhead, cached:   {cached_rates} images/s, "
          f"each / the plain runs either side: {', '.join(f'{r:.3f}' for r in round_ratios)}; "
          f"mean {result['overhead_ratio_cached']:.3f} (goal >= 0.95)")
    print(f"Ray overhead, streamed: {streamed['images_per_s']:.0f} / plain {plain_rate:.0f} images/s "
          f"= {result['overhead_ratio_streamed']:.3f}")
    print(f"Two workers vs one:     {two['images_per_s']:.0f} / {cached_rate:.0f} images/s "
          f"= {result['two_vs_one_workers']:.3f} (batch {batch // 2} per worker)")
    print(f"Feed headroom, stream:  {feed:.1f} batches/s / {steps['streamed']:.2f} steps/s "
          f"= {result['feed_headroom_streamed']:.1f} (goal >= 5)")
    print(f"Compute:                {achieved / 1e9:.1f} GFLOP/s / matmul {matmul / 1e9:.1f} GFLOP/s "
          f"= {result['compute_efficiency']:.3f} (goal >= 0.4)")
    print(f"Whole epochs (train + dev + checkpoint), s: cached {[round(s, 1) for s in cached_runs[-1]['epoch_s']]}, "
          f"streamed {[round(s, 1) for s in streamed['epoch_s']]}")
    return result


def memory(root: Path, tmp: Path) -> dict:
    tiny = ["model.width=8", "model.hidden=64", "model.latent_dim=8", "data.samples_per_prompt=1", "data.cache_mb=0"]
    pss1 = peak_job_pss_mb(root, tmp / "m1", tiny)["job"]
    pss10 = peak_job_pss_mb(replicate(root, tmp / "shapes10", 10), tmp / "m10", tiny)["job"]
    print(f"Memory, stream:         peak PSS {pss10:.0f} MB (10x shards) / {pss1:.0f} MB (1x) "
          f"= {pss10 / pss1:.3f} (goal <= 1.1)")
    return {"job_peak_pss_mb_1x": pss1, "job_peak_pss_mb_10x": pss10, "memory_ratio_10x": pss10 / pss1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "t2i" / "configs" / "shapes.toml"))
    parser.add_argument("--n", type=int, default=6000, help="shapes images (the default run's 6,000)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="cached Ray runs, each between two plain loops")
    parser.add_argument("--parts", nargs="+", choices=["speed", "memory"], default=["speed", "memory"])
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    cfg = config_lib.load(args.config)
    result = {"n": args.n, "epochs": args.epochs, "config": args.config}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "shapes"
        prepare_shapes(root, n=args.n, seed=0)
        if "speed" in args.parts:
            result.update(speed(args, cfg, root, tmp))
        if "memory" in args.parts:
            result.update(memory(root, tmp))
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
