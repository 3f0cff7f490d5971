"""One Flower strategy for every federated LoRA method: the method decides, the strategy delivers.

The strategy samples clients by partition (seeded, so every method sees the same sequence), tells them
which arrays to train, validates every reply before it can touch the global adapter, and hands the valid
ones to ``method.aggregate``. With per-client evaluation it then asks every client to score the new global
adapter (with FedSA-LoRA: its own B) on its held-out slice. What happened in the round (who trained, bytes,
privacy, per-client scores) is kept for the server's per-round record.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsvd.methods import ClientUpdate, FederatedLoraMethod
from fedsvd.privacy import ServerPrivacyLedger


class BudgetExhausted(RuntimeError):
    """Too few clients have privacy budget left for another round: the run stops here."""


class InvalidReply(ValueError):
    """A client reply that must not be aggregated; the message says why."""


@dataclass
class RoundRecord:
    """What the strategy saw in one round, for metrics.jsonl."""

    clients: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    train_loss: float = math.nan
    privacy: dict[int, dict[str, float]] = field(default_factory=dict)
    # Example-weighted mean over the clients' held-out slices (None without per-client evaluation).
    local_accuracy: float | None = None
    local_loss: float | None = None


class LoraStrategy(FedAvg):
    """FedAvg's round structure with pluggable LoRA aggregation.

    Parameters
    ----------
    method : FederatedLoraMethod
        Decides which arrays clients train and how uploads become the new global arrays.
    nodes : Mapping[int, int]
        Node id of each partition id (learned from the clients before the first round).
    num_examples : Mapping[int, int]
        Training examples of each partition, as the server planned them; a reply claiming another
        count is rejected.
    clients_per_round : int
        How many partitions train in each round.
    seed : int
        Seeds the client sampling sequence (one independent stream per round).
    delta : float
        The delta at which clients report epsilon (recorded with each client's privacy entry).
    ledger : ServerPrivacyLedger, optional
        The server's own privacy account (None without DP); a client whose reported epsilon disagrees
        with it is not aggregated.
    target_epsilon : float, optional
        With a ledger: no client is selected for a round that would take it past this epsilon.
    local_eval : bool
        After each round, every client evaluates the new global adapter on its own held-out slice.
    """

    def __init__(
        self,
        method: FederatedLoraMethod,
        nodes: Mapping[int, int],
        num_examples: Mapping[int, int],
        clients_per_round: int,
        seed: int,
        delta: float,
        ledger: ServerPrivacyLedger | None = None,
        target_epsilon: float | None = None,
        local_eval: bool = False,
    ) -> None:
        super().__init__(
            fraction_train=1.0, fraction_evaluate=1.0 if local_eval else 0.0, min_available_nodes=len(nodes)
        )
        self.method = method
        self.nodes = dict(nodes)
        self.num_examples = dict(num_examples)
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.delta = delta
        self.ledger = ledger
        self.target_epsilon = target_epsilon
        self.rounds: dict[int, RoundRecord] = {}
        self._global: dict[str, torch.Tensor] = {}
        self._partition_of = {node: partition for partition, node in self.nodes.items()}

    def sample_partitions(self, server_round: int) -> list[int]:
        """The partitions that train in this round: depends only on (seed, round, budgets), never on the method.

        Clients whose next round would take them past their target epsilon are not eligible; when none is
        left, ``BudgetExhausted`` ends the run.
        """
        eligible = sorted(self.nodes)
        if self.ledger is not None and self.target_epsilon is not None:
            eligible = [p for p in eligible if self.ledger.can_train(p, self.target_epsilon)]
            skipped = sorted(set(self.nodes) - set(eligible))
            if skipped:
                log(
                    INFO, "round %d: partitions %s have no privacy budget left for another round", server_round, skipped
                )
        if not eligible:
            raise BudgetExhausted(f"round {server_round}: no client has privacy budget left for another round")
        rng = np.random.default_rng([self.seed, server_round])
        chosen = rng.choice(eligible, size=min(self.clients_per_round, len(eligible)), replace=False)
        return sorted(int(partition) for partition in chosen)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        partitions = self.sample_partitions(server_round)
        train_keys = sorted(self.method.uplink_keys(self._global.keys(), server_round))
        record = RecordDict(
            {
                "arrays": arrays,
                "config": ConfigRecord({**config, "server-round": server_round, "train-keys": train_keys}),
            }
        )
        self.rounds[server_round] = RoundRecord(bytes_down=arrays.count_bytes() * len(partitions))
        log(INFO, "round %d: training partitions %s on %s", server_round, partitions, train_keys[:2])
        return [Message(record, self.nodes[p], MessageType.TRAIN) for p in partitions]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = self.rounds[server_round]
        expected = self.method.uplink_keys(self._global.keys(), server_round)
        updates: list[ClientUpdate] = []
        losses: list[tuple[float, int]] = []
        for reply in replies:
            partition = self._partition_of.get(reply.metadata.src_node_id, -1)
            if self.ledger is not None and partition >= 0 and not reply.has_error():
                self.ledger.record_training(partition, server_round)
            try:
                update, metrics = self._validated(reply, partition, expected)
            except InvalidReply as reason:
                record.rejected[partition] = str(reason)
                log(ERROR, "round %d: rejected reply from partition %d: %s", server_round, partition, reason)
                continue
            updates.append(update)
            record.clients.append(partition)
            record.bytes_up += reply.content["arrays"].count_bytes()
            record.privacy[partition] = {
                "epsilon": float(metrics["epsilon"]),
                "sigma": float(metrics["noise-multiplier"]),
                "sample_rate": float(metrics["sample-rate"]),
                "steps": int(metrics["steps"]),
                "delta": self.delta,
            }
            losses.append((float(metrics["train-loss"]), update.num_examples))
        record.clients.sort()
        if not updates:
            log(WARNING, "round %d: no valid replies; the global adapter is unchanged", server_round)
            return None, None
        finite = [(loss, n) for loss, n in losses if math.isfinite(loss)]
        if finite:
            record.train_loss = sum(loss * n for loss, n in finite) / sum(n for _, n in finite)
        new_global = self.method.aggregate(self._global, updates, server_round)
        return ArrayRecord(new_global), MetricRecord({"train-loss": record.train_loss})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        record = RecordDict({"arrays": arrays, "config": ConfigRecord({**config, "server-round": server_round})})
        # Every client, not a sample: the per-client score is a mean over the whole federation.
        return [Message(record, self.nodes[p], MessageType.EVALUATE) for p in sorted(self.nodes)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        scores: list[tuple[float, float, int]] = []
        for reply in replies:
            partition = self._partition_of.get(reply.metadata.src_node_id, -1)
            try:
                scores.append(self._validated_score(reply))
            except InvalidReply as reason:
                log(ERROR, "round %d: rejected evaluation from partition %d: %s", server_round, partition, reason)
        if not scores:
            return None
        total = sum(n for _, _, n in scores)
        record = self.rounds.setdefault(server_round, RoundRecord())
        record.local_accuracy = sum(acc * n for acc, _, n in scores) / total
        record.local_loss = sum(loss * n for _, loss, n in scores) / total
        return MetricRecord({"local-accuracy": record.local_accuracy, "local-loss": record.local_loss})

    @staticmethod
    def _validated_score(reply: Message) -> tuple[float, float, int]:
        if reply.has_error():
            raise InvalidReply(f"client error: {reply.error.reason}")
        metrics = reply.content.metric_records.get("metrics")
        if metrics is None or any(key not in metrics for key in ("accuracy", "loss", "num-examples")):
            raise InvalidReply("evaluation reply lacks accuracy, loss or num-examples")
        accuracy, loss, count = float(metrics["accuracy"]), float(metrics["loss"]), int(metrics["num-examples"])
        if not (0.0 <= accuracy <= 1.0 and math.isfinite(loss) and count > 0):
            raise InvalidReply(f"implausible evaluation: accuracy {accuracy}, loss {loss}, examples {count}")
        return accuracy, loss, count

    def _validated(
        self, reply: Message, partition: int, expected: set[str]
    ) -> tuple[ClientUpdate, Mapping[str, float | int]]:
        """Turn a reply into an update, or say exactly why it cannot be aggregated."""
        if reply.has_error():
            raise InvalidReply(f"client error: {reply.error.reason}")
        if partition < 0:
            raise InvalidReply(f"unknown node {reply.metadata.src_node_id}")
        content = reply.content
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            raise InvalidReply("reply lacks 'arrays' or 'metrics'")
        metrics = content.metric_records["metrics"]
        required = ("num-examples", "epsilon", "noise-multiplier", "sample-rate", "steps", "train-loss")
        missing = [key for key in required if key not in metrics]
        if missing:
            raise InvalidReply(f"metrics lack {missing}")
        if int(metrics["num-examples"]) != self.num_examples[partition]:
            raise InvalidReply(
                f"num-examples {metrics['num-examples']} != {self.num_examples[partition]} planned for it"
            )
        if self.ledger is not None and (reason := self.ledger.mismatch(partition, float(metrics["epsilon"]))):
            raise InvalidReply(reason)
        arrays = content.array_records["arrays"]
        if set(arrays.keys()) != expected:
            raise InvalidReply(
                f"uploaded keys differ from the trained ones: missing {sorted(expected - set(arrays.keys()))[:2]}, "
                f"unexpected {sorted(set(arrays.keys()) - expected)[:2]}"
            )
        tensors: dict[str, torch.Tensor] = {}
        for key, array in arrays.items():
            value = np.asarray(array.numpy())
            if value.dtype != np.float32:
                raise InvalidReply(f"{key}: dtype {value.dtype}, expected float32")
            if value.shape != tuple(self._global[key].shape):
                raise InvalidReply(f"{key}: shape {value.shape}, expected {tuple(self._global[key].shape)}")
            if not np.isfinite(value).all():
                raise InvalidReply(f"{key}: non-finite values")
            tensors[key] = torch.from_numpy(value.copy())
        return ClientUpdate(tensors, self.num_examples[partition]), metrics
