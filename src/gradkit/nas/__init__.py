"""Gradient-based neural architecture search on weight-entangled supernets (paper slug: tanglenas).

- :class:`EntangledConv2d`, :class:`EntangledLinear`: every candidate is a sub-tensor of one largest weight;
  ``mode="superpose"`` mixes the weights and runs the op once, ``"mixture"`` is DARTS' output mixture.
- :class:`ArchParams`: architecture logits with the DARTS / DrNAS / GDAS samplers and ``combine``.
- :class:`BilevelSearcher`: first- and second-order bi-level search steps.
"""
from .arch import SAMPLERS, ArchParams
from .bilevel import BilevelSearcher
from .entangled import MODES, EntangledConv2d, EntangledLinear

__all__ = ["ArchParams", "BilevelSearcher", "EntangledConv2d", "EntangledLinear", "MODES", "SAMPLERS"]
