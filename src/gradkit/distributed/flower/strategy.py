"""gradkit's Flower server strategy: FedAvg that validates every client update and can observe it.

Paper slug: hyperfl (the Flower path; the honest-but-curious server of the HyperFL threat model).
Each training reply is checked against the global arrays the server sent that round (keys, shapes,
dtypes, finite values, a positive finite ``num-examples``); a bad reply is logged with its reason,
recorded in ``strategy.rejections`` and dropped, and the round carries on with the rest:

    global <- sum_{i accepted} n_i / sum_{j accepted} n_j * arrays_i,   n_i = min(reported_i, max_weight)

A node's weight is what it reports, so a node that lies about its example count could take over the
average; ``max_weight`` bounds it by what the server knows (the largest partition it assigned), and
every capped weight is logged and recorded in ``strategy.capped``.

``on_update(server_round, client_id, arrays, global_arrays)`` (optional) sees every accepted update
before averaging: the hook where an honest-but-curious server runs a gradient inversion attack
(see :class:`gradkit.distributed.flower.InversionObserver`).

Example::

    strategy = GradkitFedAvg(min_available_nodes=2, on_update=lambda r, cid, arrays, ref: None)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=3)
    print(strategy.rejections)      # [Rejection(server_round=1, client_id=..., reason="'w' has 3 non-finite values")]
"""
from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from ..federated import weighted_average
from .validation import check_update, check_weight

__all__ = ["GradkitFedAvg", "Rejection", "UpdateObserver", "record_to_tensors", "tensors_to_record"]

UpdateObserver = Callable[[int, int, dict[str, torch.Tensor], dict[str, torch.Tensor]], Any]


@dataclass(frozen=True)
class Rejection:
    """A client reply the server dropped: the round, the client's node id and why."""

    server_round: int
    client_id: int
    reason: str


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord as ``{key: CPU tensor}``, in the record's key order (raises on undecodable arrays)."""
    out: dict[str, torch.Tensor] = {}
    for k, arr in record.items():
        out[k] = torch.from_numpy(arr.numpy().copy())
    return out


def tensors_to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """``{key: tensor}`` (any device) as an ArrayRecord (detached CPU copies)."""
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in tensors.items()})


