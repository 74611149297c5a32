"""Data: bundled sets (digits, mnist1d, procedural) and readers of standard files under a root."""
from .batches import TensorBatches
from .bundled import Split, cache_dir, digits_images, load_digits_images_split, load_digits_split, load_mnist1d, standardise
from .errors import DataError
from .in_context import InContextLinearRegression
from .opposing_signals import OpposingSignalData, opposing_signal_data
from .poisson2d import poisson2d, poisson2d_eigenpairs, scipy_to_torch_csr, smooth_random_rhs
from .transport import burgers_solution, convection_diffusion_solution
from .darcy import darcy_coefficients, darcy_solve, darcy_split, gaussian_random_field
from .diffusion_sorption import PDEProblems, diffusion_sorption_problems, heat_problems

from .garments import GarmentPairs, garment_pairs
__all__ = ["TensorBatches", "Split", "cache_dir", "load_digits_split", "digits_images", "load_digits_images_split", "load_mnist1d", "standardise",
           "DataError", "InContextLinearRegression", "OpposingSignalData", "opposing_signal_data", "poisson2d", "poisson2d_eigenpairs", "smooth_random_rhs", "scipy_to_torch_csr", "burgers_solution", "convection_diffusion_solution", "darcy_split", "darcy_solve", "darcy_coefficients", "gaussian_random_field", "diffusion_sorption_problems", "heat_problems", "PDEProblems", "garment_pairs", "GarmentPairs"]
