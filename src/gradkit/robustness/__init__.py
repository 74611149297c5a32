"""Adversarial examples, attacks and their analysis."""
from .pgd import NORMS, PGD, adversarial_loss, pgd_attack, pgd_train, robust_accuracy
from .blur import gaussian_blur, gaussian_kernel1d

__all__ = ["NORMS", "PGD", "pgd_attack", "adversarial_loss", "pgd_train", "robust_accuracy", "gaussian_blur", "gaussian_kernel1d"]
