"""Measurements of models and training."""
from .activations import ResidualStreamProbe, count_spikes, hidden_state_stats
from .binary import estimating_error, gradient_stability
from .domain import proxy_a_distance
from .saliency import GradCAM, LayerCapture, LinearApprox, MetaSaliency, NormGrad, Saliency, pointing_game
from .input_gradients import DiffRoarResult, InputGradient, attribution_mask, diffroar, gradient_mass_in_region, input_gradient
from .quantization import biper_quantization_error, quantization_error

__all__ = ["proxy_a_distance", "estimating_error", "gradient_stability", "quantization_error",
           "biper_quantization_error",
           "ResidualStreamProbe", "hidden_state_stats", "count_spikes", "Saliency", "NormGrad", "GradCAM",
           "LinearApprox", "MetaSaliency", "LayerCapture", "pointing_game", "InputGradient", "input_gradient",
           "attribution_mask", "diffroar", "DiffRoarResult", "gradient_mass_in_region"]
