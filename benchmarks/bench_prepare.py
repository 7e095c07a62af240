"""Prepare throughput and memory: real Flickr8k (1 and 2 local processes, and Ray Data tasks
with 1 and 2 workers), Flickr8k at 1x and 10x its images, and shapes at 1x and 10x images.

Each preparation runs in a fresh Python process so its peak RSS is its own (Ray's start is
outside the timed part). Prints one line per run, the Ray Data speed-up of 2 workers over 1,
and the 10x / 1x ratios: time (goal: linear, ~10), peak RSS of a decoding process (goal:
flat, <= 1.1) and of the main process (it holds every caption until the manifest is
written, so it grows with the captions), and the shapes RSS ratio (goal <= 1.2).

Flickr8k 10x is the real download repeated by reference: a Kaggle-layout folder whose
``Images/`` holds ten symbolic links per photo (``r0-NAME.jpg`` .. ``r9-NAME.jpg``) and
whose ``captions.txt`` repeats each photo's captions under each link's name; 1x is the
same with one link (both split by the name hash, so the splits are ~80/10/10 of each).

    python benchmarks/bench_prepare.py [--flickr8k ../shared/data/flickr8k] [--shapes-n 20000]
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
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_train import process_tree

CHILD = r"""
import json, resource, sys, time
from t2i.data import prepare
kind, arg, out = sys.argv[1], sys.argv[2], sys.argv[3]
if kind.startswith("ray"):
    from t2i.runtime.ray_env import start_ray
    start_ray()
t0 = time.perf_counter()
if kind == "flickr8k":
    m = prepare.prepare_flickr8k(arg, out)
elif kind.startswith("local"):  # "local1", "local2": that many decoding processes
    m = prepare.prepare_flickr8k(arg, out, workers=int(kind[5:]))
elif kind.startswith("ray"):  # "ray1", "ray2": Ray Data tasks, that many at once
    m = prepare.prepare_flickr8k(arg, out, workers=int(kind[3:]), on_ray=True)
else:
    m = prepare.prepare_shapes(out, n=int(arg))
seconds = time.perf_counter() - t0
images = sum(s["images"] for s in m["splits"].values())
print(json.dumps({"images": images, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_rss_mb(pid: int) -> float:
    """A process's peak RSS so far (VmHWM), 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0.0)


def run(kind: str, arg: str, out: Path) -> dict:
    """One preparation in a fresh process; its decoding processes (forked from a forkserver,
    so not the main process's children) are watched every 0.1 s for their peak RSS."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, kind, arg, str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    worker_peak = 0.0
    while proc.poll() is None:
        for pid in process_tree(proc.pid) - {proc.pid}:
            worker_peak = max(worker_peak, peak_rss_mb(pid))
        time.sleep(0.1)
    stdout = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"prepare {kind} failed ({proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["images_per_s"] = result["images"] / result["seconds"]
    result["peak_worker_rss_mb"] = worker_peak
    return result


def repeated_flickr8k(src: str, out: Path, times: int) -> Path:
    """Flickr8k ``times`` over by reference (see the module docstring)."""
    sys.path.insert(0, str(REPO))
    from t2i.data import flickr8k  # noqa: PLC0415
    from t2i.data.caption_source import SkipLog  # noqa: PLC0415

    source = flickr8k.read_source(src, SkipLog())
    (out / "Images").mkdir(parents=True)
    lines = ["image,caption"]
    for name, captions in sorted(source.captions.items()):
        photo = source.image_dirs[0] / name
        if not photo.is_file():
            continue
        for k in range(times):
            (out / "Images" / f"r{k}-{name}").symlink_to(photo.resolve())
            lines += [f'r{k}-{name},"{c.replace(chr(34), chr(39))}"' for c in captions]
    (out / "captions.txt").write_text("\n".join(lines) + "\n")
    return out


def scaling(src: str, tmp: Path) -> None:
    one = run("flickr8k", str(repeated_flickr8k(src, tmp / "f8k-x1-src", 1)), tmp / "f8k-x1")
    ten = run("flickr8k", str(repeated_flickr8k(src, tmp / "f8k-x10-src", 10)), tmp / "f8k-x10")
    for label, r in (("1x", one), ("10x", ten)):
        print(f"flickr8k {label} (by reference): {r['images']} images in {r['seconds']:.1f} s = "
              f"{r['images_per_s']:.0f} images/s; peak RSS main {r['peak_rss_mb']:.0f} MB, "
              f"decoding process {r['peak_worker_rss_mb']:.0f} MB")
    print(f"flickr8k 10x/1x: time {ten['seconds'] / one['seconds']:.2f} (linear: 10), "
          f"decoding process RSS {ten['peak_worker_rss_mb'] / one['peak_worker_rss_mb']:.3f} (goal <= 1.1), "
          f"main RSS {ten['peak_rss_mb'] / one['peak_rss_mb']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flickr8k", default=str(REPO.parent / "shared" / "data" / "flickr8k"))
    parser.add_argument("--shapes-n", type=int, default=20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if Path(args.flickr8k).is_dir():
            for path in Path(args.flickr8k).rglob("*"):  # into the page cache: no run pays for a cold disk
                if path.is_file():
                    path.read_bytes()
            local = {n: run(f"local{n}", args.flickr8k, tmp / f"f8k-local{n}") for n in (1, 2)}
            for n, r in local.items():
                print(f"flickr8k, {n} local process(es): {r['images']} images in {r['seconds']:.1f} s = "
                      f"{r['images_per_s']:.0f} images/s; peak RSS main {r['peak_rss_mb']:.0f} MB, "
                      f"decoding process {r['peak_worker_rss_mb']:.0f} MB")
            print(f"local 2 processes / 1 = {local[2]['images_per_s'] / local[1]['images_per_s']:.2f}x")
            on_ray = {n: run(f"ray{n}", args.flickr8k, tmp / f"f8k-ray{n}") for n in (1, 2)}
            for n, r in on_ray.items():
                print(f"flickr8k on Ray Data, {n} worker(s): {r['images']} images in {r['seconds']:.1f} s = "
                      f"{r['images_per_s']:.0f} images/s")
            print(f"Ray Data 2 workers / 1 worker = {on_ray[2]['images_per_s'] / on_ray[1]['images_per_s']:.2f}x")
            scaling(args.flickr8k, tmp)
        else:
            print(f"flickr8k: skipped, {args.flickr8k} not found")
        small = run("shapes", str(args.shapes_n), tmp / "s1")
        large = run("shapes", str(10 * args.shapes_n), tmp / "s10")
        for label, r in (("1x", small), ("10x", large)):
            print(f"shapes {label}: {r['images']} images in {r['seconds']:.1f} s = {r['images_per_s']:.0f} images/s; "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB")
        print(f"shapes peak RSS ratio 10x/1x = {large['peak_rss_mb'] / small['peak_rss_mb']:.3f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
