"""Super-resolution components: PCL-SR's contrastive loss, its samples, Haar embedder and a small SR net."""
from .degradations import make_contrastive_samples, random_gaussian_blur, sharpen, upscale_factor
from .embedder import WaveletPatchEmbedder
from .net import SUPPORTED_SCALES, ResidualSR
from .pcl_loss import PCLLoss, dual_contrastive_loss, multi_positive_infonce, spatial_cosine
from .wavelet import HaarHighPass, haar_dwt, haar_idwt

__all__ = ["sharpen", "random_gaussian_blur", "make_contrastive_samples", "upscale_factor", "WaveletPatchEmbedder",
           "ResidualSR", "SUPPORTED_SCALES", "PCLLoss", "dual_contrastive_loss", "multi_positive_infonce",
           "spatial_cosine", "HaarHighPass", "haar_dwt", "haar_idwt"]
