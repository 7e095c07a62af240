"""Losses as pure functions of tensors.

The objective is the negative ELBO of Kingma & Welling (2014), "Auto-Encoding Variational
Bayes": a Gaussian reconstruction term (squared error, summed over pixels) plus
beta * KL(q(z|.) || p(z|.)) (beta-VAE, Higgins et al. 2017), with optional free bits
(Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive Flow").
"""

from __future__ import annotations

import torch


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor,
                prior_logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) per latent dim, shape (B, D)."""
    return 0.5 * (prior_logvar - logvar
                  + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp() - 1.0)


def elbo_loss(recon: torch.Tensor, image: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
              prior_mu: torch.Tensor, prior_logvar: torch.Tensor, beta: float = 1.0,
              free_bits: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-sample negative ELBO averaged over the batch.

    Returns ``loss`` (to minimise), ``mse`` (mean squared error per pixel, the seed's
    metric), and ``kl`` (nats per sample, before beta and free bits).
    """
    squared = (recon.float() - image.float()).pow(2)
    recon_term = squared.flatten(1).sum(1).mean()
    kl_dims = gaussian_kl(mu.float(), logvar.float(), prior_mu.float(), prior_logvar.float())
    kl = kl_dims.sum(1).mean()
    # Free bits: each latent dim's batch-mean KL below `free_bits` nats costs nothing.
    kl_penalised = kl_dims.mean(0).clamp(min=free_bits).sum() if free_bits > 0 else kl
    return {"loss": recon_term + beta * kl_penalised, "mse": squared.mean(), "kl": kl}


def kl_weight(beta: float, warmup_epochs: int, epoch_progress: float) -> float:
    """Linear KL annealing (Bowman et al. 2016): 0 -> beta over the first warm-up epochs."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, epoch_progress / warmup_epochs)
