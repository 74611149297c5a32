"""Measurements of models and training."""
from .activations import ResidualStreamProbe, count_spikes, hidden_state_stats
from .binary import estimating_error, gradient_stability
from .domain import proxy_a_distance
from .saliency import GradCAM, LayerCapture, LinearApprox, MetaSaliency, NormGrad, Saliency, pointing_game
from .input_gradients import DiffRoarResult, InputGradient, attribution_mask, diffroar, gradient_mass_in_region, input_gradient
from .quantization import biper_quantization_error, quantization_error
from .attention_svm import AttentionSVMTracker, SVMTrace, direction_correlation, selected_tokens
from .coherence import CoherenceRecord, CoherenceStats, CoherenceTracker, coherence_stats, gradient_coherence, measure_coherence
from .gradient_snr import GradientSNR, SNRStats
from .icl_algorithms import AlgorithmMatch, LayerReadout, best_index, error_similarity, icl_predictions, match_algorithm
from .information import InformationPlaneRecorder, binned_mutual_information, kde_mutual_information, log_spaced_steps
from .opposing_signals import (OpposingSplit, PerExampleLossTracker, antiphase_score, example_gradients, per_example_losses,
                               split_gradients, split_opposing)
from .per_example import check_per_example_model, per_example_grads
from .sharpness import SharpnessTracker, hessian_top_eigenvalue
from .unit_matching import (ActivationRecorder, JointClusters, SparseFit, SparseStitch, UnitMatch, chance_correlation,
                            collect_activations, dead_units, fit_sparse_prediction, joint_spectral_clusters, match_units,
                            partner_r2, prediction_r2, standardize, unit_correlation, units_view)
from .feature_weights import LayerOutputs, feature_weights
from .linear_eval import linear_probe
from .negative_weights import NegativeWeights, negative_weight_stats

from .gradient_conflict import GradientConflictProbe, gradient_cosine
__all__ = ["proxy_a_distance", "estimating_error", "gradient_stability", "quantization_error",
           "biper_quantization_error",
           "ResidualStreamProbe", "hidden_state_stats", "count_spikes", "Saliency", "NormGrad", "GradCAM",
           "LinearApprox", "MetaSaliency", "LayerCapture", "pointing_game", "InputGradient", "input_gradient",
           "attribution_mask", "diffroar", "DiffRoarResult", "gradient_mass_in_region",
           "AttentionSVMTracker", "SVMTrace", "direction_correlation", "selected_tokens",
           "gradient_coherence", "coherence_stats", "measure_coherence", "CoherenceStats", "CoherenceRecord",
           "CoherenceTracker", "GradientSNR", "SNRStats", "LayerReadout", "icl_predictions", "error_similarity",
           "match_algorithm", "AlgorithmMatch", "best_index", "InformationPlaneRecorder", "binned_mutual_information",
           "kde_mutual_information", "log_spaced_steps", "PerExampleLossTracker", "per_example_losses",
           "split_opposing", "split_gradients", "example_gradients", "antiphase_score", "OpposingSplit",
           "per_example_grads", "check_per_example_model", "hessian_top_eigenvalue", "SharpnessTracker",
           "ActivationRecorder", "collect_activations", "units_view", "standardize", "dead_units",
           "unit_correlation", "UnitMatch", "match_units", "chance_correlation", "SparseStitch", "SparseFit",
           "fit_sparse_prediction", "partner_r2", "prediction_r2", "JointClusters", "joint_spectral_clusters", "feature_weights", "LayerOutputs", "linear_probe", "NegativeWeights", "negative_weight_stats", "gradient_cosine", "GradientConflictProbe"]
