"""Losses as pure functions of tensors.

VAE families: the negative ELBO of Kingma & Welling (2014), "Auto-Encoding Variational
Bayes": a Gaussian reconstruction term (squared error, summed over pixels) plus
beta * KL(q(z|.) || p(z|.)) (beta-VAE, Higgins et al. 2017), with optional free bits
(Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive Flow").

GAN family: DF-GAN's objective (Tao et al. 2022, "DF-GAN: A Simple and Effective Baseline
for Text-to-Image Synthesis", eq. 1-2): hinge losses with a matching-aware term -- the
discriminator must reject real images paired with mismatched captions (the idea of Reed et
al. 2016, GAN-INT-CLS) -- and the matching-aware zero-centred gradient penalty (MA-GP) on
real images with their own captions; plus StackGAN's conditioning-augmentation KL and
AttnGAN's sentence alignment loss from a frozen dual encoder and MSGAN's mode-seeking term
(Durall et al.'s spectral term, which keeps state, is in t2i.training.spectrum).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from t2i.models.dual_encoder import DualEncoder, contrastive_loss
from t2i.models.vae import VAEOutput


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor,
                prior_logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) per latent dim, shape (B, D)."""
    return 0.5 * (prior_logvar - logvar
                  + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp() - 1.0)


def elbo_loss(out: VAEOutput, image: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0,
              likelihood: str = "gaussian") -> dict[str, torch.Tensor]:
    """Per-sample negative ELBO averaged over the batch, from a VAE's forward pass ``out``
    (reconstruction, posterior and prior Gaussians) and the true ``image``.

    ``likelihood``: "gaussian" -- squared error summed over pixels (the seed's; unit
    variance up to constants); "bernoulli" -- binary cross-entropy summed over pixels (Kingma
    & Welling 2014, Appendix C.1; pytorch/examples' VAE), whose gradient does not vanish as a
    sigmoid output saturates, so near-binary images (the shapes set) sharpen much sooner.
    Returns ``loss`` (to minimise), ``mse`` (mean squared error per pixel, the seed's metric,
    whatever the likelihood), ``kl`` (nats per sample, before beta and free bits) and
    ``elbo`` (the plain negative ELBO: reconstruction + KL, no beta, warm-up or free bits).
    """
    recon, image = out.recon.float(), image.float()
    squared = (recon - image).pow(2)
    if likelihood == "bernoulli":
        per_pixel = F.binary_cross_entropy(recon.clamp(1e-6, 1 - 1e-6), image, reduction="none")
    else:
        per_pixel = squared
    recon_term = per_pixel.flatten(1).sum(1).mean()
    kl_dims = gaussian_kl(out.mu.float(), out.logvar.float(), out.prior_mu.float(), out.prior_logvar.float())
    kl = kl_dims.sum(1).mean()
    # Free bits: each latent dim's batch-mean KL below `free_bits` nats costs nothing.
    kl_penalised = kl_dims.mean(0).clamp(min=free_bits).sum() if free_bits > 0 else kl
    return {"loss": recon_term + beta * kl_penalised, "mse": squared.mean(), "kl": kl, "elbo": recon_term + kl}


