"""One Flower strategy for every federated LoRA method: the method decides, the strategy delivers.

The strategy samples clients by partition (seeded, so every method sees the same sequence), tells them
which arrays to train, parses every reply through ``fedsvd.protocol`` before it can touch the global adapter,
bounds each accepted change against the round's others, and hands them to ``method.aggregate``; a
non-finite result is never accepted. With per-client evaluation it then asks every client to score the new
global adapter (with FedSA-LoRA: its own B) on its held-out slice.

``train_round`` and ``evaluate_round`` return what happened in the round (``RoundRecord``) next to the new
arrays, which is what the server records; Flower's own ``configure_*`` / ``aggregate_*`` hooks are the steps
they are made of.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg

from fedsvd.federation import ClientPlan
from fedsvd.methods import ClientUpdate, FederatedLoraMethod
from fedsvd.methods.base import all_finite, bound_update_norms, change_norm
from fedsvd.privacy.client_level import ClientLevelLedger, noise_generator, noised_average
from fedsvd.privacy.record_level import ServerPrivacyLedger
from fedsvd.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    EvaluationReply,
    ProtocolError,
    TrainInstruction,
    TrainReply,
    float32_npy,
    parse_arrays,
)

# Relative tolerance between a reported noise multiplier or sample rate and the server's plan (float rounding).
PLAN_TOLERANCE = 1e-9


# How often the server looks for replies that have arrived (Flower's own send_and_receive: every 0.1 s).
PULL_INTERVAL_S = 0.2
# Told (round, stage, replies so far, messages sent) each time more replies arrive; round 0 is the set-up.
Progress = Callable[[int, str, int, int], None]


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None,
    progress: Progress | None = None,
    at: tuple[int, str] = (0, ""),
    on_arrival: Callable[[Message], object] | None = None,
    after_push: Callable[[], object] | None = None,
) -> list[Message]:
    """Flower's ``Grid.send_and_receive``, telling ``progress`` how many replies are in whenever more arrive
    (``at`` = the round and stage the messages belong to): a round of many clients, or of slow ones, takes
    minutes, and the user should see it move. ``after_push`` runs once the messages are out, and
    ``on_arrival`` gets each reply as soon as it is in, so that their work is done while the clients run."""
    waiting = set(grid.push_messages(messages))
    sent = len(waiting)
    if after_push is not None:
        after_push()
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    if progress is not None:
        progress(*at, 0, sent)
    while waiting and (deadline is None or time.monotonic() < deadline):
        arrived = list(grid.pull_messages(waiting))
        if not arrived:
            time.sleep(PULL_INTERVAL_S)
            continue
        replies += arrived
        waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
        if on_arrival is not None:
            for reply in arrived:
                on_arrival(reply)
        if progress is not None:
            progress(*at, sent - len(waiting), sent)
    return replies


def client_error(reply: Message) -> str:
    """A client's error in one line: Flower passes on the whole exception text, tracebacks included."""
    first_line = (reply.error.reason or "no reason given").strip().splitlines()[0]
    return "client error: " + (first_line if len(first_line) <= 200 else first_line[:197] + "...")


class BudgetExhausted(RuntimeError):
    """Too few clients have privacy budget left for another round: the run stops here."""


@dataclass
class RoundRecord:
    """What happened in one round, for metrics.jsonl and the console line."""

    instructed: list[int] = field(default_factory=list)
    clients: list[int] = field(default_factory=list)  # whose update was aggregated
    rejected: dict[int, str] = field(default_factory=dict)  # partition -> why its reply was not used
    clipped: dict[int, float] = field(default_factory=dict)  # partition -> scale its change was bounded by
    bytes_up: int = 0
    bytes_down: int = 0
    train_loss: float | None = None
    privacy: dict[int, dict[str, float]] = field(default_factory=dict)
    # Example-weighted mean over the clients' held-out slices (None without per-client evaluation).
    local_accuracy: float | None = None
    local_loss: float | None = None
    # Why the global adapter did not change in this round (too few valid replies, a non-finite aggregate).
    dropped: str | None = None


@dataclass(frozen=True)
class _ReadReply:
    """A training reply read and checked: the update, what the client reported, the norm of its change (not
    finite where the upload holds NaN or infinities) and the upload's size in bytes."""

    update: ClientUpdate
    report: TrainReply
    change_norm: float
    size: int


