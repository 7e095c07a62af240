"""Evaluation of checkpoints: image metrics, alignment judges, baselines (``evaluate``) and
the seed's Table 2 (``table2``). No Ray."""
