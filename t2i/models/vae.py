"""The two generators, behind one interface.

``encode_text(word_ids) -> c``; ``encode(image, c) -> (mu, logvar)`` of q(z | .);
``prior(c) -> (mu, logvar)``; ``reparameterize``; ``decode(z, c) -> image``;
``forward(image, word_ids) -> VAEOutput``; ``sample(word_ids, n)``.

* :class:`SeedVAE` - the presentation's model: caption -> Gaussian latent -> image. Its
  "posterior" reads only the caption and is pulled towards N(0, I) by the KL term, and the
  decoder never sees the caption: text information must survive the KL through z.
* :class:`CVAE` - a conditional VAE (Sohn et al. 2015): q(z | image, caption), learned
  prior p(z | caption), decoder p(image | z, caption); generation samples the prior.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from t2i.models.blocks import CaptionEncoder, ConvDecoder, ConvEncoder, ModulatedDecoder, bounded_logvar, mlp


class VAEOutput(NamedTuple):
    recon: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    prior_mu: torch.Tensor
    prior_logvar: torch.Tensor


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None):
    """z = mu + sigma * eps (Kingma & Welling 2014, "Auto-Encoding Variational Bayes")."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


class TextToImage(nn.Module):
    """A caption-conditioned generator: ``encode_text``, ``prior(c) -> (mu, logvar)`` of the
    latent used at generation time, ``decode(z, c)``. Sampling is shared by every family."""

    latent_dim: int

    def encode_text(self, word_ids: torch.Tensor) -> torch.Tensor:
        return self.text(word_ids)

    def reparameterize(self, mu, logvar, generator=None):
        return reparameterize(mu, logvar, generator)

    @torch.no_grad()
    def sample(self, word_ids: torch.Tensor, n: int = 1, deterministic: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, n, 3, 64, 64): n draws per caption (the prior mean if deterministic)."""
        c = self.encode_text(word_ids).repeat_interleave(n, dim=0)
        mu, logvar = self.prior(c)
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
        mu, logvar = self.prior(c)
        return self.decode(mu + torch.exp(0.5 * logvar) * noise.to(mu.dtype), c)


class TextToImageVAE(TextToImage):
    """A generator trained as a VAE: ``forward(image, word_ids) -> VAEOutput`` gives the
    terms of its ELBO (the encoder sees the image), which evaluation also reports."""


class SeedVAE(TextToImageVAE):
    def __init__(self, vocab_size: int, embed_dim: int, text_encoder: str = "mean", latent_dim: int = 128,
                 hidden: int = 1024, width: int = 80, dropout: float = 0.0, decoder: str = "plain"):
        super().__init__()
        if decoder != "plain":
            raise ValueError("the seed family's decoder reads only z: use model.decoder = 'plain'")
        self.latent_dim = latent_dim
        self.text = CaptionEncoder(vocab_size, embed_dim, text_encoder, hidden)
        self.body = mlp([self.text.out_dim, hidden, hidden], dropout)
        self.to_mu = nn.Linear(hidden, latent_dim)
        self.to_logvar = nn.Linear(hidden, latent_dim)
        self.decoder = ConvDecoder(latent_dim, width)

    def encode(self, image: torch.Tensor | None, c: torch.Tensor):
        h = self.body(c)
        return self.to_mu(h), bounded_logvar(self.to_logvar(h))

    def prior(self, c: torch.Tensor):
        # The seed samples its caption-conditioned Gaussian at generation time.
        return self.encode(None, c)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, image: torch.Tensor, word_ids: torch.Tensor) -> VAEOutput:
        c = self.encode_text(word_ids)
        mu, logvar = self.encode(image, c)
        z = self.reparameterize(mu, logvar)
        zeros = torch.zeros_like(mu)
        return VAEOutput(self.decode(z, c), mu, logvar, zeros, zeros)


class CVAE(TextToImageVAE):
    def __init__(self, vocab_size: int, embed_dim: int, text_encoder: str = "gru", latent_dim: int = 64,
                 hidden: int = 512, width: int = 48, dropout: float = 0.0, decoder: str = "plain"):
        super().__init__()
        self.latent_dim = latent_dim
        self.text = CaptionEncoder(vocab_size, embed_dim, text_encoder, hidden)
        c_dim = self.text.out_dim
        self.image_encoder = ConvEncoder(width)
        self.posterior = nn.Sequential(mlp([self.image_encoder.out_dim + c_dim, hidden], dropout),
                                       nn.Linear(hidden, 2 * latent_dim))
        self.prior_net = nn.Sequential(mlp([c_dim, hidden], dropout), nn.Linear(hidden, 2 * latent_dim))
        self.cond = mlp([c_dim, hidden], dropout)
        # "modulated": the caption also scales/shifts every decoder block (DF-GAN's fusion).
        self.modulated = decoder == "modulated"
        self.decoder = (ModulatedDecoder(latent_dim + hidden, hidden, width) if self.modulated
                        else ConvDecoder(latent_dim + hidden, width))

    def encode(self, image: torch.Tensor, c: torch.Tensor):
        mu, logvar = self.posterior(torch.cat([self.image_encoder(image), c], 1)).chunk(2, dim=1)
        return mu, bounded_logvar(logvar)

    def prior(self, c: torch.Tensor):
        mu, logvar = self.prior_net(c).chunk(2, dim=1)
        return mu, bounded_logvar(logvar)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        cond = self.cond(c)
        h = torch.cat([z, cond], 1)
        return self.decoder(h, cond) if self.modulated else self.decoder(h)

    def forward(self, image: torch.Tensor, word_ids: torch.Tensor) -> VAEOutput:
        c = self.encode_text(word_ids)
        mu, logvar = self.encode(image, c)
        prior_mu, prior_logvar = self.prior(c)
        z = self.reparameterize(mu, logvar)
        return VAEOutput(self.decode(z, c), mu, logvar, prior_mu, prior_logvar)