class GradkitFedAvg(FedAvg):
    """FedAvg that rejects malformed client updates with a logged reason and can observe accepted ones.

    Parameters are those of ``flwr.serverapp.strategy.FedAvg`` plus
    ``on_update(server_round, client_id, arrays, global_arrays)``: called for every accepted update
    with CPU tensors (the client's arrays and the global arrays it trained from); an exception in it
    is logged and does not stop the round. ``check_dtype``: reject updates whose dtype differs from
    the global arrays' (default True). ``max_weight``: the most examples any node can hold; larger
    reported counts are capped to it (None: no cap).
    Attributes: ``rejections`` (list of :class:`Rejection`), ``accepted`` (list of
    ``(server_round, client_id)``), ``capped`` (list of ``(server_round, client_id, reported, used)``),
    ``global_arrays`` (the tensors sent in the current round).
    """

    def __init__(self, *args: Any, on_update: UpdateObserver | None = None, check_dtype: bool = True,
                 max_weight: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if on_update is not None and not callable(on_update):
            raise TypeError(f"on_update must be callable or None, got {type(on_update).__name__}")
        if max_weight is not None:
            reason = check_weight(max_weight)
            if reason:
                raise ValueError(f"max_weight: {reason}")
        self.max_weight = None if max_weight is None else float(max_weight)
        self.capped: list[tuple[int, int, float, float]] = []
        self.on_update = on_update
        self.check_dtype = bool(check_dtype)
        self.rejections: list[Rejection] = []
        self.accepted: list[tuple[int, int]] = []
        self.observer_errors: list[tuple[int, int, str]] = []
        self.global_arrays: dict[str, torch.Tensor] | None = None
        self.global_round: int | None = None

    # -- the reference the replies are checked against --------------------------------------
    def set_global(self, server_round: int, arrays: ArrayRecord | dict[str, torch.Tensor]) -> None:
        """Remember the global arrays sent in ``server_round`` (``configure_train`` calls this)."""
        self.global_round = int(server_round)
        self.global_arrays = record_to_tensors(arrays) if isinstance(arrays, ArrayRecord) else {
            k: v.detach().cpu() for k, v in arrays.items()}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.set_global(server_round, arrays)
        return super().configure_train(server_round, arrays, config, grid)

    # -- validation ---------------------------------------------------------------------------
    def _reject(self, server_round: int, client_id: int, reason: str) -> None:
        self.rejections.append(Rejection(server_round, client_id, reason))
        log(WARNING, "gradkit: round %s: rejected the update of node %s: %s", server_round, client_id, reason)

    def check_reply(self, server_round: int, msg: Message) -> tuple[dict[str, torch.Tensor], float] | str:
        """``(arrays, num_examples)`` of a well-formed training reply, or the reason it is malformed."""
        if msg.has_error():
            return f"client error: {msg.error.reason}"
        if self.global_arrays is None:
            raise RuntimeError("no global arrays to check replies against: configure_train/set_global "
                               "was not called before aggregate_train")
        content = msg.content
        arecs, mrecs = content.array_records, content.metric_records
        if len(arecs) != 1:
            return f"expected exactly one ArrayRecord, got {len(arecs)} ({', '.join(arecs) or 'none'})"
        if len(mrecs) != 1:
            return f"expected exactly one MetricRecord, got {len(mrecs)} ({', '.join(mrecs) or 'none'})"
        metrics = next(iter(mrecs.values()))
        if self.weighted_by_key not in metrics:
            return f"MetricRecord lacks the weight key {self.weighted_by_key!r}"
        weight = metrics[self.weighted_by_key]
        reason = check_weight(weight)
        if reason:
            return f"{self.weighted_by_key!r}: {reason}"
        try:
            arrays = record_to_tensors(next(iter(arecs.values())))
        except Exception as e:  # undecodable bytes, unsupported dtypes
            return f"undecodable arrays ({type(e).__name__}: {e})"
        reason = check_update(arrays, self.global_arrays, check_dtype=self.check_dtype)
        if reason:
            return reason
        return arrays, float(weight)

    # -- aggregation --------------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, observe the accepted ones, average them weighted by data size."""
        replies = list(replies)
        good: list[tuple[Message, dict[str, torch.Tensor], float]] = []
        for msg in replies:
            cid = int(msg.metadata.src_node_id)
            checked = self.check_reply(server_round, msg)
            if isinstance(checked, str):
                self._reject(server_round, cid, checked)
                continue
            arrays, weight = checked
            if self.max_weight is not None and weight > self.max_weight:
                log(WARNING, "gradkit: round %s: node %s reported %s examples, more than any node holds; "
                    "weighted as %s", server_round, cid, weight, self.max_weight)
                self.capped.append((server_round, cid, weight, self.max_weight))
                weight = self.max_weight
            good.append((msg, arrays, weight))
            self.accepted.append((server_round, cid))
            if self.on_update is not None:
                try:
                    self.on_update(server_round, cid, arrays, self.global_arrays)
                except Exception:  # an observer must never take the federation down
                    tb = traceback.format_exc()
                    self.observer_errors.append((server_round, cid, tb))
                    log(ERROR, "gradkit: round %s: on_update failed on node %s:\n%s", server_round, cid, tb)
        log(INFO, "gradkit: round %s: aggregating %d of %d updates (%d rejected)", server_round,
            len(good), len(replies), len(replies) - len(good))
        if not good:
            return None, None
        avg = weighted_average([a for _, a, _ in good], [w for _, _, w in good])
        metrics = self._aggregate_metrics([m.content for m, _, _ in good], self.train_metrics_aggr_fn)
        return tensors_to_record(avg), metrics

    def _aggregate_metrics(self, contents: list[RecordDict], fn: Callable) -> MetricRecord | None:
        try:
            return fn(contents, self.weighted_by_key)
        except Exception as e:  # inconsistent metric keys across clients must not stop training
            log(WARNING, "gradkit: metrics not aggregated: %s: %s", type(e).__name__, e)
            return None

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted average of the evaluation metrics of the well-formed replies."""
        contents = []
        for msg in replies:
            cid = int(msg.metadata.src_node_id)
            if msg.has_error():
                log(WARNING, "gradkit: round %s: evaluation error from node %s: %s", server_round, cid,
                    msg.error.reason)
                continue
            mrecs = msg.content.metric_records
            reason = None
            if len(mrecs) != 1:
                reason = f"expected exactly one MetricRecord, got {len(mrecs)}"
            else:
                metrics = next(iter(mrecs.values()))
                w = metrics.get(self.weighted_by_key)
                reason = check_weight(w) if w is not None else f"lacks {self.weighted_by_key!r}"
                if reason is None:
                    bad = [k for k, v in metrics.items()
                           if not all(isinstance(x, (int, float)) and x == x and abs(x) != float("inf")
                                      for x in (v if isinstance(v, list) else [v]))]
                    reason = f"non-finite metrics {bad}" if bad else None
            if reason:
                log(WARNING, "gradkit: round %s: ignored the evaluation of node %s: %s", server_round, cid, reason)
                continue
            contents.append(msg.content)
        if not contents:
            return None
        return self._aggregate_metrics(contents, self.evaluate_metrics_aggr_fn)
