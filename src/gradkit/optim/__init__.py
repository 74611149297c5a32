"""Optimizers and gradient transforms that edit parameter gradients before the update."""
from .gradient_noise import GradientNoise
from .mfac import MFAC
from .orthogonal import OrthogonalGradient, orthogonal_combine

__all__ = ["GradientNoise", "OrthogonalGradient", "orthogonal_combine", "MFAC"]
