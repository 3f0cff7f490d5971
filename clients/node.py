"""What a SuperNode's node config means to the ClientApp: whose data this is, where it lives, where state is kept.

A data owner starts its SuperNode with, for example::

    flower-supernode ... \\
        --node-config 'partition-id=0 num-partitions=3 data-file="/app/data/train.csv" state-dir="/app/state"'

- ``partition-id``, ``num-partitions`` (required): this client's id among the run's ``num_clients``. The id fixes
  when the client is sampled, its noise streams and its line in the server's privacy ledger. Without
  ``data-file`` it also selects the partition of the run config's ``dataset`` that the client trains on
  (simulation, or a demo on public data).
- ``data-file`` (optional): the owner's own ``.csv`` / ``.jsonl`` (``text`` or ``text_a`` + ``text_b``, and an
  integer ``label``). The client trains on this file alone and never loads the run config's dataset, so
  nothing reads another owner's data; the server plans the client's noise from the size it reports.
- ``state-dir`` (optional): a directory of this node's own where the client's Flower state (its privacy ledger
  and any factors it keeps for itself) is written after every round it trains. A restarted SuperNode has lost
  that state from memory; the client then continues from this file instead of starting a fresh accountant.
  (Its epsilon would be right even without it: the server sends its record of the client's rounds with every
  instruction, and a client whose own record is shorter continues from the server's.)
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedsvd.config import ExperimentConfig
from fedsvd.data import DataError, TextDataset, held_out_split, load_file
from fedsvd.federation import data_for
from fedsvd.protocol import CONFIG, integer

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_FILE = "data-file"
STATE_DIR = "state-dir"
NODE_CONFIG_KEYS = (PARTITION_ID, NUM_PARTITIONS, DATA_FILE, STATE_DIR)


class NodeConfigError(ValueError):
    """A node config the client cannot work with; the message is one line naming the key."""


@dataclass(frozen=True)
class NodeSettings:
    """This node's place in the federation and where its data and state live (see the module docstring)."""

    partition_id: int
    num_partitions: int
    data_file: Path | None = None
    state_dir: Path | None = None


@dataclass(frozen=True)
class ClientData:
    """The examples this client trains on and, with per-client evaluation, its held-out slice (disjoint)."""

    train: TextDataset
    local_eval: TextDataset | None


def node_settings(node_config: Mapping[str, Any]) -> NodeSettings:
    """Read and check a node config; every problem is a NodeConfigError naming the key."""
    unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS))
    if unknown:
        raise NodeConfigError(f"node config: unknown key {unknown[0]!r}; known keys: {', '.join(NODE_CONFIG_KEYS)}")
    partition_id = _integer(node_config, PARTITION_ID)
    num_partitions = _integer(node_config, NUM_PARTITIONS)
    if num_partitions < 1 or not 0 <= partition_id < num_partitions:
        raise NodeConfigError(
            f"node config: {PARTITION_ID} = {partition_id} must be in [0, {NUM_PARTITIONS}) with "
            f"{NUM_PARTITIONS} = {num_partitions} >= 1"
        )
    data_file = _path(node_config, DATA_FILE)
    if data_file is not None and not data_file.is_file():
        raise NodeConfigError(f"node config: {DATA_FILE} = '{data_file}': no such file")
    state_dir = _path(node_config, STATE_DIR)
    if state_dir is not None:
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise NodeConfigError(f"node config: {STATE_DIR} = '{state_dir}': {err.strerror or err}") from None
        if not os.access(state_dir, os.W_OK):
            raise NodeConfigError(f"node config: {STATE_DIR} = '{state_dir}': not writable")
    return NodeSettings(partition_id, num_partitions, data_file, state_dir)


def _integer(node_config: Mapping[str, Any], key: str) -> int:
    if key not in node_config:
        raise NodeConfigError(f"node config: missing {key!r} (start the SuperNode with --node-config '{key}=...')")
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise NodeConfigError(f"node config: {key} = {value!r} must be an integer")
    return value


