"""Faults: malformed messages, lost and duplicated replies, outliers, dead workers, kills and resumes.

The first half drives the real strategy, discovery and client rules with hand-made Flower messages; the
second half runs real federations (``fedsvd run`` with Flower, Ray and Opacus) and kills parts of them.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import (
    ROOT,
    assert_same_ledger,
    federation_run_arguments,
    fedsvd_command,
    flower_processes,
    run_fedsvd,
    started_by_this_worker,
    timeless_rows,
)
from dp_accounting import dp_event, rdp
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import AggregationError
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from clients.app import PRIVACY_STATE_KEY, _continuing_ledger
from fedsvd.config import ExperimentConfig, resume_conflict
from fedsvd.federation import ClientPlan
from fedsvd.methods import METHODS, ClientUpdate, build_method
from fedsvd.privacy.accounting import RDP_ORDERS, epsilon_of
from fedsvd.privacy.client_level import ClientLevelLedger, ClientLevelPlan, noise_generator, noised_average
from fedsvd.privacy.record_level import PrivacyLedger, ServerPrivacyLedger
from fedsvd.protocol import (
    Description,
    EvaluationReply,
    ProtocolError,
    TrainInstruction,
    TrainReply,
    float32_npy,
    parse_arrays,
)
from fedsvd.results import (
    CheckpointError,
    ResultsExist,
    RunRecorder,
    ServerState,
    progress_line,
    read_metrics,
    write_progress,
)
from fedsvd.simulation import _ProgressFollower
from server.app import discover_clients
from server.strategy import BudgetExhausted, LoraStrategy

# --- every field of every message ------------------------------------------------------------------------

GOOD_REPLY = TrainReply(
    partition_id=0, num_examples=100, epsilon=1.0, noise_multiplier=1.1, sample_rate=0.1, steps=3, train_loss=0.5
).to_record()
GOOD_EVALUATION = EvaluationReply(accuracy=0.5, loss=0.7, num_examples=10).to_record()
GOOD_DESCRIPTION = Description(partition_id=0, num_examples=100, num_eval_examples=10, own_data=False).to_record()
GOOD_INSTRUCTION = TrainInstruction(2, ("m.lora_B.weight",), 2, 1.1, 0.1, (1, 2)).to_record()

MALFORMED = [
    ("train", "num-examples", math.nan, "not finite"),
    ("train", "num-examples", -5, "outside"),
    ("train", "num-examples", 2.5, "whole number"),
    ("train", "num-examples", [100, 100], "must be a number"),
    ("train", "num-examples", None, "missing"),
    ("train", "steps", math.nan, "not finite"),
    ("train", "steps", 1.5, "whole number"),
    ("train", "steps", -1, "outside"),
    ("train", "epsilon", math.nan, "not finite"),
    ("train", "epsilon", math.inf, "not finite"),
    ("train", "epsilon", -0.1, "outside"),
    ("train", "noise-multiplier", math.inf, "not finite"),
    ("train", "noise-multiplier", -1.0, "outside"),
    ("train", "sample-rate", 0.0, "outside"),
    ("train", "sample-rate", 1.5, "outside"),
    ("train", "sample-rate", [0.1], "must be a number"),
    ("train", "train-loss", math.nan, "not finite"),
    ("train", "train-loss", -1.0, "outside"),
    ("train", "partition-id", -1, "outside"),
    ("train", "partition-id", True, "must be a number"),
    ("evaluate", "accuracy", 1.5, "outside"),
    ("evaluate", "accuracy", math.nan, "not finite"),
    ("evaluate", "loss", math.inf, "not finite"),
    ("evaluate", "num-examples", 10**12, "differs from the 10 planned"),
    ("evaluate", "num-examples", 0, "outside"),
    ("describe", "partition-id", 3, "outside"),
    ("describe", "partition-id", 1.5, "whole number"),
    ("describe", "num-examples", 10**12, "outside"),
    ("describe", "num-examples", 0, "outside"),
    ("describe", "num-eval-examples", math.nan, "not finite"),
    ("describe", "own-data", 2, "outside"),
    ("instruct", "server-round", 0, "outside"),
    ("instruct", "privacy-rounds", [1, 3], "end with this round"),
    ("instruct", "privacy-rounds", [2, 1, 2], "increasing"),
    ("instruct", "privacy-rounds", 2, "must be a list"),
    ("instruct", "train-keys", "m.lora_B.weight", "must be a list"),
    ("instruct", "num-labels", 1, "outside"),
    ("instruct", "noise-multiplier", math.nan, "not finite"),
]


def _parse(kind: str, fields: dict) -> object:
    if kind == "train":
        return TrainReply.parse(fields)
    if kind == "evaluate":
        return EvaluationReply.parse(fields, planned_examples=10)
    if kind == "describe":
        return Description.parse(fields, num_partitions=3, max_examples=10_000)
    return TrainInstruction.parse(fields)


GOOD = {"train": GOOD_REPLY, "evaluate": GOOD_EVALUATION, "describe": GOOD_DESCRIPTION, "instruct": GOOD_INSTRUCTION}


@pytest.mark.parametrize(("kind", "key", "value", "reason"), MALFORMED)
def test_every_malformed_field_is_a_rejection_naming_it(kind: str, key: str, value: object, reason: str) -> None:
    _parse(kind, dict(GOOD[kind]))  # the well-formed message parses
    fields = {k: v for k, v in GOOD[kind].items() if k != key} if value is None else {**GOOD[kind], key: value}
    with pytest.raises(ProtocolError) as error:
        _parse(kind, fields)
    assert key in str(error.value) and reason in str(error.value) and "\n" not in str(error.value)


# --- the strategy, driven with hand-made messages --------------------------------------------------------

A, B, HEAD = "m.lora_A.weight", "m.lora_B.weight", "head.weight"
SIGMA, RATE, STEPS, DELTA = 1.1, 0.1, 3, 1e-3
# How long a round of these tests waits for replies: FakeGrid answers at once, so only lost replies wait.
WAIT_S = 0.5


@pytest.fixture(autouse=True)
def _flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages carry the run they belong to; outside a running app, say which one."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _global(method: str = "fedsvd") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    arrays = {
        A: torch.randn(2, 4, generator=generator),
        B: torch.zeros(3, 2),
        HEAD: torch.randn(2, 4, generator=generator),
    }
    if build_method(method).merges_into_base:  # FLoRA, FedEx-LoRA
        arrays["m.base_layer.weight"] = torch.randn(3, 4, generator=generator)
    return arrays


class FakeGrid:
    """Answers every message with what ``respond`` makes of it (None: the reply is lost), the way Flower's grid
    hands replies over: each message gets an id when pushed, and replies are pulled by the ids they answer."""

    def __init__(self, respond: Callable[[Message], Message | list[Message] | None]) -> None:
        self.respond = respond
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's in-memory grid does
            self.sent.append(message)
            answer = self.respond(message)
            self.replies += answer if isinstance(answer, list) else [answer] if answer is not None else []
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        ready = [reply for reply in self.replies if reply.metadata.reply_to_message_id in wanted]
        self.replies = [reply for reply in self.replies if reply.metadata.reply_to_message_id not in wanted]
        return ready

    def get_node_ids(self) -> list[int]:
        return [10, 11, 12]


def _strategy(
    method: str = "fedsvd", min_replies: int = 1, clients_per_round: int = 3, **options: object
) -> LoraStrategy:
    plans = {p: ClientPlan(p, 100 * (p + 1), RATE, SIGMA, 6) for p in range(3)}
    ledger = ServerPrivacyLedger("rdp", DELTA, STEPS, {p: (SIGMA, RATE) for p in range(3)})
    return LoraStrategy(
        method=build_method(method, scaling=1.0),
        nodes={p: 10 + p for p in range(3)},
        plans=plans,
        num_eval_examples={p: 10 for p in range(3)},
        num_labels=2,
        clients_per_round=clients_per_round,
        seed=0,
        delta=DELTA,
        min_replies=min_replies,
        ledger=ledger,
        target_epsilon=100.0,
        **options,  # type: ignore[arg-type]
    )


def _honest(
    strategy: LoraStrategy, scale: float = 0.01, shift: float = 0.001, overrides: dict[int, dict] | None = None
) -> Callable[[Message], Message]:
    """A client that trains: B moves by ``scale`` and everything else by ``shift``, both times (partition + 1);
    its report is what the server planned, with ``overrides[partition]`` changed."""

    def respond(message: Message) -> Message:
        partition = message.metadata.dst_node_id - 10
        arrays = message.content["arrays"].to_torch_state_dict()
        keys = message.content["config"]["train-keys"]
        factor = partition + 1
        uploaded = {k: arrays[k] + factor * (scale if k == B else shift) for k in keys}  # type: ignore[union-attr]
        assert strategy.ledger is not None
        report = TrainReply(
            partition_id=partition,
            num_examples=strategy.plans[partition].num_examples,
            epsilon=strategy.ledger.epsilon(partition),
            noise_multiplier=SIGMA,
            sample_rate=RATE,
            steps=STEPS * len(strategy.ledger.rounds[partition]),
            train_loss=0.5,
        ).to_record()
        report.update((overrides or {}).get(partition, {}))
        return Message(RecordDict({"arrays": ArrayRecord(uploaded), "metrics": MetricRecord(report)}), reply_to=message)

    return respond


def _npy(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array(stream, array, version=version)
    return stream.getvalue()


KEY, SHAPE = "m.lora_B.weight", (3, 2)
VALUES = np.arange(6, dtype=np.float32).reshape(SHAPE)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_npy(VALUES.astype(np.float64)), "dtype float64, expected float32"),
        (_npy(VALUES.astype(">f4")), "dtype >f4, expected float32"),
        (_npy(VALUES.reshape(2, 3)), "shape (2, 3), expected (3, 2)"),
        (_npy(np.asfortranarray(VALUES)), "Fortran order, expected C order"),
        (_npy(VALUES)[:-4], "20 bytes of data, expected 24"),
        (_npy(VALUES) + b"\0" * 4, "28 bytes of data, expected 24"),
        (b"not an array at all", "not a readable .npy array"),
    ],
)
def test_uploaded_arrays_are_read_strictly(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as error:
        parse_arrays({KEY: data}, {KEY: SHAPE})
    assert str(error.value) == f"{KEY}: {reason}"


def test_uploaded_arrays_in_any_valid_layout_read_back_exactly() -> None:
    huge = np.full(SHAPE, 3e38, dtype=np.float32)  # finite, though its float32 sum overflows
    for array, data in [(VALUES, _npy(VALUES)), (VALUES, _npy(VALUES, version=(2, 0))), (huge, _npy(huge))]:
        tensor = parse_arrays({KEY: data}, {KEY: SHAPE})[KEY]
        assert tensor.dtype == torch.float32 and torch.equal(tensor, torch.from_numpy(array))


def test_uploads_are_read_without_a_copy_and_written_back_exactly() -> None:
    data = _npy(VALUES)
    tensor = parse_arrays({KEY: data}, {KEY: SHAPE})[KEY]
    # The tensor's values live inside the message's own bytes, right behind the .npy header.
    assert tensor.untyped_storage().data_ptr() - (data_address := _bytes_address(data)) == len(data) - VALUES.nbytes
    assert data_address > 0 and float32_npy(tensor) == data


def _bytes_address(data: bytes) -> int:
    return np.frombuffer(data, dtype=np.uint8).__array_interface__["data"][0]


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_an_upload_with_non_finite_values_is_rejected_and_the_round_goes_on(bad: float) -> None:
    strategy = _strategy()
    honest = _honest(strategy)

    def poisoned(message: Message) -> Message:
        reply = honest(message)
        arrays = reply.content["arrays"].to_torch_state_dict()
        arrays[B][0, 0] = bad
        reply.content["arrays"] = ArrayRecord(arrays)
        return reply

    grid = FakeGrid(lambda m: poisoned(m) if m.metadata.dst_node_id == 11 else honest(m))
    new_arrays, record = strategy.train_round(grid, 1, ArrayRecord(_global()), timeout=WAIT_S)  # type: ignore[arg-type]
    assert new_arrays is not None and record.clients == [0, 2]
    assert record.rejected == {1: f"{B}: non-finite values"}


def test_a_finite_change_too_large_for_float32_is_scaled_to_nothing() -> None:
    strategy = _strategy("ffa")
    honest, huge = _honest(strategy), _honest(strategy, scale=3e38)  # finite values; the change's norm overflows
    grid = FakeGrid(lambda m: huge(m) if m.metadata.dst_node_id == 10 else honest(m))
    new_arrays, record = strategy.train_round(grid, 1, ArrayRecord(_global()), timeout=WAIT_S)  # type: ignore[arg-type]
    assert new_arrays is not None and record.clients == [0, 1, 2] and record.clipped == {0: 0.0}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_method_writes_into_the_uploads_it_aggregates(method: str) -> None:
    # The server's update tensors view the replies' own bytes (no copy): a method writing into them would change
    # what it reads. Each reply's bytes are copied aside when it is made and compared after the round.
    strategy = _strategy(method)
    honest = _honest(strategy)
    made: list[tuple[Message, dict[str, bytearray]]] = []

    def respond(message: Message) -> Message:
        reply = honest(message)
        made.append((reply, {key: bytearray(array.data) for key, array in reply.content["arrays"].items()}))
        return reply

    new_arrays, record = strategy.train_round(FakeGrid(respond), 1, ArrayRecord(_global(method)), timeout=WAIT_S)  # type: ignore[arg-type]
    assert new_arrays is not None and record.clients == [0, 1, 2]
    for reply, copies in made:
        assert {key: array.data for key, array in reply.content["arrays"].items()} == copies


def test_malformed_replies_are_rejected_and_the_round_goes_on() -> None:
    strategy = _strategy()
    honest = _honest(strategy)
    bad_count = _honest(strategy, overrides={1: {"num-examples": math.nan}})
    grid = FakeGrid(lambda m: bad_count(m) if m.metadata.dst_node_id == 11 else honest(m))
    new_arrays, record = strategy.train_round(grid, 1, ArrayRecord(_global()), timeout=WAIT_S)  # type: ignore[arg-type]
    assert new_arrays is not None and record.clients == [0, 2]
    assert "'num-examples' is not finite" in record.rejected[1]
    assert record.dropped is None


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ({"epsilon": 0.123}, "differs from the server ledger"),
        ({"noise-multiplier": 0.5}, "'noise-multiplier' = 0.5 differs from the planned"),
        ({"sample-rate": 0.5}, "'sample-rate' = 0.5 differs from the planned"),
        ({"num-examples": 10**12}, "planned"),
        ({"partition-id": 2}, "the reply came from partition 1"),
    ],
)
def test_reports_that_disagree_with_the_plan_are_rejected(reply: dict, reason: str) -> None:
    strategy = _strategy()
    responder = _honest(strategy, overrides={1: reply})
    _, record = strategy.train_round(FakeGrid(responder), 1, ArrayRecord(_global()), timeout=WAIT_S)  # type: ignore[arg-type]
    assert reason in record.rejected[1] and record.clients == [0, 2]


class OneReplyPerPull(FakeGrid):
    """Hands over one reply per pull, as a round's replies come in while its other clients still train, and
    notes each pull in ``events``."""

    def __init__(self, respond: Callable[[Message], Message | None], events: list[str]) -> None:
        super().__init__(respond)
        self.events = events

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        ready = [reply for reply in self.replies if reply.metadata.reply_to_message_id in wanted][:1]
        self.replies = [reply for reply in self.replies if all(reply is not taken for taken in ready)]
        self.events += [f"pulled {reply.metadata.src_node_id - 10}" for reply in ready]
        return ready


def test_the_a_side_is_prepared_once_sent_each_reply_read_as_it_arrives_and_all_aggregate_as_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[str] = []
    strategy = _strategy()
    check = strategy._checked

    def noted(reply: Message, partition: int, shapes: dict) -> object:
        events.append(f"read {partition}")
        return check(reply, partition, shapes)

    monkeypatch.setattr(strategy, "_checked", noted)
    prepare = strategy.method.prepare

    def prepared(global_arrays: dict, server_round: int) -> None:
        events.append(f"prepared round {server_round} after {len(grid.sent)} instructions")
        prepare(global_arrays, server_round)

    monkeypatch.setattr(strategy.method, "prepare", prepared)
    honest = _honest(strategy)
    sent = ArrayRecord(_global())
    grid = OneReplyPerPull(honest, events)
    arrays, record = strategy.train_round(grid, 1, sent, timeout=WAIT_S)  # type: ignore[arg-type]
    assert events == [
        "prepared round 1 after 3 instructions",
        *("pulled 0", "read 0", "pulled 1", "read 1", "pulled 2", "read 2"),
    ]
    assert arrays is not None and record.clients == [0, 1, 2]
    # Flower's own hook gets every reply at the end, none read before: the same arrays, bit for bit.
    at_the_end = _strategy()
    grid = FakeGrid(_honest(at_the_end))
    ids = grid.push_messages(at_the_end.configure_train(1, sent, ConfigRecord(), grid))  # type: ignore[arg-type]
    again, _ = at_the_end.aggregate_train(1, grid.pull_messages(ids))
    assert again is not None
    expected, got = again.to_torch_state_dict(), arrays.to_torch_state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in got)


def test_lost_duplicate_and_foreign_replies() -> None:
    strategy = _strategy()
    honest = _honest(strategy)

    def respond(message: Message) -> Message | list[Message] | None:
        partition = message.metadata.dst_node_id - 10
        if partition == 0:
            return None  # lost
        if partition == 1:
            return [honest(message), honest(message)]  # the same partition twice
        return Message(Error(code=0, reason="boom\nTraceback (most recent call last): ..."), reply_to=message)

    _, record = strategy.train_round(FakeGrid(respond), 1, ArrayRecord(_global()), timeout=WAIT_S)  # type: ignore[arg-type]
    assert record.rejected == {0: "no reply", 1: record.rejected[1], 2: "client error: boom"}
    assert "second reply" in record.rejected[1] and record.clients == [1]


def test_every_instructed_client_is_charged_even_without_a_reply() -> None:
    strategy = _strategy()
    grid = FakeGrid(lambda message: None)
    _, record = strategy.train_round(grid, 1, ArrayRecord(_global()), timeout=WAIT_S)  # type: ignore[arg-type]
    assert strategy.ledger is not None and record.clients == []
    assert strategy.ledger.rounds == {0: [1], 1: [1], 2: [1]}
    # The next instruction carries the server's record, so a client that lost its state continues from it.
    strategy.train_round(grid, 2, ArrayRecord(_global()), timeout=WAIT_S)  # type: ignore[arg-type]
    assert [m.content["config"]["privacy-rounds"] for m in grid.sent[-3:]] == [[1, 2]] * 3


def test_a_round_tells_how_many_clients_have_replied_and_the_console_shows_it(tmp_path: Path) -> None:
    strategy = _strategy()
    notes: list[tuple[int, str, int, int]] = []
    strategy.progress = lambda *note: notes.append(note)
    strategy.train_round(FakeGrid(_honest(strategy)), 1, ArrayRecord(_global()), timeout=WAIT_S)  # type: ignore[arg-type]
    assert notes[0] == (1, "training", 0, 3) and notes[-1] == (1, "training", 3, 3)

    lines: list[str] = []
    follower = _ProgressFollower(tmp_path, lambda row: lines.append(f"row {row['round']}"), lines.append)
    write_progress(tmp_path, 0, "discovery", 2, 3)
    follower.poll()
    write_progress(tmp_path, 1, "training", 1, 3)
    follower.poll()
    assert lines == [
        "round   0 | discovery: 2/3 clients replied (0 s)",
        "round   1 | training: 1/3 clients replied (0 s)",
    ]
    recorder = RunRecorder(tmp_path, ExperimentConfig())
    recorder.record_round({"round": 1})
    follower.poll()
    assert lines[-1] == "row 1", "a note of a round already shown is not shown again"


def test_too_few_valid_replies_drop_the_round() -> None:
    strategy = _strategy(min_replies=3)
    honest = _honest(strategy)
    grid = FakeGrid(lambda m: honest(m) if m.metadata.dst_node_id != 12 else None)
    new_arrays, record = strategy.train_round(grid, 1, ArrayRecord(_global()), timeout=WAIT_S)  # type: ignore[arg-type]
    assert new_arrays is None and record.dropped == "2 valid update(s), 3 needed"


def test_aggregating_without_configuring_the_round_is_refused() -> None:
    with pytest.raises(AggregationError):
        _strategy().aggregate_train(1, [])


def test_one_client_sending_values_a_million_times_larger_moves_the_adapter_by_a_bounded_amount() -> None:
    # FFA-LoRA: the average itself is the new adapter (FedSVD would rotate it; the product obeys the same bound).
    sent = ArrayRecord(_global())
    honest_strategy = _strategy("ffa")
    honest_arrays, _ = honest_strategy.train_round(FakeGrid(_honest(honest_strategy)), 1, sent, timeout=WAIT_S)  # type: ignore[arg-type]
    strategy = _strategy("ffa")
    honest, attacker = _honest(strategy), _honest(strategy, scale=1e4)
    grid = FakeGrid(lambda m: attacker(m) if m.metadata.dst_node_id == 10 else honest(m))
    attacked, record = strategy.train_round(grid, 1, sent, timeout=WAIT_S)  # type: ignore[arg-type]
    assert attacked is not None and honest_arrays is not None and 0 < record.clipped[0] < 1e-2
    # Honest changes: (p + 1) * (0.01 on B's 6 entries, 0.001 on the head's 8). Sorted, the norms are
    # partition 1's, partition 2's and the attacker's: the lower median is partition 2's.
    base = math.sqrt(0.01**2 * 6 + 0.001**2 * 8)
    median = 3 * base
    weight = 100 / 600  # partition 0's share of the examples
    new, reference = attacked.to_torch_state_dict(), honest_arrays.to_torch_state_dict()
    shift = math.sqrt(sum(float(((new[k] - reference[k]).double() ** 2).sum()) for k in (B, HEAD)))
    own_change = base
    # The documented bound: p_k times (10 x lower median) instead of p_k times its honest change.
    assert shift <= weight * (10 * median + own_change) + 1e-6
    unbounded = weight * 1e4 * math.sqrt(6)
    assert shift < unbounded / 1e3


def test_a_non_finite_aggregate_is_dropped() -> None:
    strategy = _strategy("fedex")
    # Finite uploads, similar in size (none is bounded), whose products B_k A_k overflow float32 in the residual.
    honest = _honest(strategy, scale=1e37, shift=100.0)
    new_arrays, record = strategy.train_round(FakeGrid(honest), 1, ArrayRecord(_global("fedex")), timeout=WAIT_S)  # type: ignore[arg-type]
    assert new_arrays is None and record.dropped == "the aggregate is not finite"


def test_evaluation_replies_with_made_up_counts_are_not_counted() -> None:
    strategy = _strategy()
    strategy.fraction_evaluate = 1.0
    arrays = ArrayRecord(_global())
    strategy.train_round(FakeGrid(_honest(strategy)), 1, arrays, timeout=WAIT_S)  # type: ignore[arg-type]

    def score(message: Message) -> Message:
        count = 10**12 if message.metadata.dst_node_id == 10 else 10
        metrics = MetricRecord({"accuracy": 0.0 if count > 10 else 1.0, "loss": 0.1, "num-examples": count})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    strategy.evaluate_round(FakeGrid(score), 1, arrays, timeout=WAIT_S)  # type: ignore[arg-type]
    assert strategy._round is not None and strategy._round.record.local_accuracy == 1.0


def test_discovery_leaves_out_bad_and_duplicate_nodes() -> None:
    cfg = ExperimentConfig(num_clients=3)

    def describe(message: Message) -> Message:
        node = message.metadata.dst_node_id
        if node == 10:
            return Message(Error(code=0, reason="cannot read data"), reply_to=message)
        description = Description(partition_id=1, num_examples=50, num_eval_examples=0, own_data=False)
        return Message(RecordDict({"metrics": MetricRecord(description.to_record())}), reply_to=message)

    assert discover_clients(FakeGrid(describe), cfg, 2) == {}  # type: ignore[arg-type]

    def fine(message: Message) -> Message:
        partition = message.metadata.dst_node_id - 10
        description = Description(partition_id=partition, num_examples=50, num_eval_examples=0, own_data=False)
        record = description.to_record() if partition else {**description.to_record(), "num-examples": math.nan}
        return Message(RecordDict({"metrics": MetricRecord(record)}), reply_to=message)

    assert sorted(discover_clients(FakeGrid(fine), cfg, 2)) == [1, 2]  # type: ignore[arg-type]


def _client_context(own: PrivacyLedger | None) -> Context:
    state = RecordDict({PRIVACY_STATE_KEY: ConfigRecord(own.to_record())} if own else {})  # type: ignore[arg-type]
    return Context(run_id=1, node_id=1, node_config={}, state=state, run_config={})


def test_a_client_behind_the_servers_record_continues_from_it_and_one_ahead_refuses() -> None:
    cfg = ExperimentConfig(local_steps=STEPS)
    instruction = TrainInstruction(5, (B,), 2, SIGMA, RATE, (1, 3, 5))
    # Restarted without its state: it continues from the server's record of rounds 1 and 3.
    fresh = _continuing_ledger(_client_context(None), cfg, instruction, 0)
    assert fresh.rounds == [1, 3] and fresh.history == [(SIGMA, RATE, STEPS)] * 2
    # Its reply of round 3 was lost after it had saved round 1 only: the same.
    lagging = PrivacyLedger("rdp", [(SIGMA, RATE, STEPS)], [1])
    assert _continuing_ledger(_client_context(lagging), cfg, instruction, 0).rounds == [1, 3]
    # In step with the server: its own ledger goes on.
    own = PrivacyLedger("rdp", [(SIGMA, RATE, 2 * STEPS)], [1, 3])
    assert _continuing_ledger(_client_context(own), cfg, instruction, 0) == own
    # Rounds the server never charged: it refuses.
    ahead = PrivacyLedger("rdp", [(SIGMA, RATE, 3 * STEPS)], [1, 2, 3])
    with pytest.raises(RuntimeError, match="never charged"):
        _continuing_ledger(_client_context(ahead), cfg, instruction, 0)


# --- what a run writes, and what a resume accepts -----------------------------------------------------------


def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    state = ServerState(
        completed_round=2,
        arrays=_global(),
        plans={0: (100, RATE, SIGMA)},
        privacy_rounds={0: [1, 2]},
        epsilon={0: 1.5},
        latest={"round": 2, "accuracy": 0.5, "loss": 0.7, "local_accuracy": None},
        short_rounds=0,
        wall_seconds=3.0,
        config=ExperimentConfig().to_flat(),
        client_level_rounds=[1, 2],
        client_level_noise=0.83,
    )
    state.save(tmp_path)
    restored = ServerState.load(tmp_path)
    assert restored.arrays.keys() == state.arrays.keys()
    assert all(torch.equal(restored.arrays[k], state.arrays[k]) for k in state.arrays)
    assert {**vars(restored), "arrays": None} == {**vars(state), "arrays": None}
    state.client_level_rounds = [1, 2, 3]
    state.save(tmp_path)
    with pytest.raises(CheckpointError, match="charges client-level rounds after its own round"):
        ServerState.load(tmp_path)
    (tmp_path / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        ServerState.load(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        ServerState.load(tmp_path / "elsewhere")


def test_a_resume_may_change_rounds_and_resources_only() -> None:
    stored = ExperimentConfig().to_flat()
    assert resume_conflict(stored, ExperimentConfig(rounds=20, client_cpus=1, resume=True)) is None
    conflict = resume_conflict(stored, ExperimentConfig(lr=0.1))
    assert conflict is not None and conflict.startswith("resume: lr = 0.1 differs from the run's 0.5")


def test_results_are_never_truncated_and_a_resume_drops_rows_past_its_checkpoint(tmp_path: Path) -> None:
    cfg = ExperimentConfig()
    recorder = RunRecorder(tmp_path, cfg)
    for server_round in range(4):
        recorder.record_round({"round": server_round, "accuracy": 0.5})
    with pytest.raises(ResultsExist):
        RunRecorder(tmp_path, cfg)
    assert len(read_metrics(tmp_path)) == 4
    RunRecorder(tmp_path, cfg, resume_after=2)
    assert [row["round"] for row in read_metrics(tmp_path)] == [0, 1, 2]


# --- real federations, killed ---------------------------------------------------------------------------


def _start(out_dir: Path, tiny_bert: Path, sentiment_csv: Path, *arguments: str) -> subprocess.Popen:
    command = fedsvd_command(out_dir, tiny_bert, sentiment_csv, *arguments)
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _resume(out_dir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "fedsvd.cli", "run", "--resume", str(out_dir)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_round(process: subprocess.Popen, out_dir: Path, server_round: int) -> None:
    deadline = time.monotonic() + 300
    while not any(row["round"] >= server_round for row in read_metrics(out_dir)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"round {server_round} never came"
        time.sleep(0.1)


def _files(out_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in out_dir.rglob("*") if p.is_file()}


def _signal_and_check(process: subprocess.Popen, out_dir: Path, number: int, before: set[int]) -> str:
    """Send the signal: within 10 s nothing the run started may be left, and once it is gone nothing may write
    into the run's directory any more."""
    process.send_signal(number)
    _, stderr = process.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while flower_processes() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert flower_processes() <= before, f"signal {number} left Flower or Ray processes behind after 10 s"
    written = _files(out_dir)
    time.sleep(3)
    changed = {path for path, stamp in _files(out_dir).items() if written.get(path) != stamp}
    assert not changed, f"written into after the run was stopped: {changed}"
    assert process.returncode == (-signal.SIGKILL if number == signal.SIGKILL else 128 + number), stderr
    return stderr


