"""What a lost worker node costs: the same 2-worker job on a local two-node cluster, once
undisturbed and once with worker node 1 killed after the first checkpoint.

    .venv/bin/python benchmarks/bench_cluster.py [--epochs 4] [--images 1000]

Prints cluster start/stop seconds, both jobs' wall times and their ratio, the seconds from
the kill to the restarted worker group, and how many epochs were trained twice (0 when the
restart resumes from the checkpoint instead of starting over).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "cluster"))

import local as local_cluster

from t2i.data.prepare import prepare_shapes


def run_job(dashboard: str, data: Path, runs: Path, name: str, epochs: int, kill_after_first: list[str] | None):
    entry = ["python", "train_job.py", "--smoke-test", "--data", str(data), "--set", f"train.storage_path={runs}",
             "--set", f"train.name={name}", "--set", "train.num_workers=2", "--set", "train.placement_strategy=SPREAD",
             "--set", f"train.epochs={epochs}", "--set", "train.max_failures=2"]
    started = time.monotonic()
    local_cluster.submit_job(dashboard, entry, REPO, wait=False, submission_id=name)
    killed_at = None
    while (status := local_cluster.job_status(dashboard, name)) in ("PENDING", "RUNNING"):
        if kill_after_first and killed_at is None and list((runs / name).glob("checkpoint_*/meta.json")):
            subprocess.run(kill_after_first, check=True, capture_output=True)
            killed_at = datetime.now()
        time.sleep(0.5)
    wall = time.monotonic() - started
    if status != "SUCCEEDED":
        raise SystemExit(f"job {name} ended {status}")
    attempts = json.loads((runs / name / "workers.json").read_text())
    epochs_run = [json.loads(line)["epoch"] for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    recovery = None
    if killed_at and len(attempts) > 1:
        recovery = (datetime.fromisoformat(attempts[-1]["started"]) - killed_at).total_seconds()
    return wall, len(attempts), recovery, len(epochs_run) - len(set(epochs_run))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="t2i-bench-cluster-") as tmp:
        data, runs = Path(tmp) / "shapes", Path(tmp) / "runs"
        prepare_shapes(data, n=args.images, seed=0, shard_rows=250)
        port, dashboard_port = local_cluster.free_ports(2)
        cli = [sys.executable, str(REPO / "cluster" / "local.py"), "--port", str(port)]
        t0 = time.monotonic()
        out = subprocess.run([*cli, "start", "--workers", "1", "--dashboard-port", str(dashboard_port)],
                             capture_output=True, text=True, check=True)
        start_s = time.monotonic() - t0
        dashboard = json.loads(out.stdout)["dashboard"]
        try:
            calm = run_job(dashboard, data, runs, "calm", args.epochs, None)
            hit = run_job(dashboard, data, runs, "node-lost", args.epochs, [*cli, "kill-node", "1"])
        finally:
            t0 = time.monotonic()
            subprocess.run([*cli, "stop", "--remove"], capture_output=True, check=True)
            stop_s = time.monotonic() - t0
    print(f"cluster start (head + 1 worker node): {start_s:.1f} s   stop: {stop_s:.1f} s")
    print(f"2-worker job, {args.epochs} epochs, {args.images} images: undisturbed {calm[0]:.1f} s "
          f"({calm[1]} attempt); worker node killed after epoch 0: {hit[0]:.1f} s ({hit[1]} attempts)")
    print(f"ratio node-lost / undisturbed wall time: {hit[0] / calm[0]:.2f}")
    print(f"kill -> restarted worker group: {hit[2]:.0f} s; epochs trained twice: {hit[3]}")


if __name__ == "__main__":
    main()
