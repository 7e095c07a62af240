"""Captions -> PNG images for a server: request checks, batched sampling, model facts.

Pure PyTorch and the standard library (no Ray, no web framework): ``t2i.serving.app`` puts this
behind Ray Serve and FastAPI, and the tests drive it directly. Every refusal is a
:class:`RequestError` carrying an HTTP status and a one-line reason; nothing from a request
reaches the file system (the checkpoint location comes from the operator, never a caller).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from t2i import storage
from t2i.errors import T2IError
from t2i.generation.generate import max_words_of, seeded_noise
from t2i.generation.grid import grid_image, png_bytes, to_uint8
from t2i.models import count_parameters
from t2i.training import checkpoint as ckpt_lib
from t2i.training import export as export_lib

MAX_CAPTION_CHARS = 200
MAX_IMAGES = 16             # images per request
MAX_SEED = 2**63 - 1        # torch.Generator.manual_seed takes up to 2**64 - 1; JSON clients lose precision above 2**53 anyway
MAX_BODY_BYTES = 4096       # a caption of 200 characters fits many times over


class RequestError(T2IError):
    """A request the server refuses: answered with ``status`` and this message, and the
    server goes on serving."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class GenerationRequest:
    caption: str
    n: int
    seed: int


def _integer(value, name: str, low: int, high: int) -> int:
    # bool is an int in Python, and 2.0 is not what a typed client meant: both refused.
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer from {low} to {high}, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be from {low} to {high}, got {value}")
    return value


