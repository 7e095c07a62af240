"""What t2i reads from Ray and decides from it, without a cluster: CPUs per worker from the
cluster's shape, the CUDA preflight's message, loud failures of Ray's internal APIs."""

import pytest
import torch

from t2i.runtime import ray_env
from t2i.runtime.ray_env import NodeShape, choose_cpus_per_worker


def test_cpus_per_worker_follow_the_cluster():
    # This machine (2 CPUs): the small-machine profile, whatever else is known.
    assert choose_cpus_per_worker(0, False, 1, 2, [NodeShape(2, 0)])[0] == 0.45
    assert choose_cpus_per_worker(0, True, 1, 4, [NodeShape(2, 1)])[0] == 0.45
    # A g5.2xlarge GPU node (8 CPUs, 1 GPU) beside a CPU head: 6 CPUs per worker, 2 left to decode data.
    cpus, why = choose_cpus_per_worker(0, True, 2, 12, [NodeShape(4, 0), NodeShape(8, 1), NodeShape(8, 1)])
    assert cpus == 6 and "GPU node" in why
    # A node with 4 GPUs and 48 CPUs: 9 per GPU worker.
    assert choose_cpus_per_worker(0, True, 4, 48, [NodeShape(48, 4)])[0] == 9
    # GPU nodes all down and not described: one CPU, and the line says why.
    cpus, why = choose_cpus_per_worker(0, True, 2, 8, [NodeShape(8, 0)])
    assert cpus == 1 and "no GPU node" in why
    # CPU clusters: a share of the workers' part of the cluster, at most one node's.
    assert choose_cpus_per_worker(0, False, 4, 64, [NodeShape(16, 0)] * 4)[0] == 12
    assert choose_cpus_per_worker(0, False, 8, 64, [NodeShape(16, 0)] * 4)[0] == 6
    # Half a GPU per worker (train.gpus_per_worker = 0.5): half the CPUs, and the line says so.
    cpus, why = choose_cpus_per_worker(0, True, 1, 12, [NodeShape(4, 0), NodeShape(8, 1)], gpu_share=0.5)
    assert cpus == 3 and why.endswith("per GPU x 0.5")
    # A number the user set always wins.
    assert choose_cpus_per_worker(3, True, 2, 64, [NodeShape(8, 1)]) == (3, "set")


def test_the_gpu_preflight_names_node_driver_and_cuda_build():
    if torch.cuda.is_available():
        pytest.skip("this machine has a working CUDA: nothing to refuse")
    problem = ray_env.cuda_problem()
    assert problem.startswith("a GPU was granted but CUDA is unusable on node ")
    assert "NVIDIA driver not found" in problem or "NVIDIA driver " in problem
    assert f"torch {torch.__version__} built for CUDA {torch.version.cuda}" in problem
    if torch.version.cuda and torch.version.cuda.startswith("13"):
        assert "(needs driver >= 580)" in problem
    assert len(problem) < 200  # the failure line on the driver's console keeps 200 characters


def test_private_ray_apis_fail_loudly_not_silently(capsys, monkeypatch):
    monkeypatch.setattr(ray_env, "_warned", set())

    def gone():
        raise AttributeError("module 'ray._private.state' has no attribute 'state'")

    assert ray_env.private_api("cluster config", gone, "fallback") == "fallback"
    assert ray_env.private_api("cluster config", gone, "fallback") == "fallback"
    out = capsys.readouterr().out
    assert out.count("warning") == 1 and "cluster config failed (AttributeError" in out
    assert f"written for Ray {ray_env.RAY_WRITTEN_FOR}.x" in out


def test_auto_gpu_says_so_when_it_cannot_ask_the_autoscaler(capsys, monkeypatch):
    monkeypatch.setattr(ray_env, "_warned", set())
    monkeypatch.setattr(ray_env.ray, "cluster_resources", lambda: {"CPU": 64.0})

    def broken():
        raise RuntimeError("GCS API changed")

    monkeypatch.setattr(ray_env.ray._private.state.state, "get_max_resources_from_cluster_config", broken)
    assert ray_env.use_gpu("auto", 2) is False
    out = capsys.readouterr().out
    assert "autoscaler limits" in out and "training on CPU; set train.use_gpu=true" in out
