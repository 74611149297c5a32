"""Gradient leakage: inversion attacks, their presets and reconstruction metrics."""
from .dia import DIAPreset, DropoutInversionAttack, DropoutMaskSpace, client_gradients
from .gifd import GIFD, FeatureSpace, feature_radius, project_l1_ball
from .hyperfl_attacks import (HiddenClientSpace, HyperFLServerView, hyperfl_inversion, hyperfl_readout,
                              linear_readout, shared_gradients)
from .inversion import (PRESETS, GradientInversion, InversionPreset, InversionResult, LatentSpace, PixelSpace,
                        SearchSpace, register_preset)
from .matching import check_gradients, gradient_distance, infer_labels, model_gradients, total_variation
from .metrics import match_order, mse, psnr, reconstruction_metrics, ssim

__all__ = ["GradientInversion", "InversionPreset", "InversionResult", "PRESETS", "register_preset", "SearchSpace",
           "PixelSpace", "LatentSpace", "model_gradients", "check_gradients", "gradient_distance",
           "total_variation", "infer_labels", "mse", "psnr", "ssim", "match_order", "reconstruction_metrics",
           "DropoutInversionAttack", "DropoutMaskSpace", "DIAPreset", "client_gradients",
           "GIFD", "FeatureSpace", "project_l1_ball", "feature_radius",
           "linear_readout", "hyperfl_readout", "HiddenClientSpace", "HyperFLServerView", "hyperfl_inversion",
           "shared_gradients"]
