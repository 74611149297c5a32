"""gradkit's Flower ClientApp: local training of a FedAvg or HyperFL client on its digits shard.

Paper slug: hyperfl (the Flower path). A ``train`` message carries the global shared state (an
ArrayRecord); the client loads it, restores its private state (HyperFL's embedding ``v`` and head
``psi``, kept in ``context.state`` between rounds and never sent), trains locally and replies with
``shared_state()`` and ``num-examples``. Node config: ``partition-id``, ``num-partitions`` and, for
testing a server's defences, ``corrupt`` = ``"nan"`` | ``"inf"`` | ``"shape"`` | ``"missing"`` |
``"dtype"`` (this client then sends a malformed update on purpose), ``inflate`` = a factor by which
it over-reports its ``num-examples`` (a lying node; the server caps its weight).

    flower-supernode --insecure --superlink 127.0.0.1:9092 --node-config "partition-id=0 num-partitions=2"
"""
from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..._validate import choice
from ...engine import cpu_threads
from .app import run_config
from .strategy import record_to_tensors, tensors_to_record
from .task import evaluate_model, load_partition, load_private_state, local_train, make_model, private_state

__all__ = ["app", "corrupt_update", "CORRUPTIONS"]

app = ClientApp()
PRIVATE_KEY = "gradkit-private"
CORRUPTIONS = ("none", "nan", "inf", "shape", "missing", "dtype")


def corrupt_update(state: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """A deliberately malformed copy of ``state`` (for testing server-side validation)."""
    choice("corrupt", mode, CORRUPTIONS)
    out = {k: v.clone() for k, v in state.items()}
    if mode == "none":
        return out
    k = next(iter(out))
    if mode == "nan":
        out[k].view(-1)[0] = float("nan")
    elif mode == "inf":
        out[k].view(-1)[-1] = float("inf")
    elif mode == "shape":
        out[k] = torch.cat([out[k], out[k][:1]], dim=0)
    elif mode == "missing":
        del out[k]
    elif mode == "dtype":
        out[k] = out[k].double()
    return out


def _setup(msg: Message, context: Context):
    cfg = run_config(dict(context.run_config))
    pid = int(context.node_config.get("partition-id", 0))
    nparts = int(context.node_config.get("num-partitions", 1))
    data = load_partition(pid, nparts, seed=cfg["data-seed"])
    model = make_model(cfg["method"], seed=cfg["seed"], hidden=cfg["hidden"], embed_dim=cfg["embed-dim"],
                       hyper_hidden=cfg["hyper-hidden"])
    if PRIVATE_KEY in context.state:  # v and psi from this client's earlier rounds
        load_private_state(model, record_to_tensors(context.state[PRIVATE_KEY]))
    elif cfg["method"] == "hyperfl":  # a client-specific private initialisation (embedding, head)
        torch.manual_seed(cfg["seed"] * 7919 + 104729 * (pid + 1))
        model.embedding.reset_parameters()
        model.head.reset_parameters()
    model.load_shared_state(record_to_tensors(msg.content["arrays"]))
    return cfg, pid, data, model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global shared state, train locally, reply with the shared state and ``num-examples``."""
    cfg, pid, data, model = _setup(msg, context)
    server_round = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
    with cpu_threads(1):
        loss = local_train(model, data, epochs=cfg["local-epochs"], lr=cfg["lr"], batch_size=cfg["batch-size"],
                           seed=cfg["seed"] * 100003 + 1000 * server_round + pid, momentum=cfg["momentum"],
                           weight_decay=cfg["weight-decay"], head_epochs=cfg["head-epochs"], head_lr=cfg["head-lr"])
    private = private_state(model)
    if private:
        context.state[PRIVATE_KEY] = tensors_to_record(private)
    shared = corrupt_update(model.shared_state(), str(context.node_config.get("corrupt", "none")))
    inflate = float(context.node_config.get("inflate", 1))
    if not inflate >= 1:
        raise ValueError(f"node config 'inflate' must be a number >= 1, got {inflate!r}")
    metrics = MetricRecord({"train_loss": float(loss), "num-examples": int(data.n_train * inflate)})
    return Message(content=RecordDict({"arrays": tensors_to_record(shared), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy (percent) and loss of the global shared state with this client's private state, on its test shard."""
    cfg, _, data, model = _setup(msg, context)
    with cpu_threads(1):
        m = evaluate_model(model, data.x_test, data.y_test)
    metrics = MetricRecord({"accuracy": float(m["accuracy"]), "loss": float(m["loss"]),
                            "num-examples": int(len(data.y_test))})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
