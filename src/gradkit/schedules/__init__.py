"""Schedules: plain callables of training progress or step."""
from .dann import dann_lambda, dann_lr, dann_lr_lambda
from .exp_decay import exp_decay_weight
from .noise import annealed_noise_std
from .field_beta import field_beta
from .reste import reste_power

__all__ = ["dann_lambda", "dann_lr", "dann_lr_lambda", "annealed_noise_std", "reste_power", "exp_decay_weight", "field_beta"]
