"""Prompts -> images from a checkpoint alone (pure PyTorch; no Ray, no data files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from t2i.console import progress
from t2i.data.text import UnknownCaptionError, Vocabulary
from t2i.errors import T2IError
from t2i.generation.grid import save_each, save_grid
from t2i.training import checkpoint as ckpt_lib


def encode_prompts(vocab: Vocabulary, prompts: list[str], max_words: int) -> torch.Tensor:
    """(P, max_words) word ids; an empty or all-unknown prompt is an error naming it."""
    rows = []
    for prompt in prompts:
        if not prompt.strip():
            raise UnknownCaptionError("empty prompt")
        rows.append(torch.as_tensor(vocab.encode(prompt, max_words)[1]))
    return torch.stack(rows).long()


def seeded_noise(n: int, latent_dim: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """(n, latent_dim) standard-normal noise from its own generator: one caption's draws, the
    same whichever other captions are drawn beside it (generate, and every server request)."""
    return torch.randn((n, latent_dim), generator=torch.Generator(device=device).manual_seed(seed), device=device)


@torch.no_grad()
def sample_prompts(model, vocab: Vocabulary, prompts: list[str], n: int, max_words: int,
                   seed: int | Sequence[int], deterministic: bool = False) -> torch.Tensor:
    """(P, n, 3, 64, 64) images. Each prompt's n noise vectors come from its own generator
    seeded with ``seed`` (or ``seed[i]`` for prompt i), as the server draws a request: a
    prompt gives the same images whatever other prompts it is drawn with."""
    seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    word_ids = encode_prompts(vocab, prompts, max_words).to(device)
    if deterministic:
        images = model.sample(word_ids, n=n, deterministic=True)
    else:
        noise = [seeded_noise(n, model.latent_dim, s, device) for s in seeds]
        images = model.sample_from_noise(word_ids.repeat_interleave(n, dim=0), torch.cat(noise))
        images = images.view(len(prompts), n, *images.shape[1:])
    model.train(was_training)
    return images


def render_prompts(model, vocab: Vocabulary, prompts: list[str], n: int, max_words: int, seed: int,
                   path: str | Path) -> Path:
    return save_grid(sample_prompts(model, vocab, prompts, n, max_words, seed), prompts, path)


def max_words_of(loaded: ckpt_lib.LoadedCheckpoint) -> int:
    return int(loaded.state["data"].get("max_words", 32))


def generate(checkpoint: str | Path, prompts: list[str], out: str | Path, n: int = 4, seed: int = 0,
             captions_file: str | Path | None = None, batch: int = 256) -> dict:
    """Command-line prompts -> one grid PNG at ``out``; a captions file -> one 64x64 PNG per
    line in the folder ``out`` (00000.png, ... in file order, first sample of each)."""
    checkpoint = ckpt_lib.model_file(checkpoint)  # a run folder -> its best checkpoint
    loaded = ckpt_lib.load(checkpoint)
    max_words = max_words_of(loaded)
    if captions_file:
        path = Path(captions_file)
        if not path.is_file():
            raise T2IError(f"captions file not found: {path}")
        lines = path.read_text(encoding="utf-8").splitlines()
        images = []
        for start in progress(range(0, len(lines), batch), "generate", unit="batch"):
            chunk = lines[start: start + batch]
            seeds = range(seed + start, seed + start + len(chunk))  # line i is drawn with seed + i
            images.append(sample_prompts(loaded.model, loaded.vocab, chunk, 1, max_words, seeds)[:, 0])
        if not images:
            raise UnknownCaptionError(f"{path} has no captions")
        files = save_each(torch.cat(images), out)
        return {"out": str(out), "images": len(files), "checkpoint": checkpoint}
    if not prompts:
        raise UnknownCaptionError("give at least one prompt or --captions-file")
    images = sample_prompts(loaded.model, loaded.vocab, prompts, n, max_words, seed)
    return {"out": str(save_grid(images, prompts, out)), "prompts": len(prompts), "samples_per_prompt": n,
            "checkpoint": checkpoint}
