"""gradkit's Flower ServerApp: validating FedAvg over the clients' shared state, optional inversion spy.

Paper slug: hyperfl (the Flower path). The server builds the same seeded model as the clients, sends
its ``shared_state()`` (the whole model for FedAvg, the hypernetwork ``phi`` for HyperFL) and runs
:class:`GradkitFedAvg` for ``num-server-rounds``: malformed replies are logged and dropped, the rest
averaged weighted by ``num-examples``, each capped at ``max-examples`` (default: the largest digits shard
at ``min-nodes`` partitions) so that no node can take over the average by over-reporting. With ``attack-iters > 0`` (FedAvg) the server is also
honest-but-curious: it inverts every accepted update (:class:`InversionObserver`). With
``result-path`` set it writes a JSON summary (rounds, rejections, metrics, attack losses).

    flwr run <app_dir> local --stream --run-config "num-server-rounds=5 attack-iters=200"
"""
from __future__ import annotations

import json
import os
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from ...engine import cpu_threads
from .app import run_config
from .attack import InversionObserver
from .strategy import GradkitFedAvg, record_to_tensors, tensors_to_record
from .task import IMAGE_SHAPE, make_model, max_shard

__all__ = ["app", "summary"]

app = ServerApp()


def summary(strategy: GradkitFedAvg, result, cfg: dict, observer: InversionObserver | None) -> dict:
    """A JSON-ready account of a finished run."""
    final = record_to_tensors(result.arrays) if len(result.arrays) else {}
    return {
        "method": cfg["method"],
        "num_rounds": cfg["num-server-rounds"],
        "rejections": [{"round": r.server_round, "client_id": r.client_id, "reason": r.reason}
                       for r in strategy.rejections],
        "accepted": [list(a) for a in strategy.accepted],
        "capped": [{"round": r, "client_id": c, "reported": rep, "used": used}
                   for r, c, rep, used in strategy.capped],
        "observer_errors": len(strategy.observer_errors),
        "train_metrics": {str(k): dict(v) for k, v in result.train_metrics_clientapp.items()},
        "evaluate_metrics": {str(k): dict(v) for k, v in result.evaluate_metrics_clientapp.items()},
        "final_keys": sorted(final),
        "final_finite": bool(final) and all(bool(torch.isfinite(v).all()) for v in final.values()
                                            if v.is_floating_point()),
        "attacks": [] if observer is None else [
            {"round": o.server_round, "client_id": o.client_id, "match_loss": o.match_loss,
             "labels": o.labels.tolist()} for o in observer.results],
    }


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = run_config(dict(context.run_config))
    model = make_model(cfg["method"], seed=cfg["seed"], hidden=cfg["hidden"], embed_dim=cfg["embed-dim"],
                       hyper_hidden=cfg["hyper-hidden"])
    observer = None
    if cfg["attack-iters"] > 0:
        if cfg["method"] == "fedavg":
            observer = InversionObserver(model, IMAGE_SHAPE, lr=cfg["lr"], iters=cfg["attack-iters"],
                                         seed=cfg["seed"])
        else:
            log(WARNING, "gradkit: attack-iters ignored for method=%s: the generic inversion needs every target "
                "weight on the wire; HyperFL's attacks are in gradkit.privacy (hyperfl)", cfg["method"])
    n = cfg["min-nodes"]
    cap = cfg["max-examples"] or max_shard(n, cfg["data-seed"])
    strategy = GradkitFedAvg(
        fraction_train=1.0, fraction_evaluate=cfg["fraction-evaluate"], min_train_nodes=n,
        min_evaluate_nodes=n if cfg["fraction-evaluate"] > 0 else 0, min_available_nodes=n, on_update=observer,
        max_weight=cap)
    with cpu_threads(1):
        result = strategy.start(grid=grid, initial_arrays=tensors_to_record(model.shared_state()),
                                num_rounds=cfg["num-server-rounds"], timeout=cfg["round-timeout"],
                                train_config=ConfigRecord({"method": cfg["method"]}))
    log(INFO, "gradkit: %d updates accepted, %d rejected", len(strategy.accepted), len(strategy.rejections))
    if cfg["result-path"]:
        path = Path(cfg["result-path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(summary(strategy, result, cfg, observer), indent=1))
        os.replace(tmp, path)
