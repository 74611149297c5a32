"""Generative models as components: layered generators whose intermediate features can be searched, and
the shared Gaussian diffusion utilities (schedule, epsilon-prediction loss, DDIM sampler)."""
from .diffusion import GaussianDiffusion, VPSchedule, timestep_embedding
from .layered import LayeredGenerator, SmallVAE, small_generator, train_small_generator, vae_loss

__all__ = ["GaussianDiffusion", "VPSchedule", "timestep_embedding", "LayeredGenerator", "SmallVAE", "small_generator", "train_small_generator", "vae_loss"]
