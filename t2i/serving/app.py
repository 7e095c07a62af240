"""The generator behind Ray Serve: a web page, a JSON API and a PNG endpoint.

``python -m t2i serve --checkpoint CKPT`` deploys :func:`build_app` on the local Ray (or
the cluster at ``RAY_ADDRESS``); ``serve deploy cluster/serve.yaml`` and the KubeRay
``RayService`` in ``cluster/k8s/rayservice.yaml`` deploy the same builder by import path.

Routes (FastAPI ingress, Ray Serve docs "Set up FastAPI and HTTP"):
  GET  /                 one self-contained page (no CDN): caption, n, seed, Generate
  POST /api/generate     {"caption", "n", "seed"} -> {"images": [base64 PNG], "words", "unknown", ...}
  GET  /api/generate.png ?caption=...&n=...&seed=... -> one PNG grid
  GET  /api/model        family, data set, epoch, run name, device
  GET  /healthz          {"status": "ok"} once the model is loaded

Concurrent requests share one forward pass (``@serve.batch``); each keeps its own seed's
noise, so the same caption, n and seed give the same bytes whatever they were batched
with. Bad requests get a 4xx and a one-line ``{"error": ...}`` (t2i.serving.service).
"""

# No `from __future__ import annotations` here: FastAPI reads the route parameters' real types.
import asyncio
import dataclasses
import ipaddress
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from t2i import storage
from t2i.config import ConfigError
from t2i.serving.service import (
    MAX_BODY_BYTES,
    CaptionGenerator,
    GenerationRequest,
    RequestError,
    request_from_json,
    request_from_query,
)

PAGE = Path(__file__).with_name("page.html")
APP_NAME = "t2i"


@dataclass
class ServeConfig:
    checkpoint: str                  # model.pt, its checkpoint folder, a run folder (best checkpoint) or a URI
    host: str = "127.0.0.1"          # loopback; any other address exposes it: put an authenticating proxy in front
    port: int = 8000
    replicas: int = 1
    max_replicas: int = 0            # > replicas: Serve adds replicas up to this many under load (0 = fixed)
    max_batch_size: int = 8          # requests per forward pass (@serve.batch); 1 turns batching off
    batch_wait_timeout_s: float = 0.01  # how long a first request waits for company
    num_cpus: float = 1.0            # per replica; its torch threads follow this
    use_gpu: str = "auto"            # "auto": one GPU per replica when the cluster has (or can start) them
    body_timeout_s: float = 5.0      # a request body not complete by then: 408 (slow clients hold no slot)
    request_timeout_s: float = 30.0  # the proxy's limit for a whole request (`python -m t2i serve`)
    keep_alive_timeout_s: float = 5.0  # idle keep-alive connections close after this (`python -m t2i serve`)

    @classmethod
    def from_args(cls, args: dict) -> "ServeConfig":
        """From a Serve config file's ``args`` (or the CLI): unknown keys and bad values are
        refused by name, never ignored."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise ConfigError(f"unknown serve setting(s) {', '.join(unknown)}; known: {', '.join(fields)}")
        if "checkpoint" not in args:
            raise ConfigError("serve needs 'checkpoint' (a model.pt, checkpoint folder, run folder or URI)")
        values = {}
        for name, value in args.items():
            kind = fields[name].type
            try:
                values[name] = kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"serve setting {name}={value!r} is not a {kind.__name__}") from None
        config = cls(**values)
        config.use_gpu = config.use_gpu.lower()  # YAML's `use_gpu: true` arrives as a bool
        if not 1 <= config.port <= 65535:
            raise ConfigError(f"port must be 1-65535, got {config.port}")
        positive = ("replicas", "max_batch_size", "num_cpus", "body_timeout_s", "request_timeout_s",
                    "keep_alive_timeout_s")
        if not all(getattr(config, name) > 0 for name in positive):
            raise ConfigError(f"{', '.join(positive)} must be positive")
        if config.max_replicas and config.max_replicas < config.replicas:
            raise ConfigError(f"max_replicas ({config.max_replicas}) is below replicas ({config.replicas})")
        if config.use_gpu not in ("auto", "true", "false"):
            raise ConfigError(f"use_gpu must be auto, true or false, got {config.use_gpu!r}")
        return config


api = FastAPI(title="t2i", docs_url=None, redoc_url=None, openapi_url=None)  # no CDN-served docs pages

# The page loads nothing from elsewhere: its own inline script and style, PNGs as data: URLs,
# and fetches to this origin only; no site may frame it.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer"}


@api.middleware("http")
async def _security_headers(request: Request, call_next):
    response = await call_next(request)
    response.headers.update(SECURITY_HEADERS)
    if response.headers.get("content-type", "").startswith("text/html"):
        response.headers["Content-Security-Policy"] = PAGE_POLICY
    return response


@api.exception_handler(RequestError)
async def _refuse(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


async def _read_body(request: Request, timeout_s: float) -> bytes:
    """A JSON body, refused past MAX_BODY_BYTES without reading the rest into memory, and
    when it is not complete within ``timeout_s`` (a trickling client holds no slot for long).
    Other content types are refused: a cross-site form or ``text/plain`` POST cannot draw."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise RequestError(f"send the request as application/json, not {kind or 'no content type'}", status=415)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(f"request body is {declared} bytes; at most {MAX_BODY_BYTES}", status=413)

    async def read() -> bytes:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise RequestError(f"request body is over {MAX_BODY_BYTES} bytes", status=413)
        return body

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        raise RequestError(f"request body not complete within {timeout_s:g} s", status=408) from None


