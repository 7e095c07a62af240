"""Generation from a checkpoint: captions -> images (``generate``) and image grids (``grid``)."""