def _unicode(text: str, what: str) -> str:
    """``text`` if it can be written back as UTF-8 (JSON's \\ud800 escapes decode to lone
    surrogates, which no response can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{what} is not valid Unicode (a lone surrogate such as \\ud800)") from None
    return text


def _caption(value) -> str:
    if not isinstance(value, str):
        raise RequestError(f"caption must be a string, got {json.dumps(value)[:40]}")
    _unicode(value, "caption")
    if not value.strip():
        raise RequestError("caption is empty")
    if len(value) > MAX_CAPTION_CHARS:
        raise RequestError(f"caption is {len(value)} characters; at most {MAX_CAPTION_CHARS}")
    return value


def request_from_json(body: bytes) -> GenerationRequest:
    """``{"caption": str, "n": 1-16 (default 4), "seed": int (default 0)}``; unknown keys
    are refused (a typo such as "seeds" must not silently fall back to the default)."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"request body is {len(body)} bytes; at most {MAX_BODY_BYTES}", status=413)
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"request body is not JSON: {exc}") from None
    except RecursionError:  # "[[[[..." nested deeper than Python's stack, within 4 KiB
        raise RequestError("request body is nested too deeply; send a flat JSON object") from None
    if not isinstance(fields, dict):
        raise RequestError("request body must be a JSON object like {\"caption\": \"a red circle\", \"n\": 4, \"seed\": 0}")
    for key in fields:
        _unicode(key, "a field name")
    unknown = sorted(set(fields) - {"caption", "n", "seed"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; expected caption, n, seed")
    if "caption" not in fields:
        raise RequestError("caption is missing")
    return GenerationRequest(_caption(fields["caption"]), _integer(fields.get("n", 4), "n", 1, MAX_IMAGES),
                             _integer(fields.get("seed", 0), "seed", 0, MAX_SEED))


def request_from_query(params: Mapping[str, str]) -> GenerationRequest:
    """The same request from URL query strings (``?caption=...&n=4&seed=0``)."""
    for key in params:
        _unicode(key, "a parameter name")
    unknown = sorted(set(params) - {"caption", "n", "seed"})
    if unknown:
        raise RequestError(f"unknown parameter(s) {', '.join(unknown)}; expected caption, n, seed")

    def number(name: str, default: int, high: int, low: int = 0) -> int:
        text = params.get(name)
        if text is None:
            return default
        try:
            value = int(text.strip())
        except ValueError:
            raise RequestError(f"{name} must be an integer from {low} to {high}, got {text[:40]!r}") from None
        return _integer(value, name, low, high)

    return GenerationRequest(_caption(params.get("caption", "")), number("n", 4, MAX_IMAGES, low=1),
                             number("seed", 0, MAX_SEED))


@dataclass
class Drawing:
    """One request's answer: ``images`` (n, 64, 64, 3) uint8, the words the model read and
    the words it does not know."""
    request: GenerationRequest
    images: np.ndarray
    words: list[str]
    unknown: list[str]

    def pngs(self) -> list[bytes]:
        return [png_bytes(image) for image in self.images]

    def as_json(self) -> dict:
        return {"caption": self.request.caption, "n": self.request.n, "seed": self.request.seed,
                "words": self.words, "unknown": self.unknown,
                "images": [base64.b64encode(png).decode("ascii") for png in self.pngs()]}

    def grid_png(self) -> bytes:
        """One PNG: the caption above its n images (each at 2x)."""
        tiles = torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div(255)[None]
        return png_bytes(grid_image(tiles, [self.request.caption]))


def run_name_of(model_path: str) -> str:
    """``runs/f8k-gan/checkpoint_x/model.pt`` -> ``f8k-gan`` (the folder a checkpoint's run lives in);
    an exported folder (``t2i export``) is named by itself."""
    if export_lib.is_export(str(model_path)):
        return storage.name(model_path)
    checkpoint_folder = storage.parent(str(model_path))
    return storage.name(storage.parent(checkpoint_folder)) or storage.name(checkpoint_folder)


class CaptionGenerator:
    """A checkpoint ready to draw: loaded once, on ``device``."""

    def __init__(self, location: str, device: str | None = None):
        self.location = ckpt_lib.model_file(location)  # a run folder -> its best checkpoint
        loaded = ckpt_lib.load(self.location)          # CheckpointError: missing, corrupt, foreign
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = loaded.model.to(self.device).eval()
        self.vocab = loaded.vocab
        self.max_words = max_words_of(loaded)
        data = loaded.state.get("data", {})
        self.facts = {
            "family": loaded.config.model.family,
            "text_encoder": loaded.config.model.text_encoder,
            "dataset": data.get("dataset", "unknown"),
            "epoch": int(loaded.state["epoch"]) + 1,  # stored 0-based; people count from 1
            "selected_by": loaded.state["metrics"].get("selected_by"),
            "parameters": count_parameters(self.model),
            "vocabulary": len(self.vocab),
            "checkpoint": self.location,
            "device": str(self.device),
        }

    @property
    def public_facts(self) -> dict:
        """What ``/api/model`` shows: the facts with the run's name instead of the server's path."""
        return {**{k: v for k, v in self.facts.items() if k != "checkpoint"}, "run": run_name_of(self.location)}

    def read(self, request: GenerationRequest) -> tuple[list[int], list[str]]:
        """The word ids the model reads (at most ``max_words``) and the words it does not
        know; a caption with no known word is refused (422), before it joins a batch."""
        known, unknown = self.vocab.ids(request.caption)
        if not known:
            raise RequestError(f"no word of the caption is known to this model (unknown: {', '.join(unknown)})",
                               status=422)
        return known[: self.max_words], list(dict.fromkeys(unknown))

    @torch.no_grad()
    def draw(self, requests: list[GenerationRequest]) -> list[Drawing]:
        """All requests in one forward pass. Each request's noise comes from its own seed, so
        a caption, n and seed give the same images alone or in any batch, and the same as
        ``python -m t2i generate --seed SEED --n N CAPTION``."""
        parsed = [self.read(request) for request in requests]
        rows, noise = [], []
        for request, (ids, _) in zip(requests, parsed):
            row = torch.zeros(self.max_words, dtype=torch.long)
            row[: len(ids)] = torch.tensor(ids)
            rows.append(row.expand(request.n, -1))
            noise.append(seeded_noise(request.n, self.model.latent_dim, request.seed, self.device))
        images = self.model.sample_from_noise(torch.cat(rows).to(self.device), torch.cat(noise))
        tiles = to_uint8(images)
        drawings, start = [], 0
        for request, (ids, unknown) in zip(requests, parsed):
            words = [self.vocab.words[i] for i in ids]
            drawings.append(Drawing(request, tiles[start: start + request.n], words, unknown))
            start += request.n
        return drawings
