"""Federated training on Flower (flwr >= 1.42): gradkit's clients and a validating, observable server.

Paper slug: hyperfl (its Flower path). Install the extra: ``pip install gradkit[flower]``.

- :class:`GradkitFedAvg`: FedAvg that rejects malformed client updates (keys, shapes, dtypes, NaN/Inf,
  bad ``num-examples``) with a logged reason and averages the rest weighted by data size,
  ``global = sum_i n_i / sum_j n_j * arrays_i``; ``on_update(round, client_id, arrays, global_arrays)``
  observes every accepted update (the honest-but-curious server hook).
- :class:`InversionObserver`: such an observer running gradkit's GradientInversion on each update.
- ``client_app:app`` / ``server_app:app``: the ClientApp and ServerApp (FedAvg or HyperFL on digits
  shards); :func:`write_app` writes the app folder's ``pyproject.toml`` for ``flwr run``.
- :func:`check_update`, :func:`check_weight`: the validation, without Flower (the average is
  ``gradkit.distributed.federated.weighted_average``).

Example::

    from gradkit.distributed.flower import write_app
    write_app("gradkit_app", **{"num-server-rounds": 3})    # then: flwr run gradkit_app local --stream
"""
from .app import DEFAULT_RUN_CONFIG, run_config, write_app
from .attack import InversionObserver, ObservedReconstruction, update_to_gradients
from .task import load_partition, local_train, make_model, max_shard
from .validation import check_update, check_weight

__all__ = ["GradkitFedAvg", "Rejection", "record_to_tensors", "tensors_to_record", "InversionObserver",
           "ObservedReconstruction", "update_to_gradients", "check_update", "check_weight",
           "write_app", "run_config", "DEFAULT_RUN_CONFIG", "make_model", "load_partition",
           "local_train", "max_shard"]

_NEEDS_FLWR = {"GradkitFedAvg", "Rejection", "record_to_tensors", "tensors_to_record"}


def __getattr__(name: str):
    """The Flower-dependent names are imported on first use (flwr is an optional dependency)."""
    if name in _NEEDS_FLWR:
        try:
            from . import strategy
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"gradkit.distributed.flower.{name} needs Flower: pip install 'gradkit[flower]' "
                              f"({e})") from e
        return getattr(strategy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
