"""The cluster path: configs that Ray/KubeRay accept, safe defaults, storage URIs, and a
real two-node cluster on this machine (jobs, placement, dashboard, node loss)."""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

sys.path.insert(0, str(REPO / "cluster"))
import local as local_cluster

from t2i import storage
from t2i.training.checkpoint import CheckpointError, read_state

LAUNCHER_CONFIGS = sorted(p for p in (REPO / "cluster").glob("*.yaml") if "provider" in yaml.safe_load(p.read_text()))
K8S_MANIFESTS = sorted((REPO / "cluster" / "k8s").glob("*.yaml"))
RAY_PORTS = {6379, 8265, 10001}


# ----------------------------------------------------------------------------- launcher configs
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def validate_launcher_config(config: dict) -> None:
    """What `ray up` checks before touching a cloud: Ray's JSON schema on the file as written,
    then again after Ray fills in its provider defaults."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))


def test_launcher_configs_pass_rays_schema():
    assert {p.name for p in LAUNCHER_CONFIGS} >= {"aws.yaml", "onprem.yaml"}
    for path in LAUNCHER_CONFIGS:
        config = yaml.safe_load(path.read_text())
        validate_launcher_config(config)
        assert any("requirements.txt" in c for c in config["setup_commands"]), path.name
        # Never ship Flickr8k; anchored to the top, so the code's own t2i/data package still goes.
        assert {"/data", "/runs", ".venv"} <= set(config["rsync_exclude"]), path.name
        assert not {"data", "runs"} & set(config["rsync_exclude"]), path.name
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    from ray._private.thirdparty.pathspec import PathSpec  # what `ray job submit` matches excludes with

    excluded = PathSpec.from_lines("gitwildmatch", runtime_env["excludes"]).match_file
    assert all(excluded(f) for f in ("data/f8k/train/part-00000.parquet", "runs/x/model.pt", ".venv/bin/python",
                                     ".git/HEAD"))  # job uploads: code only
    assert not any(excluded(str(f.relative_to(REPO))) for f in (REPO / "t2i").rglob("*.py"))
    assert set(runtime_env) <= {"excludes", "env_vars"}  # the working dir comes from --working-dir
    aws = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    workers = [t for name, t in aws["available_node_types"].items() if name != aws["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # a GPU instance family
    # Every node type reads the bucket (Ray Data tasks and checkpoints run on the workers), each
    # with its own scoped instance profile rather than the launcher's default (head only).
    profiles = {name: t["node_config"]["IamInstanceProfile"]["Arn"] for name, t in aws["available_node_types"].items()}
    assert sorted(p.rsplit("/", 1)[1] for p in profiles.values()) == ["t2i-ray-head", "t2i-ray-worker"]
    data_policy = json.loads((REPO / "cluster" / "iam" / "t2i-data-access.json").read_text())
    for statement in data_policy["Statement"]:
        assert all(a.startswith("s3:") and a != "s3:*" for a in statement["Action"])
        assert statement["Resource"].startswith("arn:aws:s3:::YOUR-BUCKET")  # one bucket, never "*"
    head_policy = json.loads((REPO / "cluster" / "iam" / "t2i-head-autoscaler.json").read_text())
    assert not any("s3" in str(st["Action"]) for st in head_policy["Statement"])
    # The check can fail: a typo'd key and a negative resource are rejected.
    import jsonschema

    for break_it in (lambda c: c.__setitem__("max_worker", 3),
                     lambda c: c["available_node_types"]["head"].__setitem__("resources", {"CPU": -1})):
        broken = copy.deepcopy(aws)
        break_it(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate_launcher_config(broken)


# ----------------------------------------------------------------------------- KubeRay manifests
def kuberay_problems(doc: dict) -> list[str]:
    """Fields KubeRay's v1 CRDs require (or that t2i relies on), as readable problems."""
    problems = []
    kind = doc.get("kind")
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"{kind}: apiVersion must be ray.io/v1")
    if not doc.get("metadata", {}).get("name"):
        problems.append(f"{kind}: metadata.name missing")
    spec = doc.get("spec") or {}
    if kind == "RayJob":
        if not spec.get("entrypoint"):
            problems.append("RayJob: spec.entrypoint missing")
        if "rayClusterSpec" not in spec and "clusterSelector" not in spec:
            problems.append("RayJob: needs spec.rayClusterSpec or spec.clusterSelector")
        spec = spec.get("rayClusterSpec") or {}
    if kind == "RayService":
        if not spec.get("serveConfigV2"):
            problems.append("RayService: spec.serveConfigV2 missing")
        spec = spec.get("rayClusterConfig") or {}
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + [f"{kind}: headGroupSpec missing"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"{kind}: head serviceType {head['serviceType']} exposes the unauthenticated dashboard")
    groups = [("head", head)] + [(g.get("groupName"), g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        if not name:
            problems.append(f"{kind}: a workerGroupSpec has no groupName")
        if not isinstance(group.get("rayStartParams"), dict):
            problems.append(f"{kind}/{name}: rayStartParams must be a mapping")
        pod = (group.get("template") or {}).get("spec") or {}
        containers = pod.get("containers") or []
        if not containers:
            problems.append(f"{kind}/{name}: template.spec.containers missing")
        for container in containers:
            if not container.get("name") or not container.get("image"):
                problems.append(f"{kind}/{name}: every container needs name and image")
            if not (container.get("resources") or {}).get("limits"):
                problems.append(f"{kind}/{name}: container resources.limits missing")
            names = {e.get("name") for e in container.get("env") or []}
            if names & STATIC_KEYS or any("secretRef" in e for e in container.get("envFrom") or []):
                problems.append(f"{kind}/{name}: static cloud keys in the pod spec (use a service account: IRSA)")
        if pod.get("hostNetwork"):
            problems.append(f"{kind}/{name}: hostNetwork would expose Ray's ports on the node")
        if name != "head":
            low, count, high = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 2**31)
            if not low <= count <= high:
                problems.append(f"{kind}/{name}: needs minReplicas <= replicas <= maxReplicas")
    return problems


STATIC_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS"}


def k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in K8S_MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def test_kuberay_manifests_are_complete_and_private():
    import ray

    docs = k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"RayCluster", "RayJob", "RayService", "NetworkPolicy"} <= kinds
    for name, doc in docs:
        if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
            assert kuberay_problems(doc) == [], name
            spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
            assert spec["rayVersion"] == ray.__version__, name
            workers = spec["workerGroupSpecs"]
            assert any("nvidia.com/gpu" in c["resources"]["limits"]
                       for g in workers for c in g["template"]["spec"]["containers"]), f"{name}: no GPU workers"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", name
    # The RayJob reaches S3 as the t2i-ray service account (IRSA / workload identity).
    job = next(d for _, d in docs if d["kind"] == "RayJob")["spec"]["rayClusterSpec"]
    service = next(d for _, d in docs if d["kind"] == "RayService")["spec"]["rayClusterConfig"]
    pods = [job["headGroupSpec"]] + job["workerGroupSpecs"] + [service["headGroupSpec"]] + service["workerGroupSpecs"]
    assert {g["template"]["spec"].get("serviceAccountName") for g in pods} == {"t2i-ray"}
    account = next(d for _, d in docs if d["kind"] == "ServiceAccount")
    assert account["metadata"]["name"] == "t2i-ray" and "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    broken = copy.deepcopy(next(d for _, d in docs if d["kind"] == "RayCluster"))
    del broken["spec"]["workerGroupSpecs"][0]["groupName"]
    broken["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"name": "s3"}}]
    assert len(kuberay_problems(broken)) == 3


def test_rayjob_entrypoint_is_a_valid_training_command():
    """The manifest's command line parses with train_job's own parser and config keys."""
    import shlex

    from t2i import config as config_lib

    job = next(d for _, d in k8s_docs() if d["kind"] == "RayJob")
    command = job["spec"]["entrypoint"].split("&&")[-1]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "train_job.py"]
    from t2i.cli import TRAIN

    args, overrides = TRAIN.parse(argv[2:])
    cfg = config_lib.load(args.config, overrides)
    assert cfg.train.num_workers == 2 and storage.is_uri(cfg.train.storage_path)


