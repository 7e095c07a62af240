"""Training: model families and their losses and optimizers, checkpoints, a run's files,
the per-worker loop (``loop``) and the driver that plans and runs it on Ray Train (``driver``)."""
