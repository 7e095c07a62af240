"""Pure-PyTorch networks (no Ray, no data code). ``build_model`` maps a ModelConfig to a generator."""

from __future__ import annotations

import numpy as np
import torch

from t2i.config import ModelConfig
from t2i.models.base import TextToImage
from t2i.models.gan import Discriminator, GANGenerator
from t2i.models.vae import CVAE, SeedVAE, TextToImageVAE, VAEOutput

GENERATORS: dict[str, type[TextToImage]] = {"seed": SeedVAE, "cvae": CVAE, "gan": GANGenerator}


def new_generator(cfg: ModelConfig, vocab_size: int, embed_dim: int) -> TextToImage:
    """An untrained generator of ``cfg``'s family and sizes (on torch's current default device)."""
    return GENERATORS[cfg.family](cfg, vocab_size, embed_dim)


def build_model(cfg: ModelConfig, vectors: np.ndarray) -> TextToImage:
    """A fresh model whose frozen word table is ``vectors`` (vocab_size, embed_dim)."""
    model = new_generator(cfg, *vectors.shape)
    model.text.vectors.copy_(torch.as_tensor(vectors, dtype=torch.float32))
    return model


def build_discriminator(cfg: ModelConfig, vectors: np.ndarray) -> Discriminator:
    """The gan family's discriminator, with its own frozen copy of the word table."""
    critic = Discriminator(cfg, *vectors.shape)
    critic.text.vectors.copy_(torch.as_tensor(vectors, dtype=torch.float32))
    return critic


# Training state per parameter: fp32 weights, gradients and two Adam moments.
TRAINING_BYTES_PER_PARAMETER = 16
MAX_PARAMETERS = 1_000_000_000  # 16 GB of training state: far past any 64x64 model here


def size_problem(cfg: ModelConfig, vocab_size: int = 10_000, embed_dim: int = 50) -> str | None:
    """Why ``cfg`` describes a model too large to train (None if it fits), counted on
    PyTorch's meta device: no memory is allocated, whatever the size."""
    with torch.device("meta"):
        model = new_generator(cfg, vocab_size, embed_dim)
    params = count_parameters(model)
    if params <= MAX_PARAMETERS:
        return None
    return (f"model.width={cfg.width}, model.hidden={cfg.hidden}, model.latent_dim={cfg.latent_dim} make a "
            f"{params / 1e6:,.0f}M-parameter {cfg.family} (~{params * TRAINING_BYTES_PER_PARAMETER / 1e9:,.0f} GB "
            f"to train); at most {MAX_PARAMETERS / 1e6:,.0f}M")


def count_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters (the frozen GloVe table is a buffer, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "CVAE",
    "GENERATORS",
    "Discriminator",
    "GANGenerator",
    "SeedVAE",
    "TextToImage",
    "TextToImageVAE",
    "VAEOutput",
    "build_discriminator",
    "build_model",
    "count_parameters",
    "size_problem",
]