def test_versions_agree_across_requirements_images_and_manifests():
    import ray

    pinned = next(line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("ray["))
    assert pinned.endswith(f"=={ray.__version__}")
    tag = f"rayproject/ray:{ray.__version__}-py311"
    assert tag in (REPO / "cluster" / "Dockerfile").read_text()
    assert tag in (REPO / "cluster" / "aws.yaml").read_text()
    # What nodes and the image install carries no test tools (those live in requirements-dev.txt).
    runtime = (REPO / "requirements.txt").read_text()
    assert "pytest" not in runtime and "moto" not in runtime
    assert "requirements-dev" not in (REPO / "cluster" / "Dockerfile").read_text()


# ----------------------------------------------------------------------------- security defaults
def test_nothing_listens_on_all_interfaces_by_default():
    files = [*REPO.glob("cluster/**/*"), *REPO.glob("t2i/**/*.py"), REPO / "train_job.py", REPO / "tune_search.py"]
    for path in files:
        if path.is_file() and path.suffix in (".py", ".yaml", ".sh", "") and "__pycache__" not in path.parts:
            text = path.read_text(errors="replace")
            assert "0.0.0.0" not in text.replace("0.0.0.0/0", ""), f"{path} binds or opens 0.0.0.0"
    for path in LAUNCHER_CONFIGS:
        config = yaml.safe_load(path.read_text())
        head_start = " ".join(config["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in head_start, path.name
        for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
            opened = set(range(rule["FromPort"], rule["ToPort"] + 1))
            assert not opened & RAY_PORTS, f"{path.name} opens Ray's ports"
            assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", [])), f"{path.name}: world-open"


def test_every_torch_load_is_weights_only():
    calls = 0
    for path in REPO.glob("t2i/**/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" \
                    and getattr(node.func.value, "id", None) == "torch":
                calls += 1
                flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                assert flags.get("weights_only") is True, f"{path}:{node.lineno} torch.load without weights_only=True"
    assert calls >= 2


class Payload:
    """Stands in for a malicious object: unpickling it would run code."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    import torch

    torch.save({"format": "t2i-checkpoint/1", "model": Payload()}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_state(tmp_path / "model.pt")


# ----------------------------------------------------------------------------- storage
def test_storage_functions_take_paths_and_uris(tmp_path):
    for base in (str(tmp_path / "plain"), f"file://{tmp_path}/uri"):
        target = storage.join(base, "a", "b.txt")
        assert not storage.is_file(target) and storage.list_names(base) == []
        storage.write_text(target, "hello")
        assert storage.read_text(target) == "hello" and storage.size(target) == 5
        assert storage.is_dir(storage.join(base, "a")) and storage.list_names(storage.join(base, "a")) == ["b.txt"]
    assert storage.join("s3://bucket/runs?endpoint_override=x", "r", "m.pt") == "s3://bucket/runs/r/m.pt?endpoint_override=x"
    assert storage.absolute("s3://bucket/runs/") == "s3://bucket/runs"


def test_node_local_storage_is_refused_only_on_multi_host_clusters():
    mounts = "/dev/sda1 / ext4 rw 0 0\nnfs:/export /mnt/shared nfs4 rw 0 0\n"
    assert storage.mount_fs_type("/mnt/shared/runs", mounts) == "nfs4"
    assert storage.mount_fs_type("/home/me/runs", mounts) == "ext4"
    two_hosts = {"10.0.0.1", "10.0.0.2"}
    problem = storage.node_local_problem("/home/me/runs", "train.storage_path", two_hosts, "ext4")
    assert "train.storage_path" in problem and "2 hosts" in problem and "s3://" in problem
    assert storage.node_local_problem("file:///home/me/runs", "x", two_hosts, "ext4")
    assert storage.node_local_problem("/home/me/runs", "x", {"10.0.0.1"}, "ext4") is None  # one machine
    assert storage.node_local_problem("/mnt/shared/runs", "x", two_hosts, "nfs4") is None
    assert storage.node_local_problem("s3://bucket/runs", "x", two_hosts, "unknown") is None


def test_training_refuses_a_local_disk_on_a_multi_host_cluster(monkeypatch, tmp_path):
    import ray

    from t2i import config as config_lib
    from t2i.training.driver import check_cluster_storage

    nodes = [{"Alive": True, "NodeManagerAddress": "10.0.0.1"}, {"Alive": True, "NodeManagerAddress": "10.0.0.2"}]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(storage, "mount_fs_type", lambda path: "ext4")
    cfg = config_lib.load(None)
    with pytest.raises(config_lib.ConfigError, match="train.storage_path .* own disk .* 2 hosts"):
        check_cluster_storage(cfg, {"data.path": "s3://b/f8k", "train.storage_path": str(tmp_path)})
    check_cluster_storage(cfg, {"data.path": "s3://b/f8k", "train.storage_path": "s3://b/runs"})
    check_cluster_storage(config_lib.load(None, ["train.assume_shared_storage=true"]),
                          {"train.storage_path": str(tmp_path)})
    nodes[1]["Alive"] = False  # one host left: its disk is shared by all its nodes
    check_cluster_storage(cfg, {"train.storage_path": str(tmp_path)})


def test_train_and_generate_with_data_and_runs_in_s3(s3_server, shapes_dir, tmp_path):
    import pyarrow.fs as pafs

    s3, _ = pafs.FileSystem.from_uri("s3://t2i-test")
    pafs.copy_files(str(shapes_dir), "t2i-test/data/shapes", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3)
    env = {**os.environ, **s3_server, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    job = subprocess.run(
        [sys.executable, "train_job.py", "--smoke-test", "--data", "s3://t2i-test/data/shapes",
         "--set", "train.storage_path=s3://t2i-test/runs", "--set", "train.name=s3run", "--set", "train.num_workers=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stderr[-3000:]
    summary = json.loads(job.stdout.strip().splitlines()[-1])
    assert summary["epochs_done"] == 2 and summary["best_checkpoint"].startswith("s3://t2i-test/runs/s3run/")
    names = set(storage.list_names("s3://t2i-test/runs/s3run"))
    assert {"metrics.csv", "metrics.jsonl", "workers.json", "samples"} <= names
    assert {"epoch_000.png", "epoch_001.png", "loss_curve.png"} <= set(storage.list_names("s3://t2i-test/runs/s3run/samples"))
    out = tmp_path / "grid.png"
    gen = subprocess.run([sys.executable, "-m", "t2i", "generate", "--checkpoint", summary["best_checkpoint"],
                          "--out", str(out), "a red circle"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert out.stat().st_size > 0
    ev = subprocess.run([sys.executable, "-m", "t2i", "evaluate", "--checkpoint", summary["best_checkpoint"],
                         "--data", "s3://t2i-test/data/shapes", "--samples", "1", "--max-pairs", "40"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout)["splits"]["test"]["results"]["model_mean"]["mse"] > 0
    assert storage.is_file("s3://t2i-test/data/shapes/alignment_judge.pt")  # cached beside the data


# ----------------------------------------------------------------------------- a real local cluster
def submit(dashboard: str, *entrypoint: str, wait: bool = True, submission_id: str | None = None):
    return local_cluster.submit_job(dashboard, list(entrypoint), REPO, wait=wait, submission_id=submission_id)


job_status = local_cluster.job_status
api = local_cluster.dashboard_get


def last_json_line(text: str) -> dict:
    return json.loads(next(line for line in reversed(text.splitlines()) if line.startswith("{")))


@pytest.fixture
def two_node_cluster():
    port, dashboard_port = local_cluster.free_ports(2)
    state = Path(f"/tmp/t2i-cluster-{port}")
    cli = [sys.executable, str(REPO / "cluster" / "local.py"), "--port", str(port)]
    started = subprocess.run([*cli, "start", "--workers", "1", "--dashboard-port", str(dashboard_port),
                              "--head-cpus", "2", "--worker-cpus", "1"], capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        yield {"cli": cli, "dashboard": json.loads(started.stdout)["dashboard"], "state": state / "state.json",
               "nodes": {n["name"]: n["node_id"] for n in json.loads((state / "state.json").read_text())["nodes"]}}
    finally:
        pids = [n["pid"] for n in json.loads((state / "state.json").read_text())["nodes"]]
        stopped = subprocess.run([*cli, "stop", "--grace", "3", "--remove"], capture_output=True, text=True,
                                 timeout=120)
        assert json.loads(stopped.stdout)["still_running"] == [], stopped.stderr
        assert not any(local_cluster.session_members(pid) for pid in pids)  # no process of ours is left
        assert not state.exists()


def test_a_local_clusters_ports_are_distinct_and_avoid_the_ones_it_was_given():
    """Every node pins its own ports; one port picked twice stops the node (`ray start`: 'used by
    other components'), which a bind-and-release picker allows."""
    head = local_cluster.free_ports(len(local_cluster.HEAD_PORTS))
    nodes = local_cluster.free_ports(300, avoid=tuple(head))
    assert len(set(head)) == len(head) and len(set(nodes)) == 300
    assert not set(head) & set(nodes)


def test_two_node_cluster_jobs_placement_dashboard_and_node_loss(two_node_cluster, shapes_dir, tmp_path):
    dashboard, nodes = two_node_cluster["dashboard"], two_node_cluster["nodes"]
    assert set(nodes) == {"head", "worker1"} and all(nodes.values())
    common = ["--data", str(shapes_dir), "--set", f"train.storage_path={tmp_path}"]

    # Two workers spread over both nodes; worker node 1 dies after the first checkpoint.
    run_dir = tmp_path / "spread"
    submit(dashboard, "python", "train_job.py", "--smoke-test", *common, "--set", "train.name=spread",
           "--set", "train.num_workers=2", "--set", "train.placement_strategy=SPREAD", "--set", "train.epochs=4",
           "--set", "train.max_failures=2", wait=False, submission_id="t2i-spread")
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("checkpoint_*/meta.json")):
        assert time.monotonic() < deadline and job_status(dashboard, "t2i-spread") in ("PENDING", "RUNNING")
        time.sleep(0.5)
    first_attempt = json.loads((run_dir / "workers.json").read_text())[0]["workers"]
    assert {w["node_id"] for w in first_attempt} == {nodes["head"], nodes["worker1"]}

    # While the job runs, what listens beyond loopback is only what local.py pinned for each
    # node (cluster/README.md, Security) or Ray's core-worker range; never the dashboard.
    state = json.loads(two_node_cluster["state"].read_text())
    sockets = local_cluster.listening_sockets(state)
    assert {s["node"] for s in sockets} == {"head", "worker1"}
    pinned = {port for node in state["nodes"] for port in node["ports"].values()}
    low, high = local_cluster.WORKER_PORTS
    exposed = [s for s in sockets if not local_cluster.is_loopback(s["address"])]
    # A training worker's other ports are torch.distributed's (TCPStore rendezvous, gloo): random.
    unexpected = [s for s in exposed if s["port"] not in pinned and not low <= s["port"] <= high
                  and not s["process"].startswith("ray::RayTrainWorker")]
    assert unexpected == [], f"listening beyond loopback on ports local.py did not pin: {unexpected}"
    dashboard_port = int(dashboard.rsplit(":", 1)[1])
    assert dashboard_port not in {s["port"] for s in exposed} and dashboard_port in {s["port"] for s in sockets}
    # Until the node loss, the job's dashboard page shows no failed task (the state API, as
    # `ray list tasks --filter state=FAILED` asks it, with the cluster's token): Ray
    # Data's Parquet footer readers and t2i's epoch-line relay each used to leave dozens.
    failed = api(dashboard, "/api/v0/tasks?filter_keys=state&filter_predicates=%3D&filter_values=FAILED&limit=100")
    assert failed["data"]["result"]["result"] == [], [(t["name"], t.get("error_type"))
                                                       for t in failed["data"]["result"]["result"]]
    killed = subprocess.run([*two_node_cluster["cli"], "kill-node", "1"], capture_output=True, text=True, timeout=60)
    assert killed.returncode == 0, killed.stderr
    while (status := job_status(dashboard, "t2i-spread")) in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline + 300, "job did not finish after the node loss"
        time.sleep(1)
    logs = api(dashboard, "/api/jobs/t2i-spread/logs")["logs"]
    assert status == "SUCCEEDED", logs[-3000:]
    assert last_json_line(logs)["error"] is None and "t2i: worker failure (rank" in logs
    assert "Ray Train restarts the workers from the latest checkpoint" in logs
    attempts = json.loads((run_dir / "workers.json").read_text())
    assert len(attempts) >= 2 and {w["node_id"] for w in attempts[-1]["workers"]} == {nodes["head"]}
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]  # each epoch once: the restart resumed, it did not start over

    # The dashboard shows both jobs and the Train runs.
    assert {"t2i-spread"} <= {j.get("submission_id") for j in api(dashboard, "/api/jobs/")}
    runs = api(dashboard, "/api/train/v2/runs/v1")["train_runs"]
    assert "spread" in {r["name"] for r in runs}


def test_onprem_pins_every_ray_port_and_the_firewall_table_lists_them():
    """Ray's gRPC servers listen on every interface, so on machines with reachable addresses
    the firewall is the lock: every port Ray opens must be pinned (no random ones) and listed
    in cluster/README.md's firewall table."""
    import re

    config = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    per_node = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-grpc-port",
                "--dashboard-agent-listen-port", "--metrics-export-port", "--runtime-env-agent-port",
                "--min-worker-port", "--max-worker-port"]
    ports = set()
    for command, flags in ((head, per_node + ["--port", "--ray-client-server-port"]), (worker, per_node)):
        for flag in flags:
            found = re.search(rf"{flag}=(\d+)", command)
            assert found, f"{flag} not pinned in: {command}"
            ports.add(int(found.group(1)))
    for variable in ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT"):  # the head's Prometheus servers
        found = re.search(rf"{variable}=(\d+)", head)
        assert found, f"{variable} not set in: {head}"
        ports.add(int(found.group(1)))
    assert "--dashboard-host=127.0.0.1" in head
    table = (REPO / "cluster" / "README.md").read_text().split("**Firewall**", 1)[1].split("* checkpoints", 1)[0]
    listed = set()
    for cell in re.findall(r"^  \| ([\d, -]+) \|", table, re.M):
        for part in cell.split(","):
            low, _, high = part.strip().partition("-")
            listed |= set(range(int(low), int(high or low) + 1))
    assert ports <= listed, sorted(ports - listed)


# ----------------------------------------------------------------------------- a cluster, not a laptop
def ray_clusters_in_k8s() -> list[tuple[str, dict, dict]]:
    """(file, resource, its RayCluster spec) for every Ray cluster the manifests create."""
    found = []
    for name, doc in k8s_docs():
        if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
            found.append((name, doc, doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig")
                          or doc["spec"]))
    return found


def pod_groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def test_every_shipped_cluster_turns_token_auth_on():
    for path in LAUNCHER_CONFIGS:
        config = yaml.safe_load(path.read_text())
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            start = next(c for c in config[key] if " start " in c)
            assert start.index("RAY_AUTH_MODE=token") < start.index("ray start"), f"{path.name} {key}: {start}"
        # The same token on every node: the one `ray get-auth-token --generate` wrote where `ray up` runs.
        assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", path.name
    for name, doc, spec in ray_clusters_in_k8s():
        assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: {doc['kind']} without token auth"
    docs = (REPO / "cluster" / "README.md").read_text()
    assert "ray get-auth-token" in docs and "RAY_AUTH_MODE=token" in docs


def test_every_ray_cluster_in_k8s_has_its_network_policy():
    policies = [doc for _, doc in k8s_docs() if doc["kind"] == "NetworkPolicy"]
    for name, _, spec in ray_clusters_in_k8s():
        labels = [g["template"].get("metadata", {}).get("labels", {}).get("t2i/cluster") for g in pod_groups(spec)]
        assert len(set(labels)) == 1 and labels[0], f"{name}: every pod of a cluster carries one t2i/cluster label"
        mine = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].get("t2i/cluster") == labels[0]]
        assert len(mine) == 1, f"{name}: no NetworkPolicy selects t2i/cluster={labels[0]}"
        rules = mine[0]["spec"]["ingress"]
        assert all(rule.get("from") for rule in rules), f"{name}: an ingress rule open to every source"
        ray_rule = next(r for r in rules if "ports" not in r)  # Ray's ports: own pods and the operator only
        sources = [src.get("podSelector", {}).get("matchLabels") for src in ray_rule["from"]]
        assert sources == [{"t2i/cluster": labels[0]}, {"app.kubernetes.io/name": "kuberay-operator"}], name
        assert "kuberay-system" not in json.dumps(mine[0]), f"{name}: the operator's namespace is hard-coded"
        # Code and credentials: the t2i-ray service account, and images that never go stale on a node.
        for group in pod_groups(spec):
            assert group["template"]["spec"].get("serviceAccountName") == "t2i-ray", name
            for container in group["template"]["spec"]["containers"]:
                assert container.get("imagePullPolicy") == "Always" or "@sha256:" in container["image"], name


