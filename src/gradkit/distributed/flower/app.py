"""The gradkit Flower app folder: its run configuration and a writer for its ``pyproject.toml``.

Paper slug: hyperfl (the Flower path). A Flower app is a folder whose ``pyproject.toml`` names the
ServerApp and ClientApp objects and holds the run configuration; ``flwr run <folder>`` packs it and
ships it to a SuperLink. gradkit's apps live in the installed package, so the folder holds only
that file; every SuperNode needs gradkit (and flwr) installed.

    path = write_app("my_app", **{"num-server-rounds": 5, "method": "hyperfl"})
    # then: flwr run my_app local --stream      (see docs/flower.md)

Example::

    import tempfile
    path = write_app(tempfile.mkdtemp(), **{"num-server-rounds": 2})
    print(path.read_text().splitlines()[0])
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..._validate import is_int, is_real

__all__ = ["DEFAULT_RUN_CONFIG", "SERVERAPP", "CLIENTAPP", "run_config", "write_app", "app_pyproject"]

SERVERAPP = "gradkit.distributed.flower.server_app:app"
CLIENTAPP = "gradkit.distributed.flower.client_app:app"

# Every key the apps read, with its default (``flwr run --run-config 'key=value'`` overrides them).
DEFAULT_RUN_CONFIG: dict[str, Any] = {
    "num-server-rounds": 3,       # federated rounds
    "method": "fedavg",           # "fedavg" (share everything) or "hyperfl" (share the hypernetwork only)
    "local-epochs": 1,            # client epochs per round (HyperFL: hypernetwork epochs)
    "head-epochs": 1,             # HyperFL only: epochs on the private head first
    "lr": 0.05,                   # client SGD learning rate (HyperFL: of phi and v)
    "head-lr": 0.1,               # HyperFL only: SGD learning rate of the private head
    "momentum": 0.5,              # client SGD momentum (the official HyperFL code's)
    "weight-decay": 0.0005,       # client SGD weight decay
    "batch-size": 32,             # client mini-batch size
    "hidden": 32,                 # feature width of the client model
    "embed-dim": 16,              # HyperFL client embedding size
    "hyper-hidden": 64,           # HyperFL hypernetwork hidden units
    "seed": 0,                    # model initialisation and local shuffling
    "data-seed": 0,               # how the digits are split into client shards
    "min-nodes": 2,               # clients to wait for and sample every round
    "max-examples": 0,            # cap on a node's weight (its reported num-examples); 0 = the largest digits
                                  # training shard when the data are split into min-nodes partitions
    "fraction-evaluate": 1.0,     # share of clients evaluating each round (0 = none)
    "round-timeout": 120.0,       # seconds the server waits for replies in a round
    "attack-iters": 0,            # honest-but-curious server: inversion iterations per update (0 = off)
    "result-path": "",            # write a JSON summary of the run here (server side; "" = don't)
}


def run_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The defaults updated with ``config`` (unknown keys and values of the wrong type raise ValueError)."""
    out = dict(DEFAULT_RUN_CONFIG)
    for k, v in (config or {}).items():
        if k not in DEFAULT_RUN_CONFIG:
            raise ValueError(f"unknown run-config key {k!r}; known keys: {', '.join(DEFAULT_RUN_CONFIG)}")
        d = DEFAULT_RUN_CONFIG[k]
        if isinstance(d, bool) or isinstance(d, str):
            ok = isinstance(v, type(d))
        elif isinstance(d, int):
            ok = is_int(v)
            v = int(v) if ok else v
        else:
            ok = is_real(v)
            v = float(v) if ok else v
        if not ok:
            raise ValueError(f"run-config {k!r} must be a {type(d).__name__}, got {v!r}")
        out[k] = v
    if out["method"] not in ("fedavg", "hyperfl"):
        raise ValueError(f"run-config 'method' must be 'fedavg' or 'hyperfl', got {out['method']!r}")
    for k in ("num-server-rounds", "local-epochs", "batch-size", "hidden", "embed-dim", "hyper-hidden", "min-nodes"):
        if out[k] < 1:
            raise ValueError(f"run-config {k!r} must be >= 1, got {out[k]!r}")
    for k in ("head-epochs", "attack-iters", "seed", "data-seed", "max-examples"):
        if out[k] < 0:
            raise ValueError(f"run-config {k!r} must be >= 0, got {out[k]!r}")
    for k in ("lr", "head-lr", "round-timeout"):
        if not out[k] > 0:
            raise ValueError(f"run-config {k!r} must be > 0, got {out[k]!r}")
    if not 0.0 <= out["momentum"] < 1.0 or out["weight-decay"] < 0:
        raise ValueError("run-config 'momentum' must be in [0, 1) and 'weight-decay' >= 0, got "
                         f"{out['momentum']!r}, {out['weight-decay']!r}")
    if not 0.0 <= out["fraction-evaluate"] <= 1.0:
        raise ValueError(f"run-config 'fraction-evaluate' must be in [0, 1], got {out['fraction-evaluate']!r}")
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v)  # a TOML basic string


def app_pyproject(name: str = "gradkit-flower", **config: Any) -> str:
    """The text of the app's ``pyproject.toml`` with the run configuration ``config`` over the defaults."""
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"name must be a non-empty project name of letters, digits, '-' and '_', got {name!r}")
    cfg = run_config(config)
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{name}"',
        'version = "1.0.0"',
        'description = "gradkit federated training on Flower (FedAvg or HyperFL, validating server)"',
        'license = "MIT"',
        "dependencies = []  # every SuperNode needs gradkit and flwr installed already",
        "",
        "[tool.flwr.app]",
        'publisher = "gradkit"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVERAPP}"',
        f'clientapp = "{CLIENTAPP}"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in cfg.items()]
    return "\n".join(lines) + "\n"


def write_app(directory: str | Path, name: str = "gradkit-flower", **config: Any) -> Path:
    """Write the app's ``pyproject.toml`` into ``directory`` (created if needed); return the file's path."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"directory must be a folder, got the file {str(d)!r}")
    text = app_pyproject(name, **config)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "pyproject.toml"
    path.write_text(text)
    return path
