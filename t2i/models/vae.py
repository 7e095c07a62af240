"""The VAE generators (``t2i.models.base`` interface, plus ``encode(image, c) -> (mu, logvar)``
of q(z | .) and ``forward(image, word_ids) -> VAEOutput``).

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

from t2i.config import ModelConfig
from t2i.models.base import TextToImage
from t2i.models.blocks import CaptionEncoder, ConvDecoder, ConvEncoder, ModulatedDecoder, bounded_logvar, mlp


class VAEOutput(NamedTuple):
    recon: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    prior_mu: torch.Tensor
    prior_logvar: torch.Tensor


class TextToImageVAE(TextToImage):
    """A generator trained as a VAE: ``encode(image, c)`` gives q(z | .), ``elbo_prior(c)``
    the prior its KL is measured against, and ``forward(image, word_ids) -> VAEOutput``
    the terms of its ELBO (the encoder sees the image), which evaluation also reports."""

    has_elbo = True

    def elbo_prior(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latent_gaussian(c)

    def forward(self, image: torch.Tensor, word_ids: torch.Tensor) -> VAEOutput:
        c = self.encode_text(word_ids)
        mu, logvar = self.encode(image, c)
        prior_mu, prior_logvar = self.elbo_prior(c)
        z = self.reparameterize(mu, logvar)
        return VAEOutput(self.decode(z, c), mu, logvar, prior_mu, prior_logvar)


class SeedVAE(TextToImageVAE):
    def __init__(self, cfg: ModelConfig, vocab_size: int, embed_dim: int):
        super().__init__()
        if cfg.decoder != "plain" or cfg.upsample != "nearest" or cfg.block != "plain" or cfg.padding != "zeros":
            raise ValueError("the seed family's decoder reads only z: use model.decoder = 'plain'")
        self.latent_dim, hidden = cfg.latent_dim, cfg.hidden
        self.text = CaptionEncoder(vocab_size, embed_dim, cfg.text_encoder, hidden)
        self.body = mlp([self.text.out_dim, hidden, hidden], cfg.dropout)
        self.to_mu = nn.Linear(hidden, cfg.latent_dim)
        self.to_logvar = nn.Linear(hidden, cfg.latent_dim)
        self.decoder = ConvDecoder(cfg.latent_dim, cfg.width)

    def encode(self, image: torch.Tensor | None, c: torch.Tensor):
        h = self.body(c)
        return self.to_mu(h), bounded_logvar(self.to_logvar(h))

    def latent_gaussian(self, c: torch.Tensor):
        # The seed samples its caption-conditioned Gaussian at generation time.
        return self.encode(None, c)

    def elbo_prior(self, c: torch.Tensor):
        """N(0, I): the seed's KL pulls its caption-only "posterior" towards it."""
        zeros = torch.zeros(c.shape[0], self.latent_dim, device=c.device, dtype=c.dtype)
        return zeros, zeros

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


class CVAE(TextToImageVAE):
    def __init__(self, cfg: ModelConfig, vocab_size: int, embed_dim: int):
        super().__init__()
        self.latent_dim, hidden, dropout = cfg.latent_dim, cfg.hidden, cfg.dropout
        self.text = CaptionEncoder(vocab_size, embed_dim, cfg.text_encoder, hidden)
        c_dim = self.text.out_dim
        self.image_encoder = ConvEncoder(cfg.width)
        self.posterior = nn.Sequential(mlp([self.image_encoder.out_dim + c_dim, hidden], dropout),
                                       nn.Linear(hidden, 2 * cfg.latent_dim))
        self.prior_net = nn.Sequential(mlp([c_dim, hidden], dropout), nn.Linear(hidden, 2 * cfg.latent_dim))
        self.cond = mlp([c_dim, hidden], dropout)
        # "modulated": the caption also scales/shifts every decoder block (DF-GAN's fusion).
        self.modulated = cfg.decoder == "modulated"
        self.decoder = (ModulatedDecoder(cfg.latent_dim + hidden, hidden, cfg)
                        if self.modulated else ConvDecoder(cfg.latent_dim + hidden, cfg.width))

    def encode(self, image: torch.Tensor, c: torch.Tensor):
        mu, logvar = self.posterior(torch.cat([self.image_encoder(image), c], 1)).chunk(2, dim=1)
        return mu, bounded_logvar(logvar)

    def latent_gaussian(self, c: torch.Tensor):
        """The learned prior p(z | caption)."""
        mu, logvar = self.prior_net(c).chunk(2, dim=1)
        return mu, bounded_logvar(logvar)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        cond = self.cond(c)
        h = torch.cat([z, cond], 1)
        return self.decoder(h, cond) if self.modulated else self.decoder(h)
