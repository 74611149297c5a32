"""Learned and classical solvers whose gradients train or flow through them."""
from .attention_svm import (AttentionSVMSolution, InfeasibleSVMError, attention_svm, optimal_tokens, solve_attention_svm,
                            svm_constraints, svm_margins)
from .krylov import (IC0, AMGPreconditioner, NotSPDError, Operator, SolveResult, SolveState, amg_preconditioner, as_operator,
                     begin_solve, cg, check_spd, solve)
from .deep_cg import (DeepConjugateDirection, apply_direction, dcdm, lanczos_ritz, ritz_rhs_dataset,
                      scale_invariant_residual_loss)
from .convex_relu import (ADMMHistory, ADMMResult, ConvexReLUProblem, admm_convex_relu, check_sign_labels,
                          group_soft_threshold, nonconvex_objective, sign_accuracy)
from .relu_patterns import check_patterns, enumerate_patterns_2d, sample_patterns
from .lpinn import (CharacteristicFoldError, LagrangianPINN, LPINNLoss, PeriodicMLP, PINNLoss, characteristic_folds,
                    lagrangian_to_eulerian, lpinn_loss, lpinn_residuals, pinn_loss, pinn_residual)
from .mgno import MgNO
from .operator_losses import relative_h1_loss, relative_lp_loss
from .local_reg import LocalErrorRegularizer, global_error_regularizer
from .lstsq_iterates import gd_iterates, inverse_spectral_lr, min_norm_lstsq, newton_alpha, newton_iterates, newton_schulz_pinv
from .neural_ode import Autonomous, NeuralODE
from .ode import Dopri5, ODESolution, ODESolverError, RKStep
from .proximal import GammaSchedule, InversionResult, LearnedProx, PnPResult, invert_gradient, pnp_pgd, proximal_matching_loss

__all__ = ["solve_attention_svm", "attention_svm", "optimal_tokens", "svm_constraints", "svm_margins",
           "AttentionSVMSolution", "InfeasibleSVMError", "Dopri5", "ODESolution", "ODESolverError", "RKStep",
           "LocalErrorRegularizer", "global_error_regularizer", "NeuralODE", "Autonomous", "newton_schulz_pinv",
           "newton_iterates", "gd_iterates", "newton_alpha", "inverse_spectral_lr", "min_norm_lstsq", "LearnedProx",
           "proximal_matching_loss", "GammaSchedule", "invert_gradient", "InversionResult", "pnp_pgd", "PnPResult", "solve", "cg", "SolveResult", "NotSPDError", "IC0", "AMGPreconditioner", "amg_preconditioner", "as_operator", "Operator", "check_spd", "begin_solve", "SolveState", "DeepConjugateDirection", "dcdm", "apply_direction", "scale_invariant_residual_loss", "ritz_rhs_dataset", "lanczos_ritz", "ADMMHistory", "ADMMResult", "ConvexReLUProblem", "admm_convex_relu", "check_sign_labels", "group_soft_threshold", "nonconvex_objective", "sign_accuracy", "check_patterns", "enumerate_patterns_2d", "sample_patterns", "CharacteristicFoldError", "LagrangianPINN", "LPINNLoss", "PeriodicMLP", "PINNLoss", "characteristic_folds", "lagrangian_to_eulerian", "lpinn_loss", "lpinn_residuals", "pinn_loss", "pinn_residual", "MgNO", "relative_lp_loss", "relative_h1_loss"]
