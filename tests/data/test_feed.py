"""A worker's data feed (t2i.data.EpochFeed) over real Ray Datasets: cached and streamed
epochs show the same pairs, the order is seeded and survives a resume, and a shard over
the cache budget streams without holding the data in memory."""

from __future__ import annotations

import collections
import gc
import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from t2i import config as config_lib
from t2i.data.dataset import load_manifest
from t2i.data.feed import EpochFeed, FeedPlan, build_datasets

SEED = 3


def feed(shapes_dir, cached: bool, batch_size: int = 2, seed: int = SEED, manifest=None, root=None) -> EpochFeed:
    """A fresh feed, as a worker (re)started at any epoch builds it."""
    root = root or shapes_dir
    manifest = manifest or load_manifest(root)
    datasets = build_datasets(root, manifest, ["dev"] if "dev" in manifest["splits"] else [], seed=seed)
    plan = FeedPlan(cached=cached, image_size=64, batch_size=batch_size, eval_batch_size=64, seed=seed)
    return EpochFeed({name: ds.iterator() for name, ds in datasets.items()}, plan, "cpu", log=lambda _: None)


def pairs(batch) -> list[tuple[str, tuple]]:
    return [(hashlib.sha1(image.numpy().tobytes()).hexdigest()[:16], tuple(ids.tolist()))
            for image, ids in zip(batch["image"], batch["word_ids"])]


def epoch_pairs(feed_: EpochFeed, epoch: int) -> list[list]:
    return [pairs(batch) for batch in feed_.train_batches(epoch)]


def multiset(batches) -> collections.Counter:
    return collections.Counter(p for batch in batches for p in batch)


def test_cached_and_streamed_epochs_show_each_image_once_with_the_same_caption(shapes_dir, ray_session):
    """422 train images, batches of 2: nothing dropped, so the two modes' epochs compare whole."""
    cached, streamed = feed(shapes_dir, cached=True), feed(shapes_dir, cached=False)
    images = load_manifest(shapes_dir)["splits"]["train"]["images"]
    for epoch in (0, 1):
        a, b = epoch_pairs(cached, epoch), epoch_pairs(streamed, epoch)
        assert multiset(a) == multiset(b)
        assert sum(multiset(a).values()) == images  # every image once (two shapes images may look alike)
        assert a != b  # the same pairs, in each mode's own order
    assert multiset(epoch_pairs(cached, 0)) != multiset(epoch_pairs(cached, 1))  # other captions next epoch
    # Evaluation: the same (image, caption) pairs from the cache as from the stream.
    dev_cached = collections.Counter(p for b in cached.eval_batches("dev") for p in pairs(b))
    dev_streamed = collections.Counter(p for b in streamed.eval_batches("dev") for p in pairs(b))
    assert dev_cached == dev_streamed and sum(dev_cached.values()) == load_manifest(shapes_dir)["splits"]["dev"]["captions"]


