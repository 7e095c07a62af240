"""Serving: request checks and batched drawing (no Ray), the app under Ray Serve started by
``python -m t2i serve`` on 127.0.0.1 (every route, every bad input, determinism, a burst),
the Serve config and RayService manifest, and the page in a real headless Chromium."""

import base64
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import headless_chromium, needs_chromium
from PIL import Image

from t2i.cli import main as cli_main
from t2i.generation.generate import sample_prompts
from t2i.generation.grid import to_uint8
from t2i.serving.service import (
    MAX_BODY_BYTES,
    CaptionGenerator,
    GenerationRequest,
    RequestError,
    request_from_json,
    request_from_query,
)
from t2i.training import checkpoint as ckpt_lib

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- requests (pure)
@pytest.mark.parametrize("body, status, says", [
    (b'{"caption": ""}', 400, "caption is empty"),
    (b'{"caption": "   "}', 400, "caption is empty"),
    (json.dumps({"caption": "a" * 201}).encode(), 400, "at most 200"),
    (b'{"caption": "red", "n": 0}', 400, "n must be from 1 to 16"),
    (b'{"caption": "red", "n": 17}', 400, "n must be from 1 to 16"),
    (b'{"caption": "red", "n": true}', 400, "n must be an integer"),
    (b'{"caption": "red", "seed": 1.5}', 400, "seed must be an integer"),
    (b'{"caption": "red", "seed": "7"}', 400, "seed must be an integer"),
    (b'{"caption": "red", "seed": -1}', 400, "seed must be from 0"),
    (b'{"caption": 5}', 400, "caption must be a string"),
    (b'{"n": 2}', 400, "caption is missing"),
    (b'{"caption": "red", "seeds": 2}', 400, "unknown field(s) seeds"),
    (b'{"caption": "red"', 400, "not JSON"),
    (b'\xff\xfe', 400, "not JSON"),
    (b'["red"]', 400, "must be a JSON object"),
    (b'{"caption": "' + b"a" * MAX_BODY_BYTES + b'"}', 413, "at most 4096"),
])
def test_bad_json_requests_are_refused_with_one_line(body, status, says):
    with pytest.raises(RequestError) as caught:
        request_from_json(body)
    assert caught.value.status == status and says in str(caught.value) and "\n" not in str(caught.value)


def test_requests_parse_with_defaults_from_json_and_query():
    assert request_from_json(b'{"caption": "a red circle"}') == GenerationRequest("a red circle", 4, 0)
    assert request_from_json(b'{"caption": "x", "n": 16, "seed": 9007199254740993}').seed == 9007199254740993
    assert request_from_query({"caption": "a red circle", "n": "2", "seed": "5"}) == GenerationRequest("a red circle", 2, 5)
    for params, says in (({"caption": "red", "n": "two"}, "n must be an integer"), ({"caption": "red", "seed": "1e3"}, "seed"),
                         ({}, "caption is empty"), ({"caption": "red", "size": "9"}, "unknown parameter")):
        with pytest.raises(RequestError, match=says):
            request_from_query(params)


def test_batched_drawing_matches_generate_and_is_independent_of_the_batch(checkpoint):
    generator = CaptionGenerator(str(checkpoint.parent), device="cpu")
    assert generator.facts["family"] == "cvae" and generator.facts["epoch"] == 3
    assert generator.facts["dataset"] == "shapes"
    requests = [GenerationRequest("a large red circle at the top left", 3, 11),
                GenerationRequest("a small blue square xyzzy", 2, 12),
                GenerationRequest("a large red circle at the top left", 3, 11)]
    together = generator.draw(requests)
    alone = [generator.draw([r])[0] for r in requests]
    for a, b in zip(together, alone):
        assert np.array_equal(a.images, b.images) and a.pngs() == b.pngs()
    assert np.array_equal(together[0].images, together[2].images)
    assert not np.array_equal(together[0].images[0], together[0].images[1])  # draws differ within a request
    # The same images as `t2i generate --seed 11 --n 3 CAPTION`, also beside other prompts.
    loaded = ckpt_lib.load(checkpoint)
    expected = sample_prompts(loaded.model, loaded.vocab, [requests[0].caption], 3, 32, 11)[0]
    assert np.array_equal(together[0].images, to_uint8(expected))
    beside = sample_prompts(loaded.model, loaded.vocab, ["a green triangle", requests[0].caption], 3, 32, 11)[1]
    assert np.array_equal(together[0].images, to_uint8(beside))
    assert together[1].words == ["a", "small", "blue", "square"] and together[1].unknown == ["xyzzy"]
    with pytest.raises(RequestError) as caught:
        generator.read(GenerationRequest("xyzzy qwerty", 1, 0))
    assert caught.value.status == 422 and "xyzzy, qwerty" in str(caught.value)


