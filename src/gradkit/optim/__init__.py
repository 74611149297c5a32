"""Optimizers and gradient transforms that edit parameter gradients before the update."""
from .gradient_noise import GradientNoise

__all__ = ["GradientNoise"]
