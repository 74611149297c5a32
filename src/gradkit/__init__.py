"""gradkit: gradient techniques from papers as PyTorch components, with reproduced claims.

Subpackages by what a technique does to gradients: ``functional`` (autograd Functions),
``nn`` (modules), ``optim`` (gradient transforms and optimizers), ``probes`` (measurements),
``nas`` (architecture search on entangled supernets), ``physics`` (differentiable simulators), ``schedules``, ``data``, ``testing`` (oracles). ``harness`` is the reproduction suite built on
them (claims, runner, results store, report, benchmarks, the ``gradkit`` command); nothing in the
library imports it.
"""
__version__ = "0.1.0"
