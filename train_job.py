"""Train a text-to-image model on Ray: `python train_job.py [--config NAME|FILE] [--set k=v ...]`.

The same as `t2i train`. With no --data / data.path it prepares the built-in shapes set
(cached) and trains on it. On a cluster: `ray job submit --runtime-env cluster/runtime_env.yaml
--working-dir . -- python train_job.py --data s3://bucket/f8k --set train.storage_path=s3://bucket/runs`
(cluster/README.md). The last line printed is one JSON object: run dir, best and latest
checkpoints, metrics.
"""

import sys

from t2i.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