def test_one_seed_sees_the_same_batches_and_a_resumed_feed_continues_them(shapes_dir, ray_session):
    run = feed(shapes_dir, cached=True, batch_size=16)
    uninterrupted = [epoch_pairs(run, epoch) for epoch in range(3)]
    assert all(len(batches) == 422 // 16 for batches in uninterrupted)  # the partial batch dropped
    # A second run of the seed, and a run resumed at epoch 2 (a fresh feed, as after a restart).
    assert epoch_pairs(feed(shapes_dir, cached=True, batch_size=16), 0) == uninterrupted[0]
    assert epoch_pairs(feed(shapes_dir, cached=True, batch_size=16), 2) == uninterrupted[2]
    assert epoch_pairs(feed(shapes_dir, cached=True, batch_size=16, seed=SEED + 1), 0) != uninterrupted[0]
    # Streaming: a resumed epoch shows the same pairs (its order follows Ray Data's reads).
    stream = feed(shapes_dir, cached=False)
    resumed = feed(shapes_dir, cached=False)
    assert multiset(epoch_pairs(resumed, 2)) == multiset(epoch_pairs(feed(shapes_dir, cached=True), 2))
    assert multiset(epoch_pairs(stream, 0)) != multiset(epoch_pairs(stream, 1))


def linked_copies(shapes_dir: Path, out: Path, times: int) -> dict:
    """A manifest whose train split is ``times`` hard-linked copies of the shapes train shards."""
    manifest = load_manifest(shapes_dir)
    shards = []
    (out / "train").mkdir(parents=True)
    for k in range(times):
        for shard in manifest["splits"]["train"]["shards"]:
            rel = f"train/copy{k:02d}-{Path(shard['file']).name}"
            os.link(shapes_dir / shard["file"], out / rel)
            shards.append({**shard, "file": rel})
    train = manifest["splits"]["train"]
    return {**manifest, "splits": {"train": {"images": train["images"] * times,
                                             "captions": train["captions"] * times, "shards": shards}}}


def private_mb() -> float:
    """This process's own memory (private pages; the Ray object store's shared pages count in
    RSS once touched, whoever holds them now), after handing freed memory back to the OS."""
    import ctypes

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024


def memory_of(consume) -> tuple[float, float]:
    """(peak of live Arrow memory while ``consume`` runs, MiB; how much more of this process's
    own memory is in use after it than before, MiB). Allocator caches would blur a peak of
    resident memory; Arrow's own count of live bytes is exact."""
    import pyarrow as pa

    before, peak, done = private_mb(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], pa.total_allocated_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        kept = consume()
    finally:
        done.set()
        thread.join()
    grown = private_mb() - before
    del kept
    return peak[0] / 2 ** 20, grown


def test_a_shard_over_the_cache_budget_streams_in_flat_memory(shapes_dir, tmp_path, ray_session):
    from t2i.training.driver import data_mode

    manifest = linked_copies(shapes_dir, tmp_path / "x40", 40)  # 16,880 images, 198 MiB of pixels
    pixels_mb = manifest["splits"]["train"]["images"] * 64 * 64 * 3 / 2 ** 20
    tiny_budget = config_lib.load(None, ["data.cache_mb=1", "data.eval_splits="])
    assert data_mode(tiny_budget, manifest) == "stream"
    assert data_mode(config_lib.load(None, ["data.eval_splits="]), manifest) == "cache"

    streamed = feed(shapes_dir, cached=False, batch_size=64, manifest=manifest, root=tmp_path / "x40")
    seen = []
    arrow_peak, kept = memory_of(lambda: seen.extend(len(b["image"]) for b in streamed.train_batches(0)))
    assert sum(seen) == manifest["splits"]["train"]["images"] // 64 * 64 and not streamed.caches
    # Bounded by Ray Data's block size (t2i.data.STREAM_BLOCK_BYTES), not by the data.
    assert arrow_peak < pixels_mb / 4 and kept < pixels_mb / 4, (arrow_peak, kept, pixels_mb)
    # The probe sees a feed that keeps the data: the cache of the same shard.
    cached = feed(shapes_dir, cached=True, batch_size=64, manifest=manifest, root=tmp_path / "x40")
    arrow_peak, kept = memory_of(lambda: next(iter(cached.train_batches(0))))
    assert arrow_peak > pixels_mb * 0.9 and kept > pixels_mb * 0.9, (arrow_peak, kept, pixels_mb)


@pytest.mark.parametrize("seed", [0, 2 ** 31])
def test_caption_draws_are_uniform_and_fixed_per_image(seed):
    import numpy as np

    from t2i.data.feed import caption_draws, image_keys, pick_rows

    keys = image_keys([f"img-{i}" for i in range(20000)])
    draws = caption_draws(keys, seed, 5)
    assert draws.min() >= 0 and draws.max() < 1 and abs(draws.mean() - 0.5) < 0.01
    assert np.array_equal(draws[:10], caption_draws(keys[:10], seed, 5))  # per image, not per position
    assert not np.array_equal(draws, caption_draws(keys, seed, 6))
    rows = pick_rows(np.arange(0, 100001, 5), draws)  # 5 captions per image: each used ~1/5 of the time
    assert np.bincount(rows % 5).min() > 3700


def test_sample_caption_rows_is_seeded_distinct_and_bounded(shapes_dir):
    from t2i.data.dataset import DatasetError, load_manifest, sample_caption_rows

    manifest = load_manifest(shapes_dir)
    rows = sample_caption_rows(shapes_dir, manifest, "train", 20, seed=3)
    assert rows.shape == (20, manifest["max_words"]) and len(np.unique(rows, axis=0)) == 20
    assert np.array_equal(rows, sample_caption_rows(shapes_dir, manifest, "train", 20, seed=3))
    assert not np.array_equal(rows, sample_caption_rows(shapes_dir, manifest, "train", 20, seed=4))
    with pytest.raises(DatasetError, match="distinct captions"):
        sample_caption_rows(shapes_dir, manifest, "train", 10**6)
