"""Curvature: matrix-free inverse-Fisher products (M-FAC) and Optimal-Brain-Surgeon pruning."""
from .fisher import EmpiricalFisherInverse, SlidingFisherInverse
from .obs import OBSPruner, magnitude_prune, obs_prune_step, sparsity_schedule

__all__ = ["EmpiricalFisherInverse", "SlidingFisherInverse", "OBSPruner", "magnitude_prune", "obs_prune_step",
           "sparsity_schedule"]
