"""Ray itself: starting or joining a cluster and its settings (``ray_env``), the epoch lines
relayed to the console (``relay``), and hyperparameter sweeps on Ray Tune (``tune``)."""
