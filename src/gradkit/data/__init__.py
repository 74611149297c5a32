"""Data: bundled sets (digits, mnist1d, procedural) and readers of standard files under a root."""
from .batches import TensorBatches
from .bundled import Split, cache_dir, digits_images, load_digits_images_split, load_digits_split, load_mnist1d, standardise
from .errors import DataError
from .in_context import InContextLinearRegression
from .opposing_signals import OpposingSignalData, opposing_signal_data

__all__ = ["TensorBatches", "Split", "cache_dir", "load_digits_split", "digits_images", "load_digits_images_split", "load_mnist1d", "standardise",
           "DataError", "InContextLinearRegression", "OpposingSignalData", "opposing_signal_data"]
