"""Measurements of models and training."""
from .activations import ResidualStreamProbe, count_spikes, hidden_state_stats
from .binary import estimating_error, gradient_stability
from .domain import proxy_a_distance
from .quantization import biper_quantization_error, quantization_error

__all__ = ["proxy_a_distance", "estimating_error", "gradient_stability", "quantization_error",
           "biper_quantization_error",
           "ResidualStreamProbe", "hidden_state_stats", "count_spikes"]