def test_serve_settings_refuse_typos_and_bad_values():
    from t2i.config import ConfigError
    from t2i.serving.app import ServeConfig

    assert ServeConfig.from_args({"checkpoint": "runs/x", "port": "8001"}).port == 8001
    assert ServeConfig.from_args({"checkpoint": "runs/x", "use_gpu": True}).use_gpu == "true"  # YAML's bool
    for args, says in (({"checkpoint": "x", "replica": 2}, "unknown serve setting"), ({}, "needs 'checkpoint'"),
                       ({"checkpoint": "x", "port": 70000}, "port must be"), ({"checkpoint": "x", "use_gpu": "yes"}, "use_gpu"),
                       ({"checkpoint": "x", "replicas": "many"}, "not a int")):
        with pytest.raises(ConfigError, match=says):
            ServeConfig.from_args(args)


def test_a_replica_asks_for_a_gpu_when_the_cluster_has_or_can_start_one(monkeypatch):
    import ray

    import t2i.runtime.ray_env
    from t2i.serving.app import ServeConfig, replica_gpus

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    for can_start, expected in ((True, 1), (False, 0)):
        monkeypatch.setattr(t2i.runtime.ray_env, "cluster_has_gpus", lambda needed, answer=can_start: answer)
        assert replica_gpus(ServeConfig("ckpt")) == expected
    assert replica_gpus(ServeConfig("ckpt", use_gpu="false")) == 0 and replica_gpus(ServeConfig("ckpt", use_gpu="true")) == 1


