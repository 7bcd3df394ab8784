"""DFER-CLIP in JAX / Flax NNX: CLIP towers, the DFER-CLIP video model, data, training."""

__version__ = "0.1.0"