def test_kubernetes_jobs_release_gpus_and_services_scale():
    job = next(doc for _, doc, _ in ray_clusters_in_k8s() if doc["kind"] == "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] and job["ttlSecondsAfterFinished"] <= 300  # no idle GPU hour
    service = next(doc for _, doc, _ in ray_clusters_in_k8s() if doc["kind"] == "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    if any(g["maxReplicas"] > g["replicas"] for g in cluster["workerGroupSpecs"]):
        assert cluster.get("enableInTreeAutoscaling") is True  # else KubeRay never adds the pods
        (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
        assert app["args"]["max_replicas"] > app["args"]["replicas"]  # and Serve asks for them


def test_cluster_configs_leave_small_machine_settings_to_t2i():
    """0.45 CPU per worker, one Parquet footer reader and data CPU caps suit a 2-core machine and
    starve a cluster: t2i chooses them itself where the whole cluster is that small."""
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    job = next(doc for _, doc, _ in ray_clusters_in_k8s() if doc["kind"] == "RayJob")["spec"]
    for text in (json.dumps(runtime_env), job["runtimeEnvYAML"], job["entrypoint"]):
        for setting in ("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "cpus_per_worker", "data_cpu_limit"):
            assert setting not in text
    from t2i.config import Config

    assert Config().train.cpus_per_worker == 0  # auto: chosen from the cluster's shape


def test_gpu_nodes_boot_a_driver_that_fits_the_torch_build():
    import torch

    aws = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    for name, node_type in aws["available_node_types"].items():
        image = node_type["node_config"].get("ImageId", "")
        # Not the launcher's default (a CUDA 11.2-era Deep Learning AMI): a current NVIDIA driver.
        assert "base-oss-nvidia-driver" in image or image.startswith("ami-"), name
    readme = (REPO / "cluster" / "README.md").read_text()
    assert "First GPU run" in readme
    if torch.version.cuda:  # the wheel requirements.txt pins, and the driver it needs, as the README says
        major = torch.version.cuda.split(".")[0]
        from t2i.runtime.ray_env import MIN_DRIVER_FOR_CUDA

        assert f"CUDA {major}" in readme and f">= {MIN_DRIVER_FOR_CUDA[major]}" in readme


def test_onprem_nodes_run_the_venvs_ray_and_python():
    config = yaml.safe_load((REPO / "cluster" / "onprem.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if " start " in c)
        # Ray runs a job's entrypoint in a shell with the node's PATH: `python` must be the venv's.
        assert 'export PATH="$HOME/t2i/.venv/bin:$PATH"' in start and start.index("PATH=") < start.index("ray start")


@pytest.fixture()
def gpu_shaped_cluster():
    """A head (2 CPUs) and one worker node declaring a g5.2xlarge's shape (8 CPUs, 1 GPU)."""
    port, dashboard_port = local_cluster.free_ports(2)
    state = Path(f"/tmp/t2i-cluster-{port}")
    cli = [sys.executable, str(REPO / "cluster" / "local.py"), "--port", str(port)]
    started = subprocess.run([*cli, "start", "--workers", "1", "--dashboard-port", str(dashboard_port),
                              "--head-cpus", "2", "--worker-cpus", "8", "--worker-gpus", "1"],
                             capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        yield {"dashboard": json.loads(started.stdout)["dashboard"],
               "nodes": {n["name"]: n["node_id"] for n in json.loads((state / "state.json").read_text())["nodes"]}}
    finally:
        subprocess.run([*cli, "stop", "--grace", "3", "--remove"], capture_output=True, text=True, timeout=120)


def test_a_gpu_cluster_gets_gpu_workers_and_a_clear_stop_without_cuda(gpu_shaped_cluster, shapes_dir, tmp_path):
    """use_gpu = "auto" on a cluster whose node declares a GPU: one GPU and 75% of the node's
    CPUs per worker, placed on the GPU node; this machine has no CUDA, so the worker's
    preflight stops the run with one line naming the node, its driver and torch's CUDA."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a working CUDA: the preflight would pass")
    dashboard = gpu_shaped_cluster["dashboard"]
    job = submit(dashboard, "python", "train_job.py", "--smoke-test", "--data", str(shapes_dir),
                 "--set", f"train.storage_path={tmp_path}", "--set", "train.name=gpu", "--set", "train.max_failures=0",
                 submission_id="t2i-gpu")
    logs = job.stdout + job.stderr
    assert job_status(dashboard, "t2i-gpu") == "FAILED", logs[-3000:]
    assert "1 worker x 6 CPU (75% of a GPU node's 8 CPUs per GPU) on GPU" in logs, logs[-3000:]
    assert "a GPU was granted but CUDA is unusable on node" in logs and "NVIDIA driver not found" in logs, logs[-4000:]
    assert f"built for CUDA {torch.version.cuda}" in logs
    # What Ray was asked for: the worker's bundle, on the node that has the GPU.
    groups = [g for g in local_cluster.dashboard_get(dashboard, "/api/v0/placement_groups?detail=1&limit=100")
              ["data"]["result"]["result"] if any("GPU" in b.get("unit_resources", {}) for b in g.get("bundles", []))]
    assert groups, "no placement group asked for a GPU"
    bundle = next(b for b in groups[-1]["bundles"] if "GPU" in b["unit_resources"])
    assert bundle["unit_resources"] == {"CPU": 6.0, "GPU": 1.0}
    assert bundle.get("node_id") in (None, gpu_shaped_cluster["nodes"]["worker1"])
    # Half a GPU per worker (two runs or Tune trials per GPU): half the CPUs and a 0.5-GPU bundle.
    job = submit(dashboard, "python", "train_job.py", "--smoke-test", "--data", str(shapes_dir),
                 "--set", f"train.storage_path={tmp_path}", "--set", "train.name=gpu-half", "--set", "train.max_failures=0",
                 "--set", "train.gpus_per_worker=0.5", submission_id="t2i-gpu-half")
    logs = job.stdout + job.stderr
    assert job_status(dashboard, "t2i-gpu-half") == "FAILED", logs[-3000:]
    assert "1 worker x 3 CPU (75% of a GPU node's 8 CPUs per GPU x 0.5) on 0.5 GPU each" in logs, logs[-3000:]
    groups = [g for g in local_cluster.dashboard_get(dashboard, "/api/v0/placement_groups?detail=1&limit=100")
              ["data"]["result"]["result"] if any("GPU" in b.get("unit_resources", {}) for b in g.get("bundles", []))]
    assert {"CPU": 3.0, "GPU": 0.5} in [b["unit_resources"] for g in groups for b in g["bundles"]]
