"""The interface every generator shares, so sampling, generation, evaluation and serving
never ask which family they hold.

``encode_text(word_ids) -> c``; ``latent_gaussian(c) -> (mu, logvar)``: the Gaussian
generation draws the latent from (a VAE's prior, the gan's conditioning augmentation beside
N(0, I)); ``reparameterize``; ``decode(z, c) -> image``; ``sample(word_ids, n)``.
"""

from __future__ import annotations

import abc

import torch
from torch import nn


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None):
    """z = mu + sigma * eps (Kingma & Welling 2014, "Auto-Encoding Variational Bayes")."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


class TextToImage(nn.Module, abc.ABC):
    """A caption-conditioned generator. Subclasses set ``latent_dim`` and ``text`` (a
    caption encoder) and define :meth:`latent_gaussian` and :meth:`decode`."""

    latent_dim: int
    has_elbo = False  # True for generators trained as VAEs (their forward gives ELBO terms)

    def encode_text(self, word_ids: torch.Tensor) -> torch.Tensor:
        return self.text(word_ids)

    @abc.abstractmethod
    def latent_gaussian(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of the latent that generation draws for caption feature ``c``."""

    @abc.abstractmethod
    def decode(self, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """Latent (and caption feature) -> (B, 3, 64, 64) in [0, 1]."""

    def reparameterize(self, mu, logvar, generator=None):
        return reparameterize(mu, logvar, generator)

    @torch.no_grad()
    def sample(self, word_ids: torch.Tensor, n: int = 1, deterministic: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, n, 3, 64, 64): n draws per caption (the Gaussian's mean if deterministic)."""
        c = self.encode_text(word_ids).repeat_interleave(n, dim=0)
        mu, logvar = self.latent_gaussian(c)
        z = mu if deterministic else self.reparameterize(mu, logvar, generator)
        images = self.decode(z, c)
        return images.view(word_ids.shape[0], n, *images.shape[1:])

    @torch.no_grad()
    def sample_from_noise(self, word_ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """(N, L) ids, one row per image, and (N, latent_dim) standard-normal noise -> (N, 3, 64, 64).
        With the noise ``sample`` would draw (n rows from one seeded generator per caption)
        it gives the same images, so a server can batch many callers' captions, each with
        its own seed, in one pass (eval-mode layers treat every row independently)."""
        c = self.encode_text(word_ids)
        mu, logvar = self.latent_gaussian(c)
        return self.decode(mu + torch.exp(0.5 * logvar) * noise.to(mu.dtype), c)
