"""Gradient coding (paper slug: sgc): the import path published before codes and schemes were split.

The codes live in :mod:`gradkit.distributed.gradient_codes`, the schemes in
:mod:`gradkit.distributed.coding_schemes`, the straggler models and traces in
:mod:`gradkit.distributed.straggler_models` and the simulator in :mod:`gradkit.distributed.stragglers`
(imported one way: codes -> schemes -> simulator). New code imports from those modules or from
:mod:`gradkit.distributed`; this module only re-exports their names.
"""
from .coding_schemes import SCHEMES, CodingScheme, GCScheme, MSGCScheme, SRSGCScheme, make_scheme
from .gradient_codes import (CodingError, DecodeError, GradientCode, Task, compute_task, cyclic_repetition_code,
                             fractional_repetition_code, partition)

__all__ = [
    "CodingError", "DecodeError", "Task", "GradientCode", "fractional_repetition_code",
    "cyclic_repetition_code", "partition", "compute_task", "CodingScheme", "GCScheme", "SRSGCScheme",
    "MSGCScheme", "SCHEMES", "make_scheme",
]
