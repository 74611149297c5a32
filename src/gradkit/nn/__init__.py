"""Modules: gradient reversal and domain heads, binary layers."""
from .binary import BinaryConv2d, BinaryLinear, BinaryModule, binary_modules, set_estimator_param
from .gradient_reversal import DomainClassifier, GradientReversal, domain_loss

__all__ = ["GradientReversal", "DomainClassifier", "domain_loss", "BinaryModule", "BinaryLinear", "BinaryConv2d",
           "binary_modules", "set_estimator_param"]
