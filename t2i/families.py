"""What each model family trains, behind one small interface the training loop calls.

A family object owns its networks, optimizers and schedulers, and supplies one training
step, the evaluation terms of one batch, its per-epoch scheduler step and its state for
checkpoints. ``t2i.train`` runs the same epoch loop, checkpointing and resume for every
family, so adding a family never adds ``if family == ...`` branches there.

* :class:`VAEFamily` (``seed``, ``cvae``): negative ELBO, one network, one optimizer.
* :class:`GANFamily` (``gan``): generator with conditioning augmentation + matching-aware
  discriminator, DF-GAN's hinge losses and MA-GP, two optimizers (Tao et al. 2022).

Every family also reports ``gen_mse`` on evaluation splits: the error of the image drawn
from the caption alone (prior mean / CA mean with z = 0) against the true image. Checkpoint
selection and sweeps rank by it, because the ELBO's reconstruction lets the encoder see
the image and so says little about generation.

Pure PyTorch: no Ray and no data code (the loop hands in tensors).
"""

from __future__ import annotations

import abc
import contextlib
import math
from typing import Callable

import numpy as np
import torch

from t2i.alignment import DualEncoder, alignment_loss
from t2i.config import Config, OptimConfig
from t2i.losses import (discriminator_hinge_loss, elbo_loss, gaussian_kl, generator_hinge_loss, kl_weight,
                        matching_aware_gradient_penalty)
from t2i.metrics import mse
from t2i.models import build_discriminator, build_model

Autocast = Callable[[], contextlib.AbstractContextManager]


def make_optimizer(params, cfg: OptimConfig, lr: float | None = None) -> torch.optim.Optimizer:
    lr = cfg.lr if lr is None else lr
    params = list(params)
    if cfg.name == "adam":
        # Fused: one kernel updates every parameter, where "foreach" makes a pass per
        # elementwise op: 0.77 instead of 2.96 ms per step of the default model on 2 CPU
        # cores (benchmarks/bench_compute.py; its whole step took ~82 ms). CPU and CUDA only.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                fused=fused or None)
    return torch.optim.RMSprop(params, lr=lr, weight_decay=cfg.weight_decay)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Moments, steps and hyperparameters from ``saved``; how the update is computed (fused
    or foreach) stays this optimizer's: PyTorch would take it from the saved groups too,
    so a checkpoint written before t2i fused Adam would switch the fused kernel off."""
    kernel = {flag: optimizer.defaults[flag] for flag in ("fused", "foreach") if flag in optimizer.defaults}
    optimizer.load_state_dict({**saved, "param_groups": [{**group, **kernel} for group in saved["param_groups"]]})


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int):
    """Stepped once per epoch (``plateau`` with the selection metric)."""
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "exponential":
        return sched.ExponentialLR(optimizer, gamma=cfg.gamma)
    if cfg.schedule == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.gamma, patience=cfg.patience)
    if cfg.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    return sched.ConstantLR(optimizer, factor=1.0, total_iters=0)


def extend_schedule(scheduler, epochs: int) -> None:
    """A resumed cosine schedule follows the current ``train.epochs``: its saved state
    still holds the old length, so after raising the epochs (as the "already finished"
    message advises) the learning rate would climb from ~0 back to its peak. Here it
    continues on the cosine of the new length from the epoch reached (closed form, SGDR:
    Loshchilov & Hutter 2017); the scheduler's recursive steps then stay on that curve."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) or scheduler.T_max == max(1, epochs):
        return
    scheduler.T_max = max(1, epochs)
    t = min(scheduler.last_epoch, scheduler.T_max)
    lrs = [scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * t / scheduler.T_max)) / 2
           for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