def standard_normal_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(0, I)) summed over dims, batch mean (StackGAN's CA term)."""
    mu, logvar = mu.float(), logvar.float()
    return gaussian_kl(mu, logvar, torch.zeros_like(mu), torch.zeros_like(logvar)).sum(1).mean()


def kl_weight(beta: float, warmup_epochs: int, epoch_progress: float) -> float:
    """Linear KL annealing (Bowman et al. 2016): 0 -> beta over the first warm-up epochs."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, epoch_progress / warmup_epochs)


def discriminator_hinge_loss(real: torch.Tensor, mismatched: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of (real image, its caption), (real image, another image's caption) and
    (generated image, its caption). DF-GAN eq. 1 weights the two negatives by 1/2 each."""
    real_term = F.relu(1.0 - real).mean()
    mismatch_term = F.relu(1.0 + mismatched).mean()
    fake_term = F.relu(1.0 + fake).mean()
    return {"d_loss": real_term + 0.5 * (mismatch_term + fake_term), "d_real": real_term,
            "d_mismatch": mismatch_term, "d_fake": fake_term}


def other_image_rows(images: torch.Tensor) -> torch.Tensor:
    """For each row i, a row showing another image, for the mismatched pair (caption i, that
    image): DF-GAN's roll of the real features by one (row i + 1), rolled further for rows
    whose neighbour shows the same image (an evaluation batch holds each image's captions
    side by side). A batch of one image has no other: the plain roll stands."""
    n = len(images)
    pixels = images.detach().flatten(1)
    rows = torch.arange(n, device=images.device)
    other = torch.roll(rows, -1)
    same = (pixels[other] == pixels).all(1)
    for shift in range(2, n):
        if not same.any():
            break
        candidate = torch.roll(rows, -shift)
        better = same & ~(pixels[candidate] == pixels).all(1)
        other = torch.where(better, candidate, other)
        same &= ~better
    return other


def generator_hinge_loss(fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z, c), c)] (DF-GAN eq. 2)."""
    return -fake.mean()


def matching_aware_gradient_penalty(logits: torch.Tensor, images: torch.Tensor, sentence: torch.Tensor,
                                    k: float = 2.0, p: float = 6.0) -> torch.Tensor:
    """k * E[||(grad_x D(x, e), grad_e D(x, e))||^p] on real, matching pairs: the norm of the
    joint gradient over the image and the sentence vector (DF-GAN's MA-GP, k = 2, p = 6 in its
    reference code), taken from the logits D already computed for the hinge loss (as DF-GAN
    does): ``images`` must require grad and ``sentence`` be part of the logits' graph."""
    grad_image, grad_sentence = torch.autograd.grad(logits.sum(), (images, sentence), create_graph=True)
    norm = torch.cat([grad_image.flatten(1), grad_sentence.flatten(1)], 1).pow(2).sum(1).sqrt()
    return k * norm.pow(p).mean()


def pooled_alignment_loss(encoder: DualEncoder, images: torch.Tensor, word_ids: torch.Tensor,
                          distractor_ids: torch.Tensor) -> torch.Tensor:
    """Each image's own caption against one fixed pool of distractor captions: the
    cross-entropy of the true caption among [true, distractors] at the encoder's temperature,
    averaged over the pairs. Every pair meets the same candidates whatever batch, worker count
    or stream order it arrives in (R-precision's fixed pools, as in t2i.evaluation.judges), so
    it ranks checkpoints where the in-batch InfoNCE moves with the evaluation batch; the
    distractors come from the train split, so none describes an evaluated image, and one that
    reads exactly like the true caption is left out."""
    img = encoder.embed_images(images)
    scale = encoder.log_scale.exp()
    true = scale * (img * encoder.embed_text(word_ids)).sum(1, keepdim=True)
    others = scale * img @ encoder.embed_text(distractor_ids).t()
    same_text = (word_ids[:, None, :] == distractor_ids[None, :, :]).all(-1)
    logits = torch.cat([true, others.masked_fill(same_text, float("-inf"))], 1)
    return (torch.logsumexp(logits, 1) - logits[:, 0]).mean()


def alignment_loss(encoder: DualEncoder, images: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
    """AttnGAN's DAMSM sentence loss (Xu et al. 2018, eq. 10-11) with a frozen encoder: each
    generated image must pick out its own caption among the batch's, and each caption its
    image (symmetric InfoNCE at the encoder's learned temperature; AttnGAN's gamma_3 = 10).
    Gradients reach the images only."""
    return contrastive_loss(encoder.embed_images(images), encoder.embed_text(word_ids), encoder.log_scale)


def mode_seeking_loss(first: torch.Tensor, second: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """MSGAN's mode-seeking term (Mao et al. 2019, "Mode Seeking Generative Adversarial Networks
    for Diverse Image Synthesis", eq. 3, as its StackGAN++ code adds it to G's loss):
    1 / (mean |G(c, z1) - G(c, z2)| + eps) over images drawn twice for the same captions, so the
    draws of one caption cannot all collapse into one picture. The reference also divides the
    image distance by mean |z1 - z2|, a constant (~2/sqrt(pi)) for many-dimensional standard
    normal draws; left out because the CA part of the latent has a learned scale it would shrink."""
    return 1.0 / ((first.float() - second.float()).abs().mean() + eps)
