"""Adversarial examples, attacks and their analysis."""
from .pgd import NORMS, PGD, adversarial_loss, pgd_attack, pgd_train, robust_accuracy
from .blur import gaussian_blur, gaussian_kernel1d
from .fgsm import FGSM, fgsm
from .eot import GaussianNoise, RandomShift
from .transfer import TransferResult, transfer_matrix
from .linear_probe import LinearProbe
from .toy_renderer import ToyRenderer
from .dta import (DifferentiableTransformationNetwork, TexturePool, detection_rate, eot_texture_attack, expand_texture,
                  make_dtn_pairs, masked_psnr, naive_paste, random_tiles, train_dtn)
from .boundary_tilting import (adversarial_strength, boundary_distance, deviation_angle, local_linearisation, margin,
                               minimal_adversarial, mirror_images, nearest_centroid_direction, tilt)

__all__ = ["NORMS", "PGD", "pgd_attack", "adversarial_loss", "pgd_train", "robust_accuracy", "gaussian_blur", "gaussian_kernel1d", "FGSM", "fgsm", "GaussianNoise", "RandomShift", "TransferResult", "transfer_matrix", "LinearProbe", "adversarial_strength", "boundary_distance", "deviation_angle", "local_linearisation", "margin", "minimal_adversarial", "mirror_images", "nearest_centroid_direction", "tilt", "ToyRenderer", "DifferentiableTransformationNetwork", "TexturePool", "expand_texture", "naive_paste", "make_dtn_pairs", "train_dtn", "eot_texture_attack", "masked_psnr", "detection_rate", "random_tiles"]