def clip_and_step(loss: torch.Tensor, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  grad_clip: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    optimizer.step()


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return getattr(module, "module", module)


@torch.no_grad()
def generation_error(generator, images: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel squared error of the caption-only (deterministic) image, per pair."""
    drawn = unwrap(generator).sample(word_ids, n=1, deterministic=True)[:, 0]
    return mse(drawn, images)


class Family(abc.ABC):
    """Base: the generator is ``self.model`` (what checkpoints store as ``model``).

    ``TRAIN_TERMS`` / ``EVAL_TERMS``: the names :meth:`train_step` / :meth:`eval_terms`
    return, in a fixed order so workers can all-reduce them as one tensor."""

    TRAIN_TERMS: tuple[str, ...] = ()
    EVAL_TERMS: tuple[str, ...] = ()
    # Without an evaluation split: the train metric checkpoints are ranked by (lower is
    # better), one no warm-up or loss weight moves; None = keep the latest epoch.
    FALLBACK_SELECTION: str | None = None

    @property
    def selection_metric(self) -> str:
        """The dev metric checkpoints are ranked by (lower is better): always one of images
        drawn from the caption alone, never a loss in which an encoder sees the image."""
        return "dev_gen_mse"

    def __init__(self, cfg: Config, vectors: np.ndarray, alignment_encoder: DualEncoder | None = None):
        self.cfg = cfg
        self.model = build_model(cfg.model, vectors)
        # A frozen helper network (the gan's alignment loss; the config refuses the weight
        # for other families): never trained or checkpointed here (cached beside the data).
        self.alignment_encoder = alignment_encoder
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, object] = {}

    # -- networks -------------------------------------------------------------------
    def networks(self) -> dict[str, torch.nn.Module]:
        """Every trained network by name; ``model`` is the generator."""
        return {"model": self.model}

    def wrap(self, prepare: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Wrap each network for data parallelism (``ray.train.torch.prepare_model``) and
        build the optimizers on the wrapped parameters."""
        for name, net in self.networks().items():
            setattr(self, name, prepare(net))  # attribute names are the networks' names
        self._build_optimizers()

    @abc.abstractmethod
    def _build_optimizers(self) -> None:
        """Fill ``self.optimizers`` and ``self.schedulers`` (keys: network names)."""

    @property
    def generator(self) -> torch.nn.Module:
        return unwrap(self.model)

    def to(self, device: torch.device) -> None:
        """Move what :meth:`wrap` does not (frozen helper networks) to ``device``."""
        if self.alignment_encoder is not None:
            self.alignment_encoder.to(device)

    def train(self, mode: bool = True) -> None:
        for net in self.networks().values():
            net.train(mode)

    # -- per epoch ------------------------------------------------------------------
    def end_epoch(self, metric: float) -> None:
        for scheduler in self.schedulers.values():
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(metric)
            else:
                scheduler.step()

    @property
    def lr(self) -> float:
        return next(iter(self.optimizers.values())).param_groups[0]["lr"]

    # -- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume except the generator's weights (stored as ``model``)."""
        return {"networks": {name: unwrap(net).state_dict() for name, net in self.networks().items()
                             if name != "model"},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()}}

    def load_networks(self, state: dict) -> None:
        """Weights of every network (call before :meth:`wrap`)."""
        self.model.load_state_dict(state["model"])
        for name, weights in state["training"]["networks"].items():
            self.networks()[name].load_state_dict(weights)

    def load_training_state(self, state: dict) -> None:
        """Optimizer and scheduler state (call after :meth:`wrap`)."""
        training = state["training"]
        for key, optimizer in self.optimizers.items():
            load_optimizer_state(optimizer, training["optimizers"][key])
        for key, scheduler in self.schedulers.items():
            scheduler.load_state_dict(training["schedulers"][key])
            extend_schedule(scheduler, self.cfg.train.epochs)


class VAEFamily(Family):
    """``seed`` and ``cvae``: minimise the (beta-weighted) negative ELBO."""

    TRAIN_TERMS = ("loss", "mse", "kl", "elbo", "kl_weight")
    EVAL_TERMS = ("loss", "mse", "kl", "gen_mse")
    FALLBACK_SELECTION = "train_elbo"

    def _build_optimizers(self) -> None:
        self.optimizers = {"model": make_optimizer(self.model.parameters(), self.cfg.optim)}
        self.schedulers = {"model": make_scheduler(self.optimizers["model"], self.cfg.optim, self.cfg.train.epochs)}

    def train_step(self, images: torch.Tensor, word_ids: torch.Tensor, epoch_progress: float,
                   autocast: Autocast = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        """One optimisation step; ``epoch_progress`` (epochs done, fractional) sets the KL
        warm-up weight. Returns detached terms (``kl_weight`` included)."""
        loss_cfg = self.cfg.loss
        weight = kl_weight(loss_cfg.beta, loss_cfg.kl_warmup_epochs, epoch_progress)
        with autocast():
            out = self.model(images, word_ids)
        terms = elbo_loss(out.recon, images, out.mu, out.logvar, out.prior_mu, out.prior_logvar, weight,
                          loss_cfg.free_bits, loss_cfg.likelihood)
        clip_and_step(terms["loss"], self.model, self.optimizers["model"], self.cfg.optim.grad_clip)
        return {**{k: v.detach() for k, v in terms.items()}, "kl_weight": torch.tensor(weight)}

    @torch.no_grad()
    def eval_terms(self, images: torch.Tensor, word_ids: torch.Tensor,
                   autocast: Autocast = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        """Plain negative ELBO (beta = 1, comparable across runs whatever they train with),
        its MSE and KL, and the caption-only generation error."""
        with autocast():
            out = self.generator(images, word_ids)
        terms = elbo_loss(out.recon, images, out.mu, out.logvar, out.prior_mu, out.prior_logvar, 1.0,
                          likelihood=self.cfg.loss.likelihood)
        return {**terms, "gen_mse": generation_error(self.generator, images, word_ids).mean()}


class GANFamily(Family):
    """``gan``: DF-GAN's one-stage adversarial training with a CA generator.

    Per batch, one discriminator step then one generator step (DF-GAN trains them 1:1):
      D: hinge on (real, caption) vs (real, mismatched caption) and (fake, caption), + MA-GP;
      G: -D(fake, caption) + beta * KL of the conditioning augmentation (StackGAN).
    Optimizers: Adam with betas (0.0, 0.9), D's learning rate ``optim.disc_lr`` (DF-GAN:
    G 1e-4, D 4e-4).
    """

    TRAIN_TERMS = ("loss", "g_adv", "kl", "align", "gp", "d_loss", "d_real", "d_mismatch", "d_fake")
    EVAL_TERMS = ("loss", "kl", "align", "d_loss", "d_real", "d_mismatch", "d_fake", "gen_mse")

    def __init__(self, cfg: Config, vectors: np.ndarray, alignment_encoder: DualEncoder | None = None):
        super().__init__(cfg, vectors, alignment_encoder)
        self.discriminator = build_discriminator(cfg.model, vectors)
        if cfg.loss.align_weight > 0 and alignment_encoder is None:
            raise ValueError("loss.align_weight > 0 needs the frozen alignment-loss encoder "
                             "(t2i.encoders.ALIGNMENT_LOSS)")

    @property
    def selection_metric(self) -> str:
        # With the alignment loss: how well each dev caption's random draw picks out that
        # caption among the batch's, under the frozen loss encoder (not the judge). The
        # caption-only MSE would rank the blurriest epoch best.
        return "dev_align" if self.alignment_encoder is not None else "dev_gen_mse"

    def _alignment(self, images: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
        if self.alignment_encoder is None:
            return images.new_zeros(())
        return alignment_loss(self.alignment_encoder, images.float(), word_ids)

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "discriminator": self.discriminator}

    def _build_optimizers(self) -> None:
        optim, epochs = self.cfg.optim, self.cfg.train.epochs
        self.optimizers = {"model": make_optimizer(self.model.parameters(), optim),
                           "discriminator": make_optimizer(self.discriminator.parameters(), optim, optim.disc_lr)}
        self.schedulers = {k: make_scheduler(o, optim, epochs) for k, o in self.optimizers.items()}

    def train_step(self, images: torch.Tensor, word_ids: torch.Tensor, epoch_progress: float,
                   autocast: Autocast = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        d_terms = self.discriminator_step(images, word_ids, autocast)
        return {**self.generator_step(word_ids, autocast), **d_terms}

    def discriminator_step(self, images: torch.Tensor, word_ids: torch.Tensor,
                           autocast: Autocast = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        """Hinge on (real, caption) vs (real, mismatched caption) and (fake, caption), + MA-GP."""
        # One forward over [real | real | fake] so DDP sees one pass. The fake is drawn
        # without a graph: a DDP forward that never gets a backward breaks DDP.
        with torch.no_grad(), autocast():
            fake, _, _ = self.model(word_ids)
        logits = self.discriminator(torch.cat([images, images, fake.float()]),
                                    torch.cat([word_ids, mismatched_captions(word_ids), word_ids]))
        terms = discriminator_hinge_loss(*logits.float().chunk(3))
        critic = unwrap(self.discriminator)
        penalty = matching_aware_gradient_penalty(critic.score, images, critic.encode_text(word_ids),
                                                  k=self.cfg.loss.gp_weight)
        clip_and_step(terms["d_loss"] + penalty, self.discriminator, self.optimizers["discriminator"],
                      self.cfg.optim.grad_clip)
        return {**{k: v.detach() for k, v in terms.items()}, "gp": penalty.detach()}

    def generator_step(self, word_ids: torch.Tensor,
                       autocast: Autocast = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        """A fresh sample scored by the discriminator, + beta * KL of the CA Gaussian
        (StackGAN), + align_weight * the DAMSM-style sentence loss (AttnGAN, eq. 14)."""
        with autocast():
            fake, mu, logvar = self.model(word_ids)
        adversarial = generator_hinge_loss(self.discriminator(fake.float(), word_ids).float())
        kl = standard_normal_kl(mu, logvar)
        align = self._alignment(fake, word_ids)
        loss = adversarial + self.cfg.loss.beta * kl + self.cfg.loss.align_weight * align
        # The discriminator's gradients from this backward are dropped at its next zero_grad.
        clip_and_step(loss, self.model, self.optimizers["model"], self.cfg.optim.grad_clip)
        return {"loss": loss.detach(), "g_adv": adversarial.detach(), "kl": kl.detach(), "align": align.detach()}

    @torch.no_grad()
    def eval_terms(self, images: torch.Tensor, word_ids: torch.Tensor,
                   autocast: Autocast = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        """The discriminator's view of held-out pairs (a real, matching pair should score
        high; the same image with another caption low) and the caption-only generation error."""
        generator, critic = self.generator, unwrap(self.discriminator)
        with autocast():
            fake, mu, logvar = generator(word_ids)
        logits = critic(torch.cat([images, images, fake.float()]),
                        torch.cat([word_ids, mismatched_captions(word_ids), word_ids])).float()
        d_terms = discriminator_hinge_loss(*logits.chunk(3))
        kl = standard_normal_kl(mu, logvar)
        align = self._alignment(fake, word_ids)
        loss = generator_hinge_loss(logits.chunk(3)[2]) + self.cfg.loss.beta * kl + self.cfg.loss.align_weight * align
        return {"loss": loss, "kl": kl, "align": align, **d_terms,
                "gen_mse": generation_error(generator, images, word_ids).mean()}


def standard_normal_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(0, I)) summed over dims, batch mean (StackGAN's CA term)."""
    mu, logvar = mu.float(), logvar.float()
    return gaussian_kl(mu, logvar, torch.zeros_like(mu), torch.zeros_like(logvar)).sum(1).mean()


def mismatched_captions(word_ids: torch.Tensor) -> torch.Tensor:
    """Each image paired with the next image's caption (DF-GAN's batch roll by one)."""
    return torch.roll(word_ids, shifts=1, dims=0)


FAMILIES: dict[str, type[Family]] = {"seed": VAEFamily, "cvae": VAEFamily, "gan": GANFamily}


def make_family(cfg: Config, vectors: np.ndarray, alignment_encoder: DualEncoder | None = None) -> Family:
    """``alignment_encoder``: the frozen encoder of the gan's alignment loss (when used)."""
    return FAMILIES[cfg.model.family](cfg, vectors, alignment_encoder)
