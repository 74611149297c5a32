"""Measurements of models and training."""
from .binary import estimating_error, gradient_stability
from .domain import proxy_a_distance

__all__ = ["proxy_a_distance", "estimating_error", "gradient_stability"]
