"""gradkit: gradient techniques from papers as PyTorch components, with reproduced claims.

Subpackages by what a technique does to gradients: ``functional`` (autograd Functions),
``nn`` (modules), ``optim`` (gradient transforms and optimizers), ``probes`` (measurements),
``schedules``, ``data``, ``claims`` (the reproduction suite), ``testing`` (oracles).
"""
__version__ = "0.1.0"
