"""Generative models as components: layered generators whose intermediate features can be searched, and
the shared Gaussian diffusion utilities (schedule, epsilon-prediction loss, DDIM sampler)."""
from .diffusion import GaussianDiffusion, VPSchedule, timestep_embedding
from .f_distill import (F_DIVERGENCES, FDistillLoss, FDistillTerms, dsm_loss, f_distill_surrogate,
                        f_divergence_weight, f_function, ratio_bce_loss)
from .mixture import GaussianMixture, mode_coverage, rbf_mmd, ring_means
from .dit import MaskedDiTBlock, Routing, TinyDiT, switch_dit_loss
from .invertibility import (FlowMaskHead, InvertibilityDecomposition, blend, error_threshold_mask, fuse_masks,
                            mask_iou, mask_regularizer, ood_error_split, warp)
from .layered import LayeredGenerator, SmallVAE, small_generator, train_small_generator, vae_loss

__all__ = ["GaussianDiffusion", "VPSchedule", "timestep_embedding", "LayeredGenerator", "SmallVAE", "small_generator", "train_small_generator", "vae_loss",
           "F_DIVERGENCES", "FDistillLoss", "FDistillTerms", "dsm_loss", "f_distill_surrogate", "f_divergence_weight",
           "f_function", "ratio_bce_loss", "GaussianMixture", "mode_coverage", "rbf_mmd", "ring_means",
           "MaskedDiTBlock", "Routing", "TinyDiT", "switch_dit_loss",
           "FlowMaskHead", "InvertibilityDecomposition", "blend", "error_threshold_mask", "fuse_masks", "mask_iou",
           "mask_regularizer", "ood_error_split", "warp"]
