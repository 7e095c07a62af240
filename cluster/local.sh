#!/usr/bin/env bash
# A two-node Ray cluster on one machine (head + one worker node), for trying
# `ray job submit` and multi-node placement without a real cluster.
#   cluster/local.sh start   -> head on 127.0.0.1:6379, dashboard on http://127.0.0.1:8265
#   cluster/local.sh stop
# Ray 2.60 turns token authentication on: the CLI needs RAY_AUTH_MODE=token (exported below
# when you `source` this file's output hint). The dashboard stays on 127.0.0.1 only.
set -euo pipefail
RAY=${RAY:-ray}
case "${1:-}" in
  start)
    "$RAY" start --head --dashboard-host 127.0.0.1 --num-cpus "${HEAD_CPUS:-2}" \
      --memory "${HEAD_MEMORY:-8000000000}" --object-store-memory "${HEAD_OBJECT_STORE:-2000000000}"
    if [ "${WORKER_NODE:-1}" = 1 ]; then
      # Second node on the same machine: its agents need their own ports.
      "$RAY" start --address=127.0.0.1:6379 --num-cpus "${WORKER_CPUS:-1}" \
        --memory "${WORKER_MEMORY:-4000000000}" --object-store-memory "${WORKER_OBJECT_STORE:-1000000000}" \
        --dashboard-agent-listen-port=52366 --dashboard-agent-grpc-port=0 \
        --runtime-env-agent-port=0 --metrics-export-port=0
    fi
    echo "export RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265  # then: ray job submit --working-dir . -- python train_job.py"
    ;;
  stop)
    "$RAY" stop --force
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