@dataclass
class _RoundInProgress:
    server_round: int
    sent: dict[str, torch.Tensor]
    record: RoundRecord
    uploads: dict[str, tuple[int, ...]]  # the shape of every array a reply must carry
    # Each partition's reply and what it read as, or why it cannot be aggregated; filled as replies arrive.
    read: dict[int, tuple[Message, _ReadReply | ProtocolError]] = field(default_factory=dict)


class LoraStrategy(FedAvg):
    """FedAvg's round structure with pluggable LoRA aggregation.

    Parameters
    ----------
    method : FederatedLoraMethod
        Decides which arrays clients train and how uploads become the new global arrays.
    nodes : Mapping[int, int]
        Node id of each partition id (learned from the clients before the first round).
    plans : Mapping[int, ClientPlan]
        Each partition's plan (training examples, sample rate, noise multiplier), made once by the server and
        sent with every instruction; a reply claiming another count, rate or noise is rejected.
    num_eval_examples : Mapping[int, int]
        Size of each client's own held-out slice; an evaluation reply claiming another count is rejected.
    num_labels : int
        The federation's class count, sent with every instruction (an owner's file need not hold every class).
    clients_per_round : int
        How many partitions train in each round (fixed-size sampling).
    poisson_rate : float, optional
        Poisson sampling instead: each partition trains with this probability, independently of the others (a
        round may have no client).
    seed : int
        Seeds the client sampling sequence (one independent stream per round).
    delta : float
        The delta at which clients report epsilon (recorded with each client's privacy entry).
    min_replies : int
        Valid updates a round needs to change the global adapter; with fewer the round is dropped.
    ledger : ServerPrivacyLedger, optional
        The server's own privacy account (None without DP); a client whose reported epsilon, noise or sample
        rate disagrees with it is not aggregated. Every client instructed to train is charged for the round.
    target_epsilon : float, optional
        With a ledger: no client is selected for a round that would take it past this epsilon.
    client_level : ClientLevelLedger, optional
        Client-level DP: the round's changes are clipped and their noised average is what the method's server
        step sees (``fedsvd.privacy.client_level``); every round is charged to this ledger, and a round that
        would take the federation past its target is not started. The median bound on changes is then off: it
        would let one client change how the others' changes are scaled.
    local_eval : bool
        After each round, every client evaluates the new global adapter on its own held-out slice.
    progress : callable, optional
        Told (round, stage, replies so far, messages sent) as a round's replies arrive.
    """

    def __init__(
        self,
        *,
        method: FederatedLoraMethod,
        nodes: Mapping[int, int],
        plans: Mapping[int, ClientPlan],
        num_eval_examples: Mapping[int, int],
        num_labels: int,
        clients_per_round: int,
        seed: int,
        delta: float,
        min_replies: int = 1,
        ledger: ServerPrivacyLedger | None = None,
        target_epsilon: float | None = None,
        poisson_rate: float | None = None,
        client_level: ClientLevelLedger | None = None,
        local_eval: bool = False,
        progress: Progress | None = None,
    ) -> None:
        super().__init__(
            fraction_train=1.0, fraction_evaluate=1.0 if local_eval else 0.0, min_available_nodes=len(nodes)
        )
        self.method = method
        self.nodes = dict(nodes)
        self.plans = dict(plans)
        self.num_eval_examples = dict(num_eval_examples)
        self.num_labels = num_labels
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.delta = delta
        self.min_replies = min_replies
        self.ledger = ledger
        self.target_epsilon = target_epsilon
        self.poisson_rate = poisson_rate
        self.client_level = client_level
        self.progress = progress
        self._partition_of = {node: partition for partition, node in self.nodes.items()}
        self._round: _RoundInProgress | None = None

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t├── Method: %r", self.method)
        log(INFO, "\t├── Clients per round: %d of %d", self.clients_per_round, len(self.nodes))
        log(INFO, "\t└── Valid updates a round needs: %d", self.min_replies)

    def sample_partitions(self, server_round: int) -> list[int]:
        """The partitions that train in this round: depends only on (seed, round, budgets), never on the method.

        Clients whose next round would take them past their target epsilon are not eligible; when none is
        left, ``BudgetExhausted`` ends the run.
        """
        eligible = sorted(self.nodes)
        if self.ledger is not None and self.target_epsilon is not None:
            ledger, target = self.ledger, self.target_epsilon
            eligible = [p for p in eligible if ledger.can_train(p, target)]
            skipped = sorted(set(self.nodes) - set(eligible))
            if skipped:
                log(
                    INFO, "round %d: partitions %s have no privacy budget left for another round", server_round, skipped
                )
        if not eligible:
            raise BudgetExhausted(f"round {server_round}: no client has privacy budget left for another round")
        if self.client_level is not None and not self.client_level.can_release():
            raise BudgetExhausted(
                f"round {server_round} would take the federation's client-level epsilon past its target "
                f"{self.client_level.target_epsilon:g}"
            )
        rng = np.random.default_rng([self.seed, server_round])
        if self.poisson_rate is not None:
            chosen = np.asarray(eligible)[rng.random(len(eligible)) < self.poisson_rate]
        else:
            chosen = rng.choice(eligible, size=min(self.clients_per_round, len(eligible)), replace=False)
        return sorted(int(partition) for partition in chosen)

    # --- one round, as the server drives it --------------------------------------------------------------

    def train_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float | None
    ) -> tuple[ArrayRecord | None, RoundRecord]:
        """Instruct this round's clients, collect and check their replies, aggregate: the new global arrays
        (None when the round was dropped) and what happened."""
        messages = self.configure_train(server_round, arrays, ConfigRecord(), grid)
        assert self._round is not None
        round_ = self._round
        replies = exchange(
            grid,
            messages,
            timeout,
            self.progress,
            (server_round, "training"),
            on_arrival=self.read_on_arrival,
            after_push=lambda: self.method.prepare(round_.sent, server_round),
        )
        return self._aggregate(server_round, replies), round_.record

    def evaluate_round(self, grid: Grid, server_round: int, arrays: ArrayRecord, timeout: float | None) -> None:
        """Per-client evaluation of the new global arrays; the scores go into the round's record."""
        messages = self.configure_evaluate(server_round, arrays, ConfigRecord(), grid)
        if messages:
            replies = exchange(grid, messages, timeout, self.progress, (server_round, "local evaluation"))
            self.aggregate_evaluate(server_round, replies)

    # --- Flower's hooks ----------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sent = arrays.to_torch_state_dict()
        partitions = self.sample_partitions(server_round)
        train_keys = tuple(sorted(self.method.uplink_keys(sent.keys(), server_round)))
        record = RoundRecord(instructed=partitions, bytes_down=arrays.count_bytes() * len(partitions))
        uploads = {key: tuple(sent[key].shape) for key in train_keys}
        self._round = _RoundInProgress(server_round, sent, record, uploads)
        if self.client_level is not None:
            self.client_level.record_release(server_round)  # charged before any noise is drawn
        messages = []
        for partition in partitions:
            if self.ledger is not None:
                # Charged now, before any reply: a client that trains and then dies, or whose reply is lost,
                # has spent the round all the same.
                self.ledger.record_training(partition, server_round)
                rounds = tuple(self.ledger.rounds[partition])
            else:
                rounds = (server_round,)
            plan = self.plans[partition]
            instruction = TrainInstruction(
                server_round, train_keys, self.num_labels, plan.noise_multiplier, plan.sample_rate, rounds
            )
            content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({**config, **instruction.to_record()})})
            messages.append(Message(content, self.nodes[partition], MessageType.TRAIN))
        log(INFO, "round %d: training partitions %s on %s", server_round, partitions, list(train_keys[:2]))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        new_arrays = self._aggregate(server_round, replies)
        assert self._round is not None
        loss = self._round.record.train_loss
        return new_arrays, None if new_arrays is None else MetricRecord(
            {"train-loss": loss if loss is not None else 0.0}
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        content = RecordDict(
            {
                ARRAYS: arrays,
                CONFIG: ConfigRecord({**config, "server-round": server_round, "num-labels": self.num_labels}),
            }
        )
        # Every client, not a sample: the per-client score is a mean over the whole federation.
        return [Message(content, self.nodes[p], MessageType.EVALUATE) for p in sorted(self.nodes)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self._round is None or self._round.server_round != server_round:
            raise AggregationError(f"evaluation replies for round {server_round}, but that round was not trained")
        record = self._round.record
        scores: list[EvaluationReply] = []
        seen: set[int] = set()
        for reply in replies:
            partition = self._partition_of.get(reply.metadata.src_node_id, -1)
            try:
                if reply.has_error():
                    raise ProtocolError(client_error(reply))
                if partition < 0 or partition in seen:
                    raise ProtocolError("reply from an unknown node, or a second reply from one partition")
                seen.add(partition)
                metrics = reply.content.metric_records.get(METRICS)
                if metrics is None:
                    raise ProtocolError(f"reply lacks '{METRICS}'")
                scores.append(EvaluationReply.parse(dict(metrics), planned_examples=self.num_eval_examples[partition]))
            except ProtocolError as reason:
                log(ERROR, "round %d: rejected evaluation from partition %d: %s", server_round, partition, reason)
        if not scores:
            return None
        total = sum(score.num_examples for score in scores)
        record.local_accuracy = sum(score.accuracy * score.num_examples for score in scores) / total
        record.local_loss = sum(score.loss * score.num_examples for score in scores) / total
        return MetricRecord({"local-accuracy": record.local_accuracy, "local-loss": record.local_loss})

    # --- the checks and the aggregation --------------------------------------------------------------------

    def _aggregate(self, server_round: int, replies: Iterable[Message]) -> ArrayRecord | None:
        if self._round is None or self._round.server_round != server_round:
            raise AggregationError(f"replies for round {server_round}, but configure_train did not run for it")
        sent, record = self._round.sent, self._round.record
        updates: list[ClientUpdate] = []
        partitions: list[int] = []
        accepted_norms: list[float] = []
        losses: list[tuple[float, int]] = []
        for reply in replies:
            partition = self._partition_of.get(reply.metadata.src_node_id, -1)
            try:
                if partition not in record.instructed or partition in record.rejected or partition in partitions:
                    raise ProtocolError("reply from a node that was not instructed, or a second reply")
                read = self._read(reply, partition)
            except ProtocolError as reason:
                self._reject(record, server_round, partition, str(reason))
                continue
            update, report = read.update, read.report
            if not math.isfinite(read.change_norm) and (
                bad := [k for k, v in update.arrays.items() if not all_finite(v)]
            ):
                self._reject(record, server_round, partition, f"{bad[0]}: non-finite values")
                continue
            updates.append(update)
            partitions.append(partition)
            accepted_norms.append(read.change_norm)
            record.bytes_up += read.size
            record.privacy[partition] = {
                "epsilon": report.epsilon,
                "sigma": report.noise_multiplier,
                "sample_rate": report.sample_rate,
                "steps": report.steps,
                "delta": self.delta,
            }
            if report.train_loss is not None:
                losses.append((report.train_loss, update.num_examples))
        self._round.read.clear()  # the accepted uploads live on in ``updates`` until the aggregate is made
        for partition in record.instructed:
            if partition not in partitions and partition not in record.rejected:
                record.rejected[partition] = "no reply"
                log(ERROR, "round %d: no reply from partition %d", server_round, partition)
        record.clients = sorted(partitions)
        if losses:
            record.train_loss = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
        if self.client_level is not None:
            new_global = self._noised_aggregate(server_round, updates, partitions, accepted_norms)
        elif not record.instructed:
            return None  # Poisson sampling drew no client: nothing to aggregate, and nothing went wrong
        elif len(updates) < self.min_replies:
            record.dropped = f"{len(updates)} valid update(s), {self.min_replies} needed"
            log(WARNING, "round %d: %s; the global adapter is unchanged", server_round, record.dropped)
            return None
        else:
            updates, scales = bound_update_norms(sent, updates, accepted_norms)
            record.clipped = {p: scale for p, scale in zip(partitions, scales, strict=True) if scale < 1.0}
            for partition, scale in record.clipped.items():
                log(
                    WARNING,
                    "round %d: partition %d's change was scaled by %.3g to the round's bound",
                    server_round,
                    partition,
                    scale,
                )
            new_global = self.method.aggregate(sent, updates, server_round)
        if not all(all_finite(value) for value in new_global.values()):
            record.dropped = "the aggregate is not finite"
            log(ERROR, "round %d: %s; the global adapter is unchanged", server_round, record.dropped)
            return None
        # Written straight as .npy bytes: Flower's conversion goes through np.save and a stream, two copies. Set
        # one by one: ArrayRecord({...}) would build every Array a second time.
        packed = ArrayRecord()
        for key, value in new_global.items():
            packed[key] = Array(dtype="float32", shape=tuple(value.shape), stype=SType.NUMPY, data=float32_npy(value))
        return packed

    def _noised_aggregate(
        self, server_round: int, updates: list[ClientUpdate], partitions: list[int], norms: list[float]
    ) -> dict[str, torch.Tensor]:
        """Client-level DP: the method's server step on the noised average of the clipped changes. It runs
        whatever the number of valid replies, none included: the count is not private, so no decision may
        depend on it."""
        assert self.client_level is not None and self._round is not None
        plan, sent = self.client_level.plan, self._round.sent
        self._round.record.clipped = {
            p: plan.clip_norm / norm for p, norm in zip(partitions, norms, strict=True) if norm > plan.clip_norm
        }
        keys = sorted(self.method.uplink_keys(sent.keys(), server_round))
        released = noised_average(sent, updates, keys, plan, noise_generator(self.seed, server_round))
        return self.method.aggregate_noised(sent, released, server_round)

    def read_on_arrival(self, reply: Message) -> None:
        """Read and check a training reply as soon as it arrives (``exchange`` calls this), while the round's
        other clients still train: a pass over every value of an upload costs about what averaging it does, and
        done here it is off the server's step once the last reply is in. What it finds waits for
        ``_aggregate``, which also reads any reply that did not come this way."""
        partition = self._partition_of.get(reply.metadata.src_node_id, -1)
        round_ = self._round
        # A second reply from a partition is left for _aggregate, which rejects it.
        if round_ is not None and partition in round_.record.instructed and partition not in round_.read:
            with contextlib.suppress(ProtocolError):  # recorded; rejected by _aggregate in the replies' order
                self._read(reply, partition)

    def _read(self, reply: Message, partition: int) -> _ReadReply:
        """The reply read and checked (once: a later call for the same reply returns what the first found), or
        ProtocolError."""
        assert self._round is not None
        earlier = self._round.read.get(partition)
        if earlier is not None and earlier[0] is reply:
            outcome = earlier[1]
        else:
            try:
                update, report = self._checked(reply, partition, self._round.uploads)
                # One pass over the upload's values measures its change, and with it finds NaN and infinities.
                norm = change_norm(self._round.sent, update)
                outcome = _ReadReply(update, report, norm, reply.content[ARRAYS].count_bytes())
            except ProtocolError as reason:
                outcome = reason
            self._round.read[partition] = (reply, outcome)
        if isinstance(outcome, ProtocolError):
            raise outcome
        return outcome

    @staticmethod
    def _reject(record: RoundRecord, server_round: int, partition: int, reason: str) -> None:
        record.rejected[partition] = reason
        log(ERROR, "round %d: rejected reply from partition %d: %s", server_round, partition, reason)

    def _checked(
        self, reply: Message, partition: int, shapes: Mapping[str, tuple[int, ...]]
    ) -> tuple[ClientUpdate, TrainReply]:
        """Turn a reply into an update, or raise ProtocolError saying exactly why it cannot be aggregated."""
        if reply.has_error():
            raise ProtocolError(client_error(reply))
        content = reply.content
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            raise ProtocolError(f"reply lacks '{ARRAYS}' or '{METRICS}'")
        report = TrainReply.parse(dict(content.metric_records[METRICS]))
        if report.partition_id != partition:
            raise ProtocolError(f"'partition-id' = {report.partition_id} but the reply came from partition {partition}")
        plan = self.plans[partition]
        if report.num_examples != plan.num_examples:
            raise ProtocolError(f"'num-examples' = {report.num_examples} != {plan.num_examples} planned")
        for key, reported, planned in (
            ("noise-multiplier", report.noise_multiplier, plan.noise_multiplier),
            ("sample-rate", report.sample_rate, plan.sample_rate),
        ):
            if not math.isclose(reported, planned, rel_tol=PLAN_TOLERANCE):
                raise ProtocolError(f"'{key}' = {reported:.6g} differs from the planned {planned:.6g}")
        if self.ledger is not None and (reason := self.ledger.mismatch(partition, report.epsilon)):
            raise ProtocolError(reason)
        uploaded = content[ARRAYS]
        if any(array.stype != SType.NUMPY for array in uploaded.values()):
            raise ProtocolError("arrays cannot be read: not serialised as NumPy arrays")
        tensors = parse_arrays({key: array.data for key, array in uploaded.items()}, shapes)
        return ClientUpdate(tensors, plan.num_examples), report
