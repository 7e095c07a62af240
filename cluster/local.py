#!/usr/bin/env python3
"""A Ray cluster of one head and N worker nodes on this machine, for trying multi-node
training, `ray job submit` and node failures without renting machines.

    python cluster/local.py start --workers 1     # head + 1 worker node; prints what to export
    python cluster/local.py status                # nodes of this cluster, alive or not
    python cluster/local.py kill-node 1           # crash drill: SIGKILL worker node 1 and its workers
    python cluster/local.py stop                  # stops exactly the nodes started here

Each node is one `ray start --block` process leading its own session, with its own temp
dir and free ports, so two such clusters (or a test's `ray.init()`) can share the machine
and `stop` never touches Ray processes it did not start (unlike `ray stop`). The dashboard,
job API and client server listen on 127.0.0.1 only: they have no authentication beyond
Ray's token, and nothing here opens them to the network. State lives in --state
(default /tmp/t2i-cluster-<port>: short, because Ray's socket paths must stay < 108 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def free_ports(count: int, avoid: tuple[int, ...] = ()) -> list[int]:
    """`count` distinct free ports, none in `avoid`. Every socket stays bound until all are
    picked: a port freed and asked for again can come straight back (two agents on one port)."""
    held: list[socket.socket] = []
    picked: list[int] = []
    try:
        while len(picked) < count:
            sock = socket.socket()
            held.append(sock)
            sock.bind((HOST, 0))
            if (port := sock.getsockname()[1]) not in avoid:
                picked.append(port)
        return picked
    finally:
        for sock in held:
            sock.close()


def node_env() -> dict[str, str]:
    """Nodes (and the jobs they run) use this interpreter's tools: `python` in an entrypoint
    is the venv's. Ray 2.60 clients need RAY_AUTH_MODE=token to send the cluster's token."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    env.pop("RAY_ADDRESS", None)
    return env


def ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


def state_path(state_dir: Path) -> Path:
    return state_dir / "state.json"