def render_page(facts: dict) -> str:
    """The page with the served model's facts filled in (HTML-escaped)."""
    from html import escape  # noqa: PLC0415

    text = PAGE.read_text(encoding="utf-8")
    for key in ("family", "dataset", "epoch", "text_encoder", "device"):
        text = text.replace("{{" + key + "}}", escape(str(facts.get(key))))
    return text


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class CaptionServer:
    """One replica: the checkpoint loaded once, a batcher in front of it."""

    def __init__(self, checkpoint: str, config: ServeConfig):
        torch.set_num_threads(max(1, int(config.num_cpus)))  # Ray sets OMP_NUM_THREADS=1 in workers
        self.generator = CaptionGenerator(checkpoint)
        self.page = render_page(self.generator.facts)
        self.body_timeout_s = config.body_timeout_s
        self.draw_batch.set_max_batch_size(config.max_batch_size)
        self.draw_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def draw_batch(self, requests: list[GenerationRequest]):
        # In a thread: the event loop keeps accepting (and queueing) requests meanwhile,
        # so the next batch fills while this one runs (torch releases the GIL).
        return await asyncio.to_thread(self.generator.draw, requests)

    async def _draw(self, request: GenerationRequest):
        self.generator.read(request)  # a caption of unknown words fails alone, not its batch
        return await self.draw_batch(request)

    # HEAD too: load balancers and uptime checks ask with it.
    @api.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.api_route("/api/model", methods=["GET", "HEAD"])
    async def model(self) -> dict:
        return self.generator.public_facts

    @api.post("/api/generate")
    async def generate(self, request: Request) -> JSONResponse:
        drawing = await self._draw(request_from_json(await _read_body(request, self.body_timeout_s)))
        return JSONResponse(drawing.as_json())

    @api.get("/api/generate.png")
    async def generate_png(self, request: Request) -> Response:
        drawing = await self._draw(request_from_query(dict(request.query_params)))
        return Response(drawing.grid_png(), media_type="image/png")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable from elsewhere
        return False


def reachable_host(host: str) -> str:
    """The host to print in the URL: an all-interfaces bind is reached at 127.0.0.1 here."""
    try:
        if ipaddress.ip_address(host).is_unspecified:
            return "127.0.0.1"
    except ValueError:
        pass
    return f"[{host}]" if ":" in host else host


def replica_gpus(config: ServeConfig) -> int:
    if config.use_gpu != "auto":
        return int(config.use_gpu == "true")
    import ray  # noqa: PLC0415

    if not ray.is_initialized():
        return int(torch.cuda.is_available())
    from t2i.runtime.ray_env import cluster_has_gpus  # noqa: PLC0415

    return int(cluster_has_gpus(config.replicas))


def build_app(args: dict):
    """Serve's application builder (``import_path: t2i.serving.app:build_app``; ``args`` as in
    :class:`ServeConfig`)."""
    config = ServeConfig.from_args(args)
    location = config.checkpoint if storage.is_uri(config.checkpoint) else storage.absolute(config.checkpoint)
    return CaptionServer.options(
        **replica_count(config),
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": replica_gpus(config)},
    ).bind(location, config)


def replica_count(config: ServeConfig) -> dict:
    """A fixed number of replicas, or Serve autoscaling between ``replicas`` and
    ``max_replicas``, aiming at one full batch in flight per replica."""
    if config.max_replicas <= config.replicas:
        return {"num_replicas": config.replicas}
    return {"autoscaling_config": {"min_replicas": config.replicas, "max_replicas": config.max_replicas,
                                   "target_ongoing_requests": config.max_batch_size}}


def serve_until_stopped(config: ServeConfig, stop: threading.Event | None = None, say=print) -> dict:
    """``python -m t2i serve``: check the checkpoint here first (a bad one stops before Ray
    starts), deploy, print the URL, and on Ctrl-C (or ``stop``) take the app down."""
    from t2i.runtime.ray_env import start_ray  # noqa: PLC0415 - Ray's start only after the checkpoint is good

    facts = CaptionGenerator(config.checkpoint, device="cpu").facts  # CheckpointError -> exit 2
    if not is_loopback(config.host):
        say(f"t2i: warning: serving on {config.host}: anyone who can reach this port can use the model; "
            "put it behind an authenticating proxy (README: Try it in the browser)")
    start_ray()
    serve.start(http_options={"host": config.host, "port": config.port, "request_timeout_s": config.request_timeout_s,
                              "keep_alive_timeout_s": config.keep_alive_timeout_s})
    serve.run(build_app(dataclasses.asdict(config)), name=APP_NAME, route_prefix="/")
    url = f"http://{reachable_host(config.host)}:{config.port}/"
    say(f"t2i: serving {facts['family']} ({facts['dataset']}, epoch {facts['epoch']}) at {url} - Ctrl-C stops")
    stop = stop or threading.Event()
    # Ctrl-C and SIGTERM only set ``stop``: a second Ctrl-C while Serve shuts down (a few
    # seconds) must not cut the shutdown short and leave replicas behind.
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in handled}
    try:
        while not stop.wait(0.5):
            pass
        say("t2i: stopping the server")
        serve.delete(APP_NAME)  # only this app: on a shared cluster other Serve apps keep running
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return {"served": url, "checkpoint": facts["checkpoint"]}

