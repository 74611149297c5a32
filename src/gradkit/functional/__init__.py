"""Stateless autograd Functions and their function forms: what changes a tensor's backward."""
from .compressed import ActQuantizer, q_gelu, q_layer_norm, q_linear, q_matmul, q_softmax
from .noise import add_gradient_noise
from .periodic import ApproxSign, BiPerSign, NormApproxSign, approx_sign, biper_binarize, norm_approx_sign
from .reversal import GradReverse, grad_reverse
from .reversible import DriftMonitor, MultiLevelReversibleFunction, ReversibleStep, invert_steps, run_steps
from .implicit_nlls import ImplicitNLLS, NLLSResult, implicit_nlls, lm_solve, unrolled_nlls
from .field_kl import FieldKL, binary_field_kl
from .scale import GradScale, ModulatedFusion, grad_scale, modulated_fusion
from .straight_through import (ESTIMATORS, ReSTESign, STESign, binarize_sign, get_estimator, power_surrogate,
                               register_estimator, reste_derivative, reste_sign, ste_derivative, ste_sign)
from .tract import TrActConv2dFn, TrActLinearFn, tract_conv2d, tract_linear, tract_weight_grad

from .flow_warp import (erase_z_loss, identity_grid, jacobian_det, normalize_flow, upsample_flow, warp2d,
                        warp_with_erase)
__all__ = ["GradReverse", "grad_reverse", "add_gradient_noise", "ReSTESign", "STESign", "reste_sign", "ste_sign",
           "binarize_sign", "power_surrogate", "reste_derivative", "ste_derivative", "ESTIMATORS",
           "register_estimator", "get_estimator", "BiPerSign", "ApproxSign", "NormApproxSign", "biper_binarize",
           "approx_sign", "norm_approx_sign", "TrActLinearFn", "TrActConv2dFn", "tract_linear", "tract_conv2d",
           "tract_weight_grad", "ActQuantizer", "q_linear", "q_gelu", "q_softmax", "q_matmul", "q_layer_norm",
           "GradScale", "grad_scale", "ModulatedFusion", "modulated_fusion", "MultiLevelReversibleFunction",
           "ReversibleStep", "run_steps", "invert_steps", "DriftMonitor", "ImplicitNLLS", "implicit_nlls", "unrolled_nlls", "lm_solve", "NLLSResult", "FieldKL", "binary_field_kl", "warp2d", "warp_with_erase", "erase_z_loss", "jacobian_det", "normalize_flow", "upsample_flow", "identity_grid"]