@pytest.mark.parametrize("make, says", [
    (lambda tmp: tmp / "missing.pt", "checkpoint not found"),
    (lambda tmp: (tmp / "corrupt.pt").write_bytes(b"\x80\x02not a zip") and tmp / "corrupt.pt", "not a readable checkpoint"),
    (lambda tmp: torch.save({"weights": torch.zeros(2)}, tmp / "foreign.pt") or tmp / "foreign.pt", "not a t2i checkpoint"),
])
def test_serve_stops_at_start_on_a_bad_checkpoint(tmp_path, capsys, make, says):
    assert cli_main(["serve", "--checkpoint", str(make(tmp_path)), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


# ----------------------------------------------------------------------------- configs
def test_serve_config_and_rayservice_pass_rays_schema_and_t2is_settings():
    from ray.serve.schema import ServeDeploySchema

    from t2i.serving.app import ServeConfig

    config = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    service = next(d for d in yaml.safe_load_all((REPO / "cluster" / "k8s" / "rayservice.yaml").read_text())
                   if d and d["kind"] == "RayService")
    for deploy in (config, yaml.safe_load(service["spec"]["serveConfigV2"])):
        ServeDeploySchema.model_validate(deploy)  # what `serve deploy` and KubeRay check
        (app,) = deploy["applications"]
        module, _, name = app["import_path"].partition(":")
        assert (module, name) == ("t2i.serving.app", "build_app")
        assert ServeConfig.from_args(app["args"]).checkpoint.startswith("s3://")
    assert config["http_options"]["host"] == "127.0.0.1"
    broken = json.loads(json.dumps(config))
    broken["http_options"]["port"] = "eighty"  # Ray's schema catches this; t2i's catches typos in args
    with pytest.raises(Exception, match="port"):
        ServeDeploySchema.model_validate(broken)


# ----------------------------------------------------------------------------- the app under Serve
def free_port() -> int:
    """A free port below the kernel's ephemeral range (and above Ray's worker ports,
    10002-19999): an ephemeral one was once taken by one of the server's own Ray processes
    between this check and Serve's bind ("Failed to bind to address")."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(20000, low if low > 21000 else 30000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and the ephemeral range")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """``python -m t2i serve`` in its own process (own local Ray), stopped with Ctrl-C."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "t2i", "serve", "--checkpoint", str(checkpoint.parent),
                                    "--port", str(port)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while "t2i: serving" not in log.read_text():
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield f"http://127.0.0.1:{port}", process, log
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=90)


def call(url: str, body: bytes | None = None, method: str | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def generate(base: str, caption: str, n: int = 2, seed: int = 0) -> dict:
    status, _, body = call(f"{base}/api/generate", json.dumps({"caption": caption, "n": n, "seed": seed}).encode())
    assert status == 200, body
    return json.loads(body)


def test_every_route_answers(server):
    base, _, log = server
    status, kind, page = call(base + "/")
    assert status == 200 and kind.startswith("text/html")
    html = page.decode()
    assert "Generate" in html and "cvae" in html and "shapes" in html and "epoch 3" in html
    assert "http://" not in html.replace(base, "") and "https://" not in html  # self-contained: nothing from a CDN
    assert json.loads(call(base + "/healthz")[2]) == {"status": "ok"}
    model = json.loads(call(base + "/api/model")[2])
    assert model["family"] == "cvae" and model["dataset"] == "shapes" and model["device"] == "cpu"
    reply = generate(base, "a small green triangle qqqz", n=3, seed=4)
    assert reply["words"] == ["a", "small", "green", "triangle"] and reply["unknown"] == ["qqqz"]
    images = [Image.open(io.BytesIO(base64.b64decode(png))) for png in reply["images"]]
    assert len(images) == 3 and all(im.size == (64, 64) and im.mode == "RGB" for im in images)
    status, kind, png = call(base + "/api/generate.png?" + urllib.parse.urlencode({"caption": "a red circle", "n": 4}))
    grid = Image.open(io.BytesIO(png))
    assert status == 200 and kind == "image/png" and grid.width >= 4 * 128 and grid.height > 128
    assert "t2i: serving cvae (shapes, epoch 3) at " + base in log.read_text()


@pytest.mark.parametrize("path, body, status, says", [
    ("/api/generate", b'{"caption": ""}', 400, "caption is empty"),
    ("/api/generate", b'{"caption": "qqqz xyzzy"}', 422, "no word of the caption is known"),
    ("/api/generate", json.dumps({"caption": "red " * 60}).encode(), 400, "at most 200"),
    ("/api/generate", b'{"caption": "red", "n": 0}', 400, "n must be from 1 to 16"),
    ("/api/generate", b'{"caption": "red", "n": 17}', 400, "n must be from 1 to 16"),
    ("/api/generate", b'{"caption": "red", "seed": "abc"}', 400, "seed must be an integer"),
    ("/api/generate", b'{"caption": "red", ', 400, "not JSON"),
    ("/api/generate", b"x" * (MAX_BODY_BYTES * 4), 413, "at most 4096"),
    ("/api/generate.png?caption=red&n=99", None, 400, "n must be from 1 to 16"),
    ("/api/generate.png?caption=red&seed=1.5", None, 400, "seed must be an integer"),
    ("/api/generate.png?n=2", None, 400, "caption is empty"),
])
def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(server, path, body, status, says):
    base = server[0]
    code, kind, answer = call(base + path, body)
    assert code == status and kind == "application/json"
    assert says in json.loads(answer)["error"]
    assert call(base + "/healthz")[0] == 200


def raw_http(base: str, head: bytes, trickle: bytes = b"", pause_s: float = 0.0, timeout: float = 20) -> bytes:
    """Send ``head`` (request line and headers), then ``trickle`` one byte per ``pause_s``;
    return whatever the server answered."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        try:
            for byte in trickle:
                sock.sendall(bytes([byte]))
                time.sleep(pause_s)
        except OSError:  # the server closed on us: read what it said
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        return answer


@pytest.mark.parametrize("body, says", [
    (b'{"caption": "a red circle \\ud800", "n": 1}', "caption is not valid Unicode"),
    (b'{"caption": "a red circle", "\\udc00": 1}', "a field name is not valid Unicode"),
    (b"[" * 1500, "nested too deeply"),
])
def test_hostile_json_gets_a_400_not_a_500(server, body, says):
    code, kind, answer = call(server[0] + "/api/generate", body)
    assert code == 400 and kind == "application/json" and says in json.loads(answer)["error"]


def test_head_security_headers_content_type_and_no_server_paths(server, checkpoint):
    base = server[0]
    for path in ("/", "/healthz", "/api/model"):  # load balancers and uptime checks use HEAD
        status, _, body = call(base + path, method="HEAD")
        assert status == 200 and body == b"", path
    request = urllib.request.Request(base + "/")
    with urllib.request.urlopen(request, timeout=30) as response:
        headers = response.headers
    assert headers["X-Content-Type-Options"] == "nosniff" and headers["X-Frame-Options"] == "DENY"
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "connect-src 'self'" in policy
    # A cross-site form or text/plain POST (no CORS preflight) cannot make the server draw.
    plain = urllib.request.Request(base + "/api/generate", data=b'{"caption": "a red circle"}',
                                   headers={"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(plain, timeout=30)
    assert refused.value.code == 415 and "application/json" in json.loads(refused.value.read())["error"]
    model = json.loads(call(base + "/api/model")[2])
    assert "checkpoint" not in model and str(checkpoint.parent) not in json.dumps(model)
    assert model["run"] == checkpoint.parent.parent.name


def test_a_trickling_body_is_cut_off(server):
    """A client that sends its body a byte a second holds a request slot for 5 s, not 30."""
    started = time.monotonic()
    body = b'{"caption": "a red circle", "n": 1}'
    head = (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
    answer = raw_http(server[0], head, body, pause_s=1.0, timeout=40)
    assert b" 408 " in answer.split(b"\r\n", 1)[0] and b"not complete within 5 s" in answer
    assert time.monotonic() - started < 15
    assert call(server[0] + "/healthz")[0] == 200


def test_slow_header_clients_hold_sockets_not_the_replica(server):
    """64 clients that never finish their headers (Serve's proxy has no header deadline, the
    front proxy's job) do not reach the replica: a real request is answered at once meanwhile."""
    host, port = server[0].removeprefix("http://").split(":")
    slow = []
    try:
        for _ in range(64):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            slow.append(sock)
        time.sleep(1.0)
        started = time.monotonic()
        reply = generate(server[0], "a small blue square", n=1, seed=5)
        assert len(reply["images"]) == 1 and time.monotonic() - started < 10
        assert call(server[0] + "/healthz")[0] == 200
    finally:
        for sock in slow:
            sock.close()


def test_same_request_same_bytes_and_a_burst_is_all_answered(server):
    base = server[0]
    mix = [("a large red circle at the top left", 2, 1), ("a small blue square", 3, 2), ("a green triangle", 1, 3),
           ("a large red circle at the top left", 2, 7)]
    alone = {m: generate(base, *m)["images"] for m in mix}
    assert alone[mix[0]] == generate(base, *mix[0])["images"]  # the same bytes twice
    assert alone[mix[0]] != alone[mix[3]]                     # another seed, other images
    jobs = [mix[i % len(mix)] for i in range(48)]
    with ThreadPoolExecutor(16) as pool:                       # concurrent: batched on the replica
        replies = list(pool.map(lambda m: generate(base, *m), jobs))
    assert len(replies) == 48
    for job, reply in zip(jobs, replies):
        assert reply["images"] == alone[job]  # whatever it was batched with


# ----------------------------------------------------------------------------- a real browser
@needs_chromium
def test_page_in_headless_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with headless_chromium() as driver:
        driver.get(server[0] + "/")
        assert "cvae" in driver.find_element(By.ID, "model").text
        box = driver.find_element(By.ID, "caption")
        box.clear()
        box.send_keys("a large red circle at the top left qqqz")
        count = driver.find_element(By.ID, "n")
        count.clear()
        count.send_keys("5")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid img")) == 5)
        sizes = driver.execute_script("return Array.from(document.querySelectorAll('#grid img'))"
                                      ".map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        assert sizes == [[True, 64, 64]] * 5  # decoded PNGs at the model's size
        status = driver.find_element(By.ID, "status").text
        assert "unknown words" in status and "qqqz" in status
        box.clear()
        box.send_keys("qqqz xyzzy")  # the server refuses it (422); the page says why
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 30).until(lambda d: "no word of the caption" in d.find_element(By.ID, "status").text)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#grid img")) == 5  # the last good images stay
        assert driver.save_screenshot(str(tmp_path / "page.png"))
        assert Image.open(tmp_path / "page.png").size[0] > 0


# Last: it stops the module's server.
def test_ctrl_c_stops_the_server_cleanly(server):
    base, process, log = server
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=90) == 0
    text = log.read_text()
    assert "t2i: stopping the server" in text and "Traceback" not in text
    assert json.loads(text.strip().splitlines()[-1])["served"] == base + "/"
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(base + "/healthz", timeout=5)
