"""Optimizers, learning-rate schedules and one optimisation step, shared by every family."""

from __future__ import annotations

import math

import torch

from t2i.config import OptimConfig


def make_optimizer(params, cfg: OptimConfig, lr: float | None = None) -> torch.optim.Optimizer:
    lr = cfg.lr if lr is None else lr
    params = list(params)
    if cfg.name == "adam":
        # Fused: one kernel updates every parameter, where "foreach" makes a pass per
        # elementwise op (docs/benchmarks.md). CPU and CUDA only.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                fused=fused or None)
    return torch.optim.RMSprop(params, lr=lr, weight_decay=cfg.weight_decay)


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
        group["lr"] = lr  # the scheduler's next step continues from here (its chainable form)


def clip_and_step(loss: torch.Tensor, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  grad_clip: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    optimizer.step()
