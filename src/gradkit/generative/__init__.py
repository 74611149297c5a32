"""Generative models as components: layered generators whose intermediate features can be searched."""
from .layered import LayeredGenerator, SmallVAE, small_generator, train_small_generator, vae_loss

__all__ = ["LayeredGenerator", "SmallVAE", "small_generator", "train_small_generator", "vae_loss"]
