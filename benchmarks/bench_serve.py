"""Serving throughput and latency: the t2i app under Ray Serve on 127.0.0.1, with
``@serve.batch`` on and off.

    .venv/bin/python benchmarks/bench_serve.py [--checkpoint runs/shapes-cvae] [--requests 200]

The checkpoint defaults to the default run's folder (``python train_job.py`` writes it).
For each setting (batching on: up to --batch requests per forward pass; off: 1) the script
deploys the app, warms it up, then sends --requests POST /api/generate requests (n images
each) at concurrency 1 and 16, and prints p50/p99 latency, requests/s and errors (must be
0), then the concurrency-16 throughput ratio of batching on vs off, all from this one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CAPTIONS = ["a large red circle at the top left", "a small blue square in the middle",
            "a green triangle at the bottom right", "a small yellow circle at the top",
            "a large purple square on the left", "a white triangle in the middle"]


def one_request(url: str, index: int, n: int) -> tuple[float, bool]:
    body = json.dumps({"caption": CAPTIONS[index % len(CAPTIONS)], "n": n, "seed": index}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            ok = response.status == 200 and len(json.loads(response.read())["images"]) == n
    except (urllib.error.URLError, OSError, ValueError):
        ok = False
    return time.perf_counter() - started, ok


def load(url: str, requests: int, concurrency: int, n: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: one_request(url, i, n), range(requests)))
    wall = time.perf_counter() - started
    latencies = sorted(t for t, _ in results)
    return {"p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "requests_per_s": requests / wall, "errors": sum(not ok for _, ok in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(REPO / "runs" / "shapes-cvae"),
                        help="a model.pt, checkpoint folder or run folder (default: the default run's)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--n", type=int, default=4, help="images per request")
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size with batching on")
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()

    from ray import serve  # noqa: PLC0415

    from t2i.runtime.ray_env import start_ray  # noqa: PLC0415
    from t2i.serving.app import APP_NAME, build_app  # noqa: PLC0415
    from t2i.serving.service import CaptionGenerator  # noqa: PLC0415

    facts = CaptionGenerator(args.checkpoint, device="cpu").facts  # a clear error before Ray starts
    start_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}/api/generate"
    print(f"model: {facts['family']} on {facts['dataset']}, epoch {facts['epoch']}, {facts['parameters']:,} parameters; "
          f"{args.requests} requests of {args.n} images each")
    rows = {}
    try:
        for label, batch in (("batching on", args.batch), ("batching off", 1)):
            serve.run(build_app({"checkpoint": args.checkpoint, "max_batch_size": batch}), name=APP_NAME,
                      route_prefix="/")
            load(url, 32, 16, args.n)  # warm-up: first calls compile kernels and fill caches
            for concurrency in (1, 16):
                result = load(url, args.requests, concurrency, args.n)
                rows[(label, concurrency)] = result
                print(f"{label:13s} (max_batch_size {batch:2d})  concurrency {concurrency:2d}: "
                      f"p50 {result['p50_ms']:7.1f} ms  p99 {result['p99_ms']:7.1f} ms  "
                      f"{result['requests_per_s']:6.1f} requests/s  errors {result['errors']}", flush=True)
    finally:
        import ray  # noqa: PLC0415

        serve.delete(APP_NAME)
        ray.shutdown()
    ratio = rows[("batching on", 16)]["requests_per_s"] / rows[("batching off", 16)]["requests_per_s"]
    errors = sum(r["errors"] for r in rows.values())
    print(f"throughput at concurrency 16, batching on / off: {ratio:.2f}x; errors in all runs: {errors}")
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