def load_state(state_dir: Path) -> dict:
    path = state_path(state_dir)
    if not path.is_file():
        sys.exit(f"no cluster started from {state_dir} (no {path}); run: python cluster/local.py start")
    return json.loads(path.read_text())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by us) counts as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def dashboard_get(dashboard: str, route: str):
    """GET a dashboard API route with the cluster's token (Ray 2.60 token auth)."""
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(dashboard + route, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def submit_job(dashboard: str, entrypoint: list[str], cwd: Path, wait: bool = True,
               submission_id: str | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`ray job submit` with cluster/runtime_env.yaml and the working dir ``cwd``."""
    command = [ray_cli(), "job", "submit", "--address", dashboard,
               "--runtime-env", str(Path(__file__).with_name("runtime_env.yaml")), "--working-dir", str(cwd)]
    command += ["--submission-id", submission_id] if submission_id else []
    command += [] if wait else ["--no-wait"]
    return subprocess.run([*command, "--", *entrypoint], cwd=cwd, env=node_env(), capture_output=True,
                          text=True, timeout=timeout)


def job_status(dashboard: str, submission_id: str) -> str:
    return dashboard_get(dashboard, f"/api/jobs/{submission_id}")["status"]


# Ray's gRPC servers listen on every interface whatever --node-ip-address says (measured:
# GCS and raylet on [::], the dashboard agent on every IPv4 address and the machine's own), so every
# port a node opens is pinned and recorded in state.json: `status` lists them, and the test
# asserts that nothing else listens beyond loopback (cluster/README.md, Security).
WORKER_PORTS = (10002, 19999)  # core workers and drivers: Ray's default range, shared by the nodes
NODE_PORTS = ("node_manager", "object_manager", "dashboard_agent_grpc", "dashboard_agent_listen",
              "metrics_export", "runtime_env_agent")  # each node of this machine needs its own
HEAD_PORTS = ("ray_client_server", "autoscaler_metrics", "dashboard_metrics", *NODE_PORTS)


def pick_ports(names: tuple[str, ...], avoid: tuple[int, ...]) -> dict[str, int]:
    return dict(zip(names, free_ports(len(names), avoid), strict=True))


def port_flags(ports: dict[str, int]) -> list[str]:
    flags = {"node_manager": "--node-manager-port", "object_manager": "--object-manager-port",
             "dashboard_agent_grpc": "--dashboard-agent-grpc-port",
             "dashboard_agent_listen": "--dashboard-agent-listen-port", "metrics_export": "--metrics-export-port",
             "runtime_env_agent": "--runtime-env-agent-port"}
    return [f"{flags[name]}={port}" for name, port in ports.items() if name in flags] + [
        f"--min-worker-port={WORKER_PORTS[0]}", f"--max-worker-port={WORKER_PORTS[1]}"]


def listening_sockets(state: dict) -> list[dict]:
    """Every TCP socket a process of this cluster's nodes listens on (each node leads its
    own process session): node, process, address, port."""
    import psutil  # noqa: PLC0415 - only `status` and the tests ask

    sessions = {node["pid"]: node["name"] for node in state["nodes"]}
    found = []
    for process in psutil.process_iter(["pid", "name"]):
        try:
            node = sessions.get(os.getsid(process.pid))
            if node is None:
                continue
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append({"node": node, "process": process.info["name"], "address": conn.laddr.ip,
                                  "port": conn.laddr.port})
        except (psutil.Error, ProcessLookupError):
            continue  # a worker that exited meanwhile
    return found


def spawn_node(name: str, args: list[str], state_dir: Path, ports: dict[str, int]) -> dict:
    temp_dir = state_dir / name
    temp_dir.mkdir(parents=True, exist_ok=True)
    log = open(state_dir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the node process
    command = [ray_cli(), "start", "--block", f"--temp-dir={temp_dir}", f"--labels=t2i-node={name}", *args]
    env = node_env()
    if "autoscaler_metrics" in ports:
        env["AUTOSCALER_METRIC_PORT"] = str(ports["autoscaler_metrics"])
        env["DASHBOARD_METRIC_PORT"] = str(ports["dashboard_metrics"])
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=env, start_new_session=True)
    return {"name": name, "pid": process.pid, "temp_dir": str(temp_dir), "log": log.name, "command": command,
            "ports": ports}


def list_nodes(dashboard: str) -> list[dict]:
    """Ray's own view of the cluster (state API through the dashboard)."""
    out = subprocess.run([ray_cli(), "list", "nodes", "--address", dashboard, "--format", "json", "--limit", "100"],
                         capture_output=True, text=True, env=node_env(), timeout=60)
    if out.returncode != 0:
        return []
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return []


def wait_for_nodes(state: dict, expected: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in state["nodes"]:
            if not alive(node["pid"]):
                tail = Path(node["log"]).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"node {node['name']} exited while starting; its log ({node['log']}):\n{tail}")
        nodes = [n for n in list_nodes(state["dashboard"]) if n.get("state") == "ALIVE"]
        if len(nodes) >= expected:
            return nodes
        time.sleep(1.0)
    raise TimeoutError(f"only some of {expected} nodes came up within {timeout:.0f} s; logs in {state['state_dir']}")


def start(args) -> dict:
    state_dir = Path(args.state or f"/tmp/t2i-cluster-{args.port}")
    if state_path(state_dir).is_file() and any(_node_alive(n) for n in load_state(state_dir)["nodes"]):
        sys.exit(f"a cluster from {state_dir} is already running; stop it first: "
                 f"python cluster/local.py stop --state {state_dir}")
    state_dir.mkdir(parents=True, exist_ok=True)
    gcs = f"{HOST}:{args.port}"
    state = {"state_dir": str(state_dir), "gcs_address": gcs,
             "dashboard": f"http://{HOST}:{args.dashboard_port}", "nodes": []}
    # The head's two Prometheus servers have fixed default ports (44217, 44227) on every
    # interface; free ones here, so two clusters on one machine do not collide.
    head_ports = {"gcs": args.port, **pick_ports(HEAD_PORTS, avoid=(args.port, args.dashboard_port))}
    taken = (args.dashboard_port, *head_ports.values())
    head = spawn_node("head", [
        "--head", f"--node-ip-address={HOST}", f"--port={args.port}",
        f"--dashboard-host={HOST}", f"--dashboard-port={args.dashboard_port}",
        f"--ray-client-server-port={head_ports['ray_client_server']}", *port_flags(head_ports),
        f"--num-cpus={args.head_cpus}", f"--memory={int(args.head_memory_gb * 1e9)}",
        f"--object-store-memory={int(args.object_store_gb * 1e9)}"], state_dir, head_ports)
    state["nodes"].append(head)
    state_path(state_dir).write_text(json.dumps(state, indent=1))
    wait_for_nodes(state, 1, args.timeout)
    for index in range(1, args.workers + 1):
        # Every node of this machine needs its own agent ports, and its own memory budget
        # (otherwise each counts the whole machine's RAM).
        ports = pick_ports(NODE_PORTS, avoid=taken)  # a node may bind a port only once it is up
        taken = (*taken, *ports.values())
        state["nodes"].append(spawn_node(f"worker{index}", [
            f"--address={gcs}", f"--node-ip-address={HOST}", *port_flags(ports),
            f"--num-cpus={args.worker_cpus}", f"--num-gpus={args.worker_gpus}",
            f"--memory={int(args.worker_memory_gb * 1e9)}",
            f"--object-store-memory={int(args.object_store_gb * 1e9)}"], state_dir, ports))
        state_path(state_dir).write_text(json.dumps(state, indent=1))
    nodes = wait_for_nodes(state, 1 + args.workers, args.timeout)
    ids = {n.get("labels", {}).get("t2i-node"): n.get("node_id") for n in nodes}
    for node in state["nodes"]:
        node["node_id"] = ids.get(node["name"])
    state_path(state_dir).write_text(json.dumps(state, indent=1))
    print(f"export RAY_AUTH_MODE=token RAY_ADDRESS={state['dashboard']}\n"
          f"# dashboard: {state['dashboard']}   jobs: ray job submit --runtime-env cluster/runtime_env.yaml "
          f"--working-dir . -- python train_job.py", file=sys.stderr)
    return {"state_dir": str(state_dir), "gcs_address": gcs, "dashboard": state["dashboard"],
            "nodes": len(nodes)}


def status(args) -> dict:
    state_dir = Path(args.state or f"/tmp/t2i-cluster-{args.port}")
    state = load_state(state_dir)
    processes = {n["name"]: len(session_members(n["pid"])) for n in state["nodes"]}
    ray_view = list_nodes(state["dashboard"]) if processes.get("head") else []
    try:
        exposed = sorted({(s["node"], s["port"]) for s in listening_sockets(state) if not is_loopback(s["address"])})
    except ImportError:
        exposed = "pip install psutil to list them"
    return {"state_dir": str(state_dir), "dashboard": state["dashboard"], "processes": processes,
            "ray_nodes": [{"name": n.get("labels", {}).get("t2i-node"), "node_id": n.get("node_id"),
                           "state": n.get("state"), "head": n.get("is_head_node"),
                           "cpus": n.get("resources_total", {}).get("CPU")} for n in ray_view],
            "pinned_ports": {n["name"]: n.get("ports") for n in state["nodes"]}, "worker_ports": WORKER_PORTS,
            "listening_beyond_loopback": exposed}


def is_loopback(address: str) -> bool:
    import ipaddress  # noqa: PLC0415

    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def session_members(session_id: int) -> list[int]:
    """PIDs in a session. Each node's `ray start` leads its own session; Ray gives workers
    their own process groups but they stay in that session, so this finds all of a node."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _signal_node(node: dict, sig: int) -> None:
    for pid in session_members(node["pid"]):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _node_alive(node: dict) -> bool:
    return bool(session_members(node["pid"]))


def _wait_gone(nodes: list[dict], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_node_alive(n) for n in nodes):
        time.sleep(0.2)
    return [n for n in nodes if _node_alive(n)]


def kill_node(args) -> dict:
    """Crash drill: SIGKILL every process of a worker node at once, like a machine that dies."""
    state_dir = Path(args.state or f"/tmp/t2i-cluster-{args.port}")
    state = load_state(state_dir)
    name = f"worker{args.index}"
    node = next((n for n in state["nodes"] if n["name"] == name), None)
    if node is None:
        sys.exit(f"no node {name} in {state_dir}; nodes: {[n['name'] for n in state['nodes']]}")
    _signal_node(node, signal.SIGKILL)
    _wait_gone([node], 10)
    return {"killed": name, "node_id": node.get("node_id")}


def stop(args) -> dict:
    state_dir = Path(args.state or f"/tmp/t2i-cluster-{args.port}")
    state = load_state(state_dir)
    workers = [n for n in state["nodes"] if n["name"] != "head"]
    heads = [n for n in state["nodes"] if n["name"] == "head"]
    for group in (workers, heads):  # workers first: the head outlives the nodes reporting to it
        for node in group:
            _signal_node(node, signal.SIGTERM)  # raylet, gcs and workers shut down cleanly
        for node in _wait_gone(group, args.grace):
            _signal_node(node, signal.SIGKILL)
        _wait_gone(group, 10)
    left = [n["name"] for n in state["nodes"] if _node_alive(n)]
    if not left:
        state_path(state_dir).unlink()
        if args.remove:  # logs and session files of every node
            shutil.rmtree(state_dir, ignore_errors=True)
    return {"stopped": [n["name"] for n in state["nodes"]], "still_running": left}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=6379, help="GCS port of the head (names the default state dir)")
    parser.add_argument("--state", help="state/temp folder of this cluster (default /tmp/t2i-cluster-<port>)")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("start", help="start a head and --workers worker nodes")
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--dashboard-port", type=int, default=8265)
    up.add_argument("--head-cpus", type=int, default=2)
    up.add_argument("--worker-cpus", type=int, default=1)
    # Ray's resources are logical: a worker node can declare a GPU node's shape (e.g. 8 CPUs,
    # 1 GPU) on a machine without one, to see what a GPU cluster would schedule.
    up.add_argument("--worker-gpus", type=int, default=0, help="GPUs each worker node declares (logical)")
    up.add_argument("--head-memory-gb", type=float, default=8)
    up.add_argument("--worker-memory-gb", type=float, default=4)
    up.add_argument("--object-store-gb", type=float, default=1, help="per node")
    up.add_argument("--timeout", type=float, default=120, help="seconds to wait for the nodes")
    up.set_defaults(run=start)
    commands.add_parser("status", help="processes and Ray's view of the nodes").set_defaults(run=status)
    kill = commands.add_parser("kill-node", help="SIGKILL one worker node (crash drill)")
    kill.add_argument("index", type=int, help="1 for worker1, ...")
    kill.set_defaults(run=kill_node)
    down = commands.add_parser("stop", help="stop the nodes started by `start` (and only those)")
    down.add_argument("--grace", type=float, default=10,
                      help="seconds Ray may drain each node after SIGTERM before SIGKILL")
    down.add_argument("--remove", action="store_true", help="also delete the nodes' logs and temp dirs")
    down.set_defaults(run=stop)
    args = parser.parse_args(argv)
    print(json.dumps(args.run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