def _path(node_config: Mapping[str, Any], key: str) -> Path | None:
    value = node_config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise NodeConfigError(f'node config: {key} = {value!r} must be a quoted path, e.g. {key}="/app/data"')
    return Path(value).expanduser()


@functools.cache
def client_data(cfg: ExperimentConfig, node: NodeSettings, num_labels: int) -> ClientData:
    """This client's examples, loaded once per process.

    ``num_labels`` is the federation's class count (the server's); an owner's file must use class ids below it
    (a row with another id, or a class name, is refused naming the file and row: see ``fedsvd.data.labels``).
    """
    if node.data_file is None:
        data = data_for(cfg)
        return ClientData(data.partitions[node.partition_id], data.local_eval[node.partition_id])
    try:
        own = load_file(node.data_file, num_labels=num_labels)
        if cfg.local_eval_fraction == 0:
            return ClientData(own, None)
        # The same per-client stream as fedsvd.federation uses for partitions, so both modes split alike.
        seed = int(np.random.SeedSequence([cfg.seed, node.partition_id]).generate_state(1)[0])
        return ClientData(*held_out_split(own, cfg.local_eval_fraction, seed))
    except DataError as err:
        raise NodeConfigError(f"node config: {DATA_FILE} = '{node.data_file}': {err}") from None


# Saved states kept per client: the newest before a round re-run after a resume must still be there.
KEPT_STATES = 3


def state_directory(state_dir: Path, run_id: int) -> Path:
    """A node's states of one run: a new run starts a new accountant, a restarted SuperNode continues its run's."""
    return state_dir / f"run-{run_id}"


def _saved_round(path: Path) -> int:
    return int(path.stem.removeprefix("round-"))


def saved_states(directory: Path) -> list[Path]:
    """The saved states in a directory, oldest round first."""
    return sorted(directory.glob("round-*.state"), key=_saved_round)


def _client_state_directory(context: Context) -> Path | None:
    """Where this client's states live: the node config's state-dir (deployment), else the run config's
    client_state_dir (``fedsvd run`` puts it under the results, so that a resumed run finds it), else nowhere."""
    node = node_settings(context.node_config)
    if node.state_dir is not None:
        return state_directory(node.state_dir, context.run_id)
    shared = context.run_config.get("client_state_dir")
    if isinstance(shared, str) and shared:
        return Path(shared) / f"partition-{node.partition_id}"
    return None


def persist_node_state(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: give every message the client state of the rounds before it, and save it after training.

    States are kept per round (``round-<r>.state``), and a message of round r starts from the newest saved
    before r (for training) or up to r (for evaluation). A restarted SuperNode therefore continues from its
    file, and a round that is run again after a resume starts from exactly the state it started from the first
    time, even if the client had already trained it before the run was killed. A failed message saves nothing.
    """
    directory = _client_state_directory(context)
    config = msg.content.config_records.get(CONFIG) if msg.has_content() else None
    if directory is None or config is None or "server-round" not in config:
        return call_next(msg, context)
    server_round = integer(dict(config), "server-round", minimum=1)
    training = msg.metadata.message_type == MessageType.TRAIN
    earlier = [path for path in saved_states(directory) if _saved_round(path) < server_round + (not training)]
    if earlier:
        restored = recorddict_from_proto(ProtoRecordDict.FromString(earlier[-1].read_bytes()))
        for key in list(context.state):
            del context.state[key]
        for key, record in restored.items():
            context.state[key] = record
    reply = call_next(msg, context)
    if training and not reply.has_error():
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"round-{server_round}.state"
        # Write-then-rename: a client killed mid-write keeps the previous state, never half of one.
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{path.name}.", delete=False) as handle:
            handle.write(recorddict_to_proto(context.state).SerializeToString())
        os.replace(handle.name, path)
        for old in saved_states(directory)[:-KEPT_STATES]:
            old.unlink(missing_ok=True)
    return reply