@pytest.fixture
def interruptible() -> Iterator[None]:
    """Runs started meanwhile take Ctrl-C as a user's would. A shell without job control starts a background
    command (``make test &``) with SIGINT ignored, and every process started below it inherits that; a process
    inherits a handler only as the default action, which Python turns into KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.starts(3)
@pytest.mark.usefixtures("interruptible")
def test_interrupted_and_killed_runs_stop_everything_and_resume_bit_for_bit(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path, federation_runs: dict[str, Path]
) -> None:
    """Ctrl-C after round 0, resume, kill -9 in round 1 or 2, resume: the same files as the uninterrupted run."""
    before = flower_processes()
    out_dir = tmp_path / "run"
    process = _start(out_dir, tiny_bert, sentiment_csv, *federation_run_arguments("fedsvd"))
    _wait_for_round(process, out_dir, 0)
    stderr = _signal_and_check(process, out_dir, signal.SIGINT, before)
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert f"fedsvd run --resume {out_dir}" in stderr

    resumed = _resume(out_dir)
    _wait_for_round(resumed, out_dir, 1)
    _signal_and_check(resumed, out_dir, signal.SIGKILL, before)
    assert not (out_dir / "summary.json").exists()

    finished = _resume(out_dir)
    stdout, stderr = finished.communicate(timeout=600)
    assert finished.returncode == 0, stdout + stderr
    reference = federation_runs["fedsvd"]
    assert timeless_rows(out_dir) == timeless_rows(reference)
    adapter, expected = (
        load_file(str(out_dir / "adapter.safetensors")),
        load_file(str(reference / "adapter.safetensors")),
    )
    assert adapter.keys() == expected.keys() and all(torch.equal(adapter[k], expected[k]) for k in adapter)
    assert_same_ledger(out_dir, reference)
    epsilons = [row["epsilon_max"] for row in read_metrics(out_dir)]
    assert epsilons == sorted(epsilons), "epsilon never decreases across a resume"
    assert flower_processes() <= before


@pytest.mark.starts(1)
def test_a_closed_terminal_stops_everything_and_leaves_a_resumable_run(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path
) -> None:
    before = flower_processes()
    out_dir = tmp_path / "run"
    process = _start(out_dir, tiny_bert, sentiment_csv, "--set", "rounds=3")
    _wait_for_round(process, out_dir, 0)
    stderr = _signal_and_check(process, out_dir, signal.SIGHUP, before)
    assert "Traceback" not in stderr and "continue with: fedsvd run --resume" in stderr
    assert (out_dir / "checkpoint.safetensors").is_file() and not (out_dir / "summary.json").exists()


def _dp_accounting_epsilon(history: list[list[float]]) -> float:
    accountant = rdp.RdpAccountant(RDP_ORDERS)
    for sigma, rate, steps in history:
        accountant.compose(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma)), int(steps))
    return accountant.get_epsilon(DELTA)


@pytest.mark.starts(2)
def test_a_dead_worker_is_replaced_its_clients_train_again_and_their_spend_is_counted(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path
) -> None:
    before = flower_processes()
    out_dir = tmp_path / "run"
    rounds = 4
    process = _start(out_dir, tiny_bert, sentiment_csv, "--set", f"rounds={rounds}", "--set", "fraction=1.0")
    _wait_for_round(process, out_dir, 1)
    workers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "ray::ClientAppActor" in " ".join(p.info["cmdline"] or []) and started_by_this_worker(p)
    ]
    assert workers, "no Ray client worker found"
    os.kill(workers[0].pid, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stdout + stderr
    assert "a client worker died; restarting the federation from round" in stderr
    rows = read_metrics(out_dir)
    assert [row["round"] for row in rows] == list(range(rounds + 1))
    (failed_round,) = [row for row in rows if any("ActorDiedError" in r for r in row["rejected"].values())]
    failed = {int(p) for p in failed_round["rejected"]}
    assert "failed " + ",".join(failed_round["rejected"]) in stdout, "the console line shows which clients failed"
    later = [row for row in rows if row["round"] > failed_round["round"]]
    assert later and all(failed <= set(row["clients"]) for row in later), "its clients train again"
    report = json.loads((out_dir / "privacy.json").read_text())
    for client, entry in report["clients"].items():
        # Every client was instructed in every round, the dead worker's too: all rounds are charged.
        assert entry["rounds"] == list(range(1, rounds + 1)), client
        assert entry["epsilon"]["rdp"] == pytest.approx(_dp_accounting_epsilon(entry["history"]), rel=5e-3)
    assert flower_processes() <= before


@pytest.mark.starts(1)
def test_a_run_whose_rounds_keep_falling_short_stops_with_an_error(
    tmp_path: Path, tiny_bert: Path, sentiment_csv: Path
) -> None:
    """An absurd learning rate makes every update non-finite: each is rejected, rounds are dropped, the run stops."""
    result = run_fedsvd(tmp_path, tiny_bert, sentiment_csv, "--set", "rounds=6", "--set", "lr=1e30")
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("fedsvd: the run stopped: 3 rounds in a row had fewer than min_replies = 1 valid updates")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["failed"]
    rows = read_metrics(tmp_path)
    assert all(row["dropped"] and "non-finite values" in " ".join(row["rejected"].values()) for row in rows[1:])
    assert "round dropped" in result.stdout


# --- client-level DP in the strategy ------------------------------------------------------------------------


def _client_level(sigma: float = 0.7, rate: float = 1.0, target: float = 1e3) -> ClientLevelLedger:
    plan = ClientLevelPlan(clip_norm=0.02, noise_multiplier=sigma, sample_rate=rate, denominator=3.0, rounds=5)
    return ClientLevelLedger(plan, 1e-3, "rdp", target)


def test_under_client_level_dp_the_method_sees_the_noised_average_of_clipped_changes() -> None:
    client_level = _client_level()
    strategy = _strategy("fedsvd", client_level=client_level)
    sent = _global()
    replies: list[Message] = []
    honest = _honest(strategy)  # B moves by 0.01 * (p + 1) on 6 entries: norms 0.024, 0.049, 0.073 > clip 0.02
    grid = FakeGrid(lambda m: replies.append(reply := honest(m)) or reply)
    new_arrays, record = strategy.train_round(grid, 1, ArrayRecord(sent), timeout=WAIT_S)  # type: ignore[arg-type]
    assert new_arrays is not None and record.clients == [0, 1, 2] and client_level.rounds == [1]
    assert sorted(record.clipped) == [0, 1, 2] and all(0 < scale < 1 for scale in record.clipped.values())
    updates = [
        ClientUpdate({k: torch.from_numpy(v.numpy().copy()) for k, v in r.content["arrays"].items()}, 1)
        for r in replies
    ]
    keys = sorted(strategy.method.uplink_keys(sent.keys(), 1))
    released = noised_average(sent, updates, keys, client_level.plan, noise_generator(0, 1))
    expected = strategy.method.aggregate_noised(sent, released, 1)
    new = new_arrays.to_torch_state_dict()
    assert all(torch.equal(new[key], expected[key]) for key in expected)
    # The noise is really there: without it the adapter would be the plain clipped average.
    clean = ClientLevelPlan(0.02, 0.0, 1.0, 3.0, 5)
    plain = strategy.method.aggregate_noised(sent, noised_average(sent, updates, keys, clean, noise_generator(0, 1)), 1)
    assert not torch.allclose(new[B] @ new[A], plain[B] @ plain[A], atol=1e-4)


def test_a_poisson_round_without_clients_still_releases_noise_and_is_charged() -> None:
    client_level = _client_level(rate=0.01)
    strategy = _strategy("ffa", poisson_rate=0.01, client_level=client_level)
    grid = FakeGrid(_honest(strategy))
    sent = _global("ffa")
    new_arrays, record = strategy.train_round(grid, 1, ArrayRecord(sent), timeout=WAIT_S)  # type: ignore[arg-type]
    assert record.instructed == [] and grid.sent == [] and record.dropped is None
    assert new_arrays is not None and client_level.rounds == [1]
    moved = new_arrays.to_torch_state_dict()[B] - sent[B]
    assert 0 < float(moved.abs().max()) < 10 * client_level.plan.noise_std


def test_poisson_sampling_draws_each_client_independently_at_its_rate() -> None:
    strategy = _strategy("ffa", poisson_rate=0.4)
    counts = [len(strategy.sample_partitions(r)) for r in range(1, 2001)]
    assert statistics.fmean(counts) == pytest.approx(3 * 0.4, rel=0.05)
    assert {0, 1, 2, 3} <= set(counts), "rounds with no client, and with every client"


def test_without_client_level_dp_an_empty_poisson_round_changes_nothing_and_is_not_a_short_round() -> None:
    strategy = _strategy("ffa", poisson_rate=1e-9)
    grid, arrays = FakeGrid(_honest(strategy)), ArrayRecord(_global("ffa"))
    new_arrays, record = strategy.train_round(grid, 1, arrays, timeout=WAIT_S)  # type: ignore[arg-type]
    assert new_arrays is None and record.instructed == [] and record.dropped is None


def test_no_round_starts_that_would_take_the_federation_past_its_client_level_target() -> None:
    client_level = _client_level(sigma=2.0)
    two_rounds = epsilon_of([(2.0, 1.0, 2)], 1e-3, "rdp")
    client_level.target_epsilon = two_rounds * 1.0001
    strategy = _strategy("ffa", client_level=client_level)
    arrays = ArrayRecord(_global("ffa"))
    for server_round in (1, 2):
        strategy.train_round(FakeGrid(_honest(strategy)), server_round, arrays, timeout=WAIT_S)  # type: ignore[arg-type]
    assert client_level.epsilon() == pytest.approx(two_rounds)
    with pytest.raises(BudgetExhausted, match="client-level epsilon"):
        strategy.train_round(FakeGrid(_honest(strategy)), 3, arrays, timeout=WAIT_S)  # type: ignore[arg-type]
    assert client_level.rounds == [1, 2]


def test_a_round_line_lists_few_clients_counts_many_and_marks_none() -> None:
    row = {"round": 3, "accuracy": 0.5, "loss": 0.7, "epsilon_max": 1.0, "epsilon_mean": 0.5, "seconds": 2.0}
    assert "| clients -            |" in progress_line({**row, "clients": []})
    assert "| clients 0,1,2,3,4,5,6,7 |" in progress_line({**row, "clients": list(range(8))})
    assert "| clients (9)          |" in progress_line({**row, "clients": list(range(9))})
    assert "client eps" not in progress_line({**row, "clients": []})
    assert "| client eps  1.250 |" in progress_line({**row, "clients": [], "client_epsilon": 1.25})
