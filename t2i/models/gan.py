"""A conditional GAN generator and its matching-aware discriminator (pure PyTorch).

The generator is StackGAN's Stage I (Zhang et al. 2017) with DF-GAN's fusion blocks
(Tao et al. 2022):

* **Conditioning augmentation** -- the seed's VAE-style step kept: the caption feature is
  mapped to a Gaussian N(mu(c), sigma(c)) and a reparameterized sample ``c_hat`` is drawn,
  with KL(N(mu, sigma) || N(0, I)) added to the generator's loss (StackGAN eq. 3-4). It
  smooths the conditioning manifold, so few captions per image still cover it.
* ``c_hat`` and noise ``z ~ N(0, I)`` -> 4x4 map -> four upsampling blocks that each
  re-read ``c_hat`` through a channel-wise affine transform (DF-GAN's DFBlock); with
  ``block="residual"`` DF-GAN's two-conv residual blocks, whose affines read ``[c_hat, z]``.

In the interface shared with the VAEs (:class:`TextToImage`), the generator's latent is
``[c_hat, z]``: ``latent_gaussian(c)`` is the CA Gaussian beside N(0, I), so ``sample()``,
``generate`` and ``evaluate`` work unchanged (deterministic = CA mean and z = 0).

The discriminator (DF-GAN's, without residual shortcuts) reads the image down to 4x4,
joins the caption feature replicated over the map and scores the pair; it has its own
caption encoder. Its losses live in ``t2i.training.losses``.
"""

from __future__ import annotations

import torch
from torch import nn

from t2i.config import ModelConfig
from t2i.models.base import TextToImage
from t2i.models.blocks import CaptionEncoder, ModulatedDecoder, bounded_logvar, stride2_convs


class GANGenerator(TextToImage):
    def __init__(self, cfg: ModelConfig, vocab_size: int, embed_dim: int):
        super().__init__()
        if cfg.decoder != "modulated":
            raise ValueError("the gan family always uses model.decoder = 'modulated'")
        self.condition_dim = cfg.latent_dim  # size of c_hat (StackGAN: 128)
        self.noise_dim = cfg.latent_dim      # size of z (StackGAN: 100)
        self.latent_dim = self.condition_dim + self.noise_dim
        self.text = CaptionEncoder(vocab_size, embed_dim, cfg.text_encoder, cfg.hidden)
        self.augment = nn.Linear(self.text.out_dim, 2 * self.condition_dim)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # What the blocks' affines read: c_hat (StackGAN), or c_hat and z as DF-GAN's blocks do.
        self.fused_dim = self.latent_dim if cfg.block == "residual" else self.condition_dim
        self.decoder = ModulatedDecoder(self.latent_dim, self.fused_dim, cfg,
                                        noise_dim=self.noise_dim if cfg.pixel_noise else 0)

    def latent_gaussian(self, c: torch.Tensor):
        """StackGAN's conditioning-augmentation Gaussian N(mu(c), sigma(c)) for ``c_hat``,
        beside N(0, I) for the noise ``z``."""
        mu, logvar = self.augment(self.dropout(c)).chunk(2, dim=1)
        noise = torch.zeros(c.shape[0], self.noise_dim, device=c.device, dtype=mu.dtype)
        return torch.cat([mu, noise], 1), torch.cat([bounded_logvar(logvar), noise], 1)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.decoder(z, z[:, : self.fused_dim], z[:, self.condition_dim:])

    def forward(self, word_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One random image per caption, and the CA Gaussian's (mu, logvar) for its KL."""
        mu, logvar = self.latent_gaussian(self.encode_text(word_ids))
        z = self.reparameterize(mu, logvar)
        return self.decode(z, None), mu[:, : self.condition_dim], logvar[:, : self.condition_dim]


class Discriminator(nn.Module):
    """(image, caption) -> one realness-and-match logit per pair, in DF-GAN's two parts: an
    image trunk (its NetD: pixels -> a 4x4 feature map, caption-blind) and a joint head (its
    NetC: features + sentence -> logit), so one pass of the trunk serves several captions."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, embed_dim: int):
        super().__init__()
        width = cfg.width
        self.text = CaptionEncoder(vocab_size, embed_dim, cfg.text_encoder, cfg.hidden)
        self.image = nn.Sequential(*stride2_convs(width, kernel=4, norm="none"))  # 64 -> 4 pixels
        # DF-GAN's D_GET_LOGITS: concat the sentence vector over the 4x4 map, 3x3 conv, 4x4 conv.
        self.joint = nn.Sequential(nn.Conv2d(8 * width + self.text.out_dim, 2 * width, 3, 1, 1),
                                   nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(2 * width, 1, 4, 1, 0))

    def encode_text(self, word_ids: torch.Tensor) -> torch.Tensor:
        return self.text(word_ids)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk (DF-GAN's NetD): (B, 3, 64, 64) in [0, 1] -> (B, 8 * width, 4, 4)."""
        return self.image(images * 2 - 1)  # [0, 1] -> [-1, 1], as GANs usually see pixels

    def logits(self, features: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """The head (DF-GAN's NetC): the sentence tiled over the feature map, two convs."""
        joined = torch.cat([features, sentence[:, :, None, None].expand(-1, -1, *features.shape[2:])], 1)
        return self.joint(joined).flatten()

    def score(self, images: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(images), sentence)

    def forward(self, real: torch.Tensor, fake: torch.Tensor, word_ids: torch.Tensor,
                other_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The discriminator step's one pass (DF-GAN's train loop): the trunk runs once on the
        real and once on the generated images, and the real features serve both the matching
        pairs and the mismatched ones (caption i against the image ``other_image[i]``).
        Returns the logits of (real, caption), (other real image, caption), (fake, caption)
        and the sentence vectors (the gradient penalty differentiates through them)."""
        sentence = self.encode_text(word_ids)
        features = self.features(torch.cat([real, fake]))
        real_features, fake_features = features[: len(real)], features[len(real):]
        return (self.logits(real_features, sentence), self.logits(real_features[other_image], sentence),
                self.logits(fake_features, sentence), sentence)
