"""What each model family trains, behind one small interface the training loop calls.

A family object owns its networks, optimizers and schedulers, and supplies one training
step, the evaluation terms of one batch, its per-epoch scheduler step and its state for
checkpoints. ``t2i.training.loop`` runs the same epoch loop, checkpointing and resume for every
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
import copy
from collections.abc import Callable

import numpy as np
import torch

from t2i.config import Config
from t2i.evaluation.metrics import mse
from t2i.models import build_discriminator, build_model
from t2i.models.dual_encoder import DualEncoder
from t2i.training.augment import diff_augment, parse_policy
from t2i.training.losses import (
    alignment_loss,
    discriminator_hinge_loss,
    elbo_loss,
    generator_hinge_loss,
    kl_weight,
    matching_aware_gradient_penalty,
    mode_seeking_loss,
    other_image_rows,
    pooled_alignment_loss,
    standard_normal_kl,
)
from t2i.training.optim import clip_and_step, extend_schedule, make_optimizer, make_scheduler
from t2i.training.spectrum import SpectrumTracker, inference_draws

Autocast = Callable[[], contextlib.AbstractContextManager]


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

    def selection(self, metrics: dict) -> tuple[float, str]:
        """What this epoch's checkpoint is ranked by (lower is better) and its name: the
        dev generation metric, or without an evaluation split the fallback train metric
        (never a warm-up- or beta-weighted loss, which would favour the warm-up epochs), or,
        for a family without one, the epoch itself so the latest ranks first."""
        if self.selection_metric in metrics:
            return metrics[self.selection_metric], self.selection_metric
        if self.FALLBACK_SELECTION:
            return metrics[self.FALLBACK_SELECTION], self.FALLBACK_SELECTION
        return -float(metrics["epoch"]), "latest epoch"

    def __init__(self, cfg: Config, vectors: np.ndarray, alignment_encoder: DualEncoder | None = None,
                 dev_distractors: np.ndarray | None = None):
        self.cfg = cfg
        self.model = build_model(cfg.model, vectors)
        # A frozen helper network (the gan's alignment loss; the config refuses the weight
        # for other families): never trained or checkpointed here (cached beside the data).
        self.alignment_encoder = alignment_encoder
        # dev_align's fixed candidate captions (train-split rows): the same for every pair.
        self.dev_distractors = None if dev_distractors is None else torch.as_tensor(dev_distractors).long()
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

    def move_frozen_helpers(self, device: torch.device) -> None:
        """Move the frozen helper networks (which :meth:`wrap` leaves alone) to ``device``."""
        if self.alignment_encoder is not None:
            self.alignment_encoder.to(device)
        if self.dev_distractors is not None:
            self.dev_distractors = self.dev_distractors.to(device)

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

    def learning_rates(self) -> dict[str, float]:
        """The current learning rate of every optimizer, by network."""
        return {name: optimizer.param_groups[0]["lr"] for name, optimizer in self.optimizers.items()}

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
            optimizer.load_state_dict(training["optimizers"][key])
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
        terms = elbo_loss(out, images, weight, loss_cfg.free_bits, loss_cfg.likelihood)
        clip_and_step(terms["loss"], self.model, self.optimizers["model"], self.cfg.optim.grad_clip)
        return {**{k: v.detach() for k, v in terms.items()}, "kl_weight": torch.tensor(weight)}

    @torch.no_grad()
    def eval_terms(self, images: torch.Tensor, word_ids: torch.Tensor,
                   autocast: Autocast = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        """Plain negative ELBO (beta = 1, comparable across runs whatever they train with),
        its MSE and KL, and the caption-only generation error."""
        with autocast():
            out = self.generator(images, word_ids)
        terms = elbo_loss(out, images, 1.0, likelihood=self.cfg.loss.likelihood)
        return {**terms, "gen_mse": generation_error(self.generator, images, word_ids).mean()}


class GANFamily(Family):
    """``gan``: DF-GAN's one-stage adversarial training with a CA generator.

    Per batch, one discriminator step then one generator step (DF-GAN trains them 1:1):
      D: hinge on (real, caption) vs (real, mismatched caption) and (fake, caption), + MA-GP;
      G: -D(fake, caption) + beta * KL of the conditioning augmentation (StackGAN).
    Optimizers: Adam with betas (0.0, 0.9), D's learning rate ``optim.disc_lr`` (DF-GAN:
    G 1e-4, D 4e-4).
    """

    TRAIN_TERMS = ("loss", "g_adv", "kl", "align", "mode_seeking", "spectrum", "gp", "d_loss", "d_real", "d_mismatch", "d_fake")
    EVAL_TERMS = ("loss", "kl", "align", "d_loss", "d_real", "d_mismatch", "d_fake", "gen_mse")

    def __init__(self, cfg: Config, vectors: np.ndarray, alignment_encoder: DualEncoder | None = None,
                 dev_distractors: np.ndarray | None = None):
        super().__init__(cfg, vectors, alignment_encoder, dev_distractors)
        self.discriminator = build_discriminator(cfg.model, vectors)
        self.augment = parse_policy(cfg.loss.augment)
        self.align_augment = parse_policy(cfg.loss.align_augment)
        # The averaged generator samples, ranks checkpoints and is what model.pt holds; the
        # trained one is kept in the training state for resuming.
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval() if cfg.optim.ema_decay > 0 else None
        self.spectra = (SpectrumTracker(cfg.model.image_size, weighting=cfg.loss.spectrum_weighting,
                                        outlier_gap=cfg.loss.spectrum_outlier_gap, window=cfg.loss.spectrum_window,
                                        integral_rate=cfg.loss.spectrum_integral, integral_limit=cfg.loss.spectrum_integral_limit)
                        if cfg.loss.spectrum_weight > 0 else None)
        if cfg.loss.align_weight > 0 and alignment_encoder is None:
            raise ValueError("loss.align_weight > 0 needs the frozen alignment-loss encoder "
                             "(t2i.training.encoders.ALIGNMENT_LOSS)")

    @property
    def selection_metric(self) -> str:
        # With the alignment loss: how well each dev caption's random draw picks out that
        # caption among a fixed pool of others, under the frozen loss encoder (not the
        # judge). The caption-only MSE would rank the blurriest epoch best.
        return "dev_align" if self.alignment_encoder is not None else "dev_gen_mse"

    def _alignment(self, images: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
        """The sentence loss on the images as ``loss.align_augment`` transforms them: against one
        fixed view, G learns textures the frozen encoder alone reads (stripes that fool it and no
        other network); a fresh random view per step averages them out, as CLIP-guided
        generation scores augmented crops (expectation over transformation, Athalye et al. 2018)."""
        if self.alignment_encoder is None:
            return images.new_zeros(())
        return alignment_loss(self.alignment_encoder, diff_augment(images.float(), self.align_augment), word_ids)

    @property
    def generator(self) -> torch.nn.Module:
        return self.ema if self.ema is not None else unwrap(self.model)

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema = decay * ema + (1 - decay) * weights; batch-norm statistics copied as they are."""
        decay = self.cfg.optim.ema_decay
        trained = unwrap(self.model)
        for averaged, current in zip(self.ema.parameters(), trained.parameters()):
            averaged.lerp_(current.detach(), 1.0 - decay)
        for averaged, current in zip(self.ema.buffers(), trained.buffers()):
            averaged.copy_(current)

    def move_frozen_helpers(self, device: torch.device) -> None:
        super().move_frozen_helpers(device)
        if self.ema is not None:
            self.ema.to(device, memory_format=torch.channels_last)
        if self.spectra is not None:
            self.spectra.to(device)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.ema is not None:  # model.pt's `model` holds the average
            state["networks"]["trained_generator"] = unwrap(self.model).state_dict()
        if self.spectra is not None:  # the spectral term's running spectra
            state["spectra"] = self.spectra.state_dict()
        return state

    def load_networks(self, state: dict) -> None:
        networks = dict(state["training"]["networks"])
        trained = networks.pop("trained_generator", None)
        # Written without averaging, a checkpoint's `model` is the trained generator itself.
        self.model.load_state_dict(trained if trained is not None else state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["model"])
        for name, weights in networks.items():
            self.networks()[name].load_state_dict(weights)
        if self.spectra is not None and "spectra" in state["training"]:
            self.spectra.load_state_dict(state["training"]["spectra"])

    def _dev_alignment(self, images: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
        """dev_align: each pair against the fixed distractor pool (never the batch's captions)."""
        if self.alignment_encoder is None:
            return images.new_zeros(())
        if self.dev_distractors is None:
            raise ValueError("dev_align needs the fixed distractor captions (make_family's dev_distractors)")
        return pooled_alignment_loss(self.alignment_encoder, images.float(), word_ids, self.dev_distractors)

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model, "discriminator": self.discriminator}

    def _build_optimizers(self) -> None:
        optim, epochs = self.cfg.optim, self.cfg.train.epochs
        self.optimizers = {"model": make_optimizer(self.model.parameters(), optim),
                           "discriminator": make_optimizer(self.discriminator.parameters(), optim, optim.disc_lr)}
        self.schedulers = {k: make_scheduler(o, optim, epochs) for k, o in self.optimizers.items()}

    def train_step(self, images: torch.Tensor, word_ids: torch.Tensor, epoch_progress: float,
                   autocast: Autocast = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        """DF-GAN's step: one generator pass, whose sample D first learns to reject and G
        then learns from (its graph kept for the G step)."""
        batch = len(word_ids)
        pairs = batch // MODE_SEEKING_SHARE if self.cfg.loss.mode_seeking_weight > 0 else 0
        with autocast():  # the first `pairs` captions drawn a second time, in the same pass
            drawn, mu, logvar = self.model(torch.cat([word_ids, word_ids[:pairs]]))
        fake, redrawn = drawn[:batch], drawn[batch:]
        d_terms = self.discriminator_step(images, word_ids, fake.detach())
        with autocast():
            measured = (inference_draws(unwrap(self.model), word_ids)
                        if self.spectra is not None and self.cfg.loss.spectrum_measure == "inference" else None)
        return {**self.generator_step(word_ids, fake, mu[:batch], logvar[:batch], redrawn if pairs else None,
                                      images, measured), **d_terms}

    def discriminator_step(self, images: torch.Tensor, word_ids: torch.Tensor,
                           fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hinge on (real, caption) vs (another real image, caption) and (fake, caption),
        + MA-GP from the same real logits: the trunk sees B real + B fake images, once."""
        real = images.detach().float().requires_grad_(True)  # MA-GP differentiates w.r.t. it
        real_logits, mismatched, fake_logits, sentence = self.discriminator(
            diff_augment(real, self.augment), diff_augment(fake.float(), self.augment), word_ids,
            other_image_rows(images))
        terms = discriminator_hinge_loss(real_logits.float(), mismatched.float(), fake_logits.float())
        penalty = matching_aware_gradient_penalty(real_logits, real, sentence, k=self.cfg.loss.gp_weight)
        clip_and_step(terms["d_loss"] + penalty, self.discriminator, self.optimizers["discriminator"],
                      self.cfg.optim.grad_clip)
        return {**{k: v.detach() for k, v in terms.items()}, "gp": penalty.detach()}

    def generator_step(self, word_ids: torch.Tensor, fake: torch.Tensor, mu: torch.Tensor,
                       logvar: torch.Tensor, redrawn: torch.Tensor | None = None,
                       real: torch.Tensor | None = None, measured: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The D step's sample scored by the just-updated discriminator, + beta * KL of the
        CA Gaussian (StackGAN), + align_weight * the DAMSM-style sentence loss (AttnGAN, eq. 14),
        + mode_seeking_weight * MSGAN's term on ``redrawn``, second draws of the first captions,
        + spectrum_weight * Durall et al.'s spectral term against the ``real`` batch (gap read from ``measured``).
        D is used unwrapped and frozen here: its gradients are neither computed nor
        all-reduced (the D step did that)."""
        critic = unwrap(self.discriminator)
        critic.requires_grad_(False)
        try:
            seen = diff_augment(fake.float(), self.augment)  # as D saw the fakes (DiffAugment)
            adversarial = generator_hinge_loss(critic.score(seen, critic.encode_text(word_ids)).float())
            kl = standard_normal_kl(mu, logvar)
            align = self._alignment(fake, word_ids)
            diverse = mode_seeking_loss(fake[: len(redrawn)], redrawn) if redrawn is not None else fake.new_zeros(())
            spectrum = self.spectra(fake, real, measured) if self.spectra is not None and real is not None else fake.new_zeros(())
            loss = (adversarial + self.cfg.loss.beta * kl + self.cfg.loss.align_weight * align
                    + self.cfg.loss.mode_seeking_weight * diverse + self.cfg.loss.spectrum_weight * spectrum)
            clip_and_step(loss, self.model, self.optimizers["model"], self.cfg.optim.grad_clip)
        finally:
            critic.requires_grad_(True)
        if self.ema is not None:
            self.update_ema()
        return {"loss": loss.detach(), "g_adv": adversarial.detach(), "kl": kl.detach(), "align": align.detach(),
                "mode_seeking": diverse.detach(), "spectrum": spectrum.detach()}

    @torch.no_grad()
    def eval_terms(self, images: torch.Tensor, word_ids: torch.Tensor,
                   autocast: Autocast = contextlib.nullcontext) -> dict[str, torch.Tensor]:
        """The discriminator's view of held-out pairs (a real, matching pair should score
        high; the same image with another caption low) and the caption-only generation error."""
        generator, critic = self.generator, unwrap(self.discriminator)
        with autocast():
            fake, mu, logvar = generator(word_ids)
        real, mismatched, fake_logits, _ = critic(images, fake.float(), word_ids, other_image_rows(images))
        d_terms = discriminator_hinge_loss(real.float(), mismatched.float(), fake_logits.float())
        kl = standard_normal_kl(mu, logvar)
        align = self._dev_alignment(fake, word_ids)
        loss = generator_hinge_loss(fake_logits.float()) + self.cfg.loss.beta * kl + self.cfg.loss.align_weight * align
        return {"loss": loss, "kl": kl, "align": align, **d_terms,
                "gen_mse": generation_error(generator, images, word_ids).mean()}


MODE_SEEKING_SHARE = 4  # a quarter of each batch is drawn twice: +25% generator work, not MSGAN's +100%
DEV_ALIGN_DISTRACTORS = 99  # dev_align ranks each caption among 100, as R-precision does

FAMILIES: dict[str, type[Family]] = {"seed": VAEFamily, "cvae": VAEFamily, "gan": GANFamily}


def make_family(cfg: Config, vectors: np.ndarray, alignment_encoder: DualEncoder | None = None,
                dev_distractors: np.ndarray | None = None) -> Family:
    """``alignment_encoder``: the frozen encoder of the gan's alignment loss (when used); ``dev_distractors``:
    dev_align's fixed candidate captions (``DEV_ALIGN_DISTRACTORS`` rows of the train split, drawn on the driver)."""
    return FAMILIES[cfg.model.family](cfg, vectors, alignment_encoder, dev_distractors)
