"""t2i: VAE-inspired text-to-image generation, trained and tuned on Ray."""

__version__ = "0.1.0"
