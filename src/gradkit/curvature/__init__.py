"""Curvature: matrix-free inverse-Fisher products (M-FAC), Optimal-Brain-Surgeon pruning, Hessian-vector products."""
from .fisher import EmpiricalFisherInverse, SlidingFisherInverse
from .hessian import head_hessian, hessian_gradient_product, hutchinson_diag
from .obs import OBSPruner, magnitude_prune, obs_prune_step, sparsity_schedule

__all__ = ["EmpiricalFisherInverse", "SlidingFisherInverse", "OBSPruner", "magnitude_prune", "obs_prune_step",
           "sparsity_schedule", "hessian_gradient_product", "hutchinson_diag", "head_hessian"]
