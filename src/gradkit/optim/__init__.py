"""Optimizers and gradient transforms that edit parameter gradients before the update.

Gradient transforms follow one protocol (:mod:`gradkit.optim.transform`): ``t(params)`` edits
``.grad`` in place, ``t.state_dict()`` / ``t.load_state_dict()``; run them by hand, with
``wrap(optimizer, *transforms)``, or as hooks with ``t.attach(params)``.
"""
from .gradient_noise import GradientNoise
from .mfac import MFAC
from .normalized_gd import NormalizedGD
from .robust_gd import RobustAggregation, median_of_means, robust_loss, robust_step, winsorized_mean
from .orthogonal import OrthogonalGradient, orthogonal_combine
from .transform import GradientTransform, TransformedOptimizer, TransformHandle, attach, wrap
from .variational_continual import VariationalContinual
from .metaplastic import MetaplasticAdam, metaplastic_factor

__all__ = ["GradientNoise", "OrthogonalGradient", "orthogonal_combine", "MFAC",
           "GradientTransform", "TransformedOptimizer", "TransformHandle", "attach", "wrap", "NormalizedGD",
           "RobustAggregation", "median_of_means", "winsorized_mean", "robust_step", "robust_loss", "VariationalContinual", "MetaplasticAdam", "metaplastic_factor"]
