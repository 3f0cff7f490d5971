"""Flower ClientApp: one data owner training the shared LoRA adapter with DP-SGD.

The base model, the tokenizer and this client's tokenised partition are cached per worker process
(a long-lived Ray actor in simulation, the SuperNode's ClientApp process in deployment): a round only
writes the server's arrays into the cached model. The privacy ledger lives in ``context.state`` so that
epsilon accumulates over every round this client actually trains; so do the factors a personalised method
(FedSA-LoRA) keeps for this client alone. In deployment the node config says where the owner's data and
the node's saved state live (see ``clients.node``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from clients.node import NodeSettings, client_data, node_settings, persist_node_state
from clients.trainer import DpSgdSettings, train_local
from fedsvd.config import ExperimentConfig
from fedsvd.data import tokenize
from fedsvd.methods import METHODS
from fedsvd.methods.base import factor_of
from fedsvd.model import (
    build_lora_model,
    evaluate,
    get_arrays,
    load_tokenizer,
    resolve_device,
    set_arrays,
    set_trainable,
)
from fedsvd.privacy.budget import within_budget
from fedsvd.privacy.record_level import PrivacyLedger, sample_rate_for
from fedsvd.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    Description,
    EvaluationReply,
    TrainInstruction,
    TrainReply,
    integer,
)

PRIVACY_STATE_KEY = "privacy-ledger"
PERSONAL_STATE_KEY = "personal-arrays"

app = ClientApp(mods=[persist_node_state])


@functools.lru_cache(maxsize=1)
def _cached_model(run_id: int, cfg: ExperimentConfig, num_labels: int) -> PeftModel:
    # Keyed by run: FLoRA and FedEx-LoRA rewrite the base weights, which must never leak into another run.
    model = build_lora_model(cfg.model, num_labels, cfg.lora_rank, cfg.lora_alpha, cfg.targets, cfg.seed, cfg.pooling)
    return model.to(resolve_device(cfg.device))


@functools.lru_cache(maxsize=1)
def _cached_tokenizer(model: str) -> PreTrainedTokenizerBase:
    # A worker trains a new client most rounds in a large federation: loading the tokenizer for each one cost
    # 60 ms of a 4 s round at 1,000 clients.
    return load_tokenizer(model)


@functools.cache
def _cached_tokens(
    cfg: ExperimentConfig, node: NodeSettings, num_labels: int, held_out: bool = False
) -> dict[str, torch.Tensor]:
    data = client_data(cfg, node, num_labels)
    part = data.local_eval if held_out else data.train
    if part is None:
        raise ValueError("per-client evaluation was requested but local_eval_fraction = 0")
    return tokenize(part, _cached_tokenizer(cfg.model), cfg.max_length)


def _num_labels(msg: Message) -> int:
    # The server's class count: an owner's own file may not contain every class.
    return integer(dict(msg.content[CONFIG]), "num-labels", minimum=2)


def _model_with_round_arrays(cfg: ExperimentConfig, msg: Message, context: Context) -> PeftModel:
    """The cached model holding the server's arrays, except for the factors this client keeps as its own."""
    model = _cached_model(context.run_id, cfg, _num_labels(msg))
    arrays = msg.content[ARRAYS].to_torch_state_dict()
    if PERSONAL_STATE_KEY in context.state:
        arrays.update(context.state[PERSONAL_STATE_KEY].to_torch_state_dict())  # type: ignore[union-attr]
    set_arrays(model, arrays, cfg.train_head)
    return model


def _keep_personal_factors(cfg: ExperimentConfig, model: PeftModel, context: Context) -> None:
    personal = METHODS[cfg.method].personal_factors
    if personal:
        own = {key: value for key, value in get_arrays(model, cfg.train_head).items() if factor_of(key) in personal}
        context.state[PERSONAL_STATE_KEY] = ArrayRecord(own)


def _identity(context: Context) -> tuple[ExperimentConfig, NodeSettings]:
    """This node's config and settings; the partition count must match the config's client count."""
    cfg = ExperimentConfig.from_mapping(context.run_config, source="run config")
    node = node_settings(context.node_config)
    if node.num_partitions != cfg.num_clients:
        raise ValueError(
            f"node has num-partitions = {node.num_partitions} but num_clients = {cfg.num_clients}: "
            "start as many SuperNodes as the config has clients"
        )
    return cfg, node


def round_seed(cfg: ExperimentConfig, partition_id: int, server_round: int) -> int:
    # Independent, reproducible streams for each (run seed, client, round): sampling and noise never repeat.
    return int(np.random.SeedSequence([cfg.seed, partition_id, server_round]).generate_state(1)[0])


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Tell the server who this node is, so that it samples clients by partition, reproducibly, and how much
    data it holds (with its own data file, the server plans this client's noise from that size)."""
    cfg, node = _identity(context)
    data = client_data(cfg, node, _num_labels(msg))
    description = Description(
        partition_id=node.partition_id,
        num_examples=len(data.train),
        num_eval_examples=len(data.local_eval) if data.local_eval is not None else 0,
        own_data=node.data_file is not None,
    )
    return Message(RecordDict({METRICS: MetricRecord(description.to_record())}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, node = _identity(context)
    partition_id = node.partition_id
    instruction = TrainInstruction.parse(dict(msg.content[CONFIG]))
    server_round = instruction.server_round

    model = _model_with_round_arrays(cfg, msg, context)
    set_trainable(model, list(instruction.train_keys), cfg.train_head)
    tokens = _cached_tokens(cfg, node, instruction.num_labels)
    num_examples = len(tokens["labels"])
    if not math.isclose(instruction.sample_rate, sample_rate_for(cfg.batch_size, num_examples), rel_tol=1e-9):
        raise ValueError(f"client {partition_id}: the instructed sample rate does not match batch_size / its data size")

    ledger = _continuing_ledger(context, cfg, instruction, partition_id)
    if cfg.dp:
        # Defence in depth: the server should never ask this, but the client's own ledger has the last word.
        next_round = (instruction.noise_multiplier, instruction.sample_rate, cfg.local_steps)
        if not within_budget(ledger.history, next_round, cfg.delta, cfg.accountant, cfg.epsilon):
            raise RuntimeError(
                f"client {partition_id} refuses to train: another round would exceed its epsilon budget {cfg.epsilon:g}"
            )
    result = train_local(
        model,
        tokens,
        steps=cfg.local_steps,
        lr=cfg.lr,
        sample_rate=instruction.sample_rate,
        seed=round_seed(cfg, partition_id, server_round),
        device=resolve_device(cfg.device),
        dp=DpSgdSettings(instruction.noise_multiplier, cfg.clip_norm) if cfg.dp else None,
        ledger=ledger if cfg.dp else None,
        server_round=server_round,
    )
    context.state[PRIVACY_STATE_KEY] = ConfigRecord(ledger.to_record())  # type: ignore[arg-type]
    _keep_personal_factors(cfg, model, context)

    train_keys = set(instruction.train_keys)
    uploaded = {key: value for key, value in get_arrays(model, cfg.train_head).items() if key in train_keys}
    report = TrainReply(
        partition_id=partition_id,
        num_examples=num_examples,
        epsilon=ledger.epsilon(cfg.delta) if cfg.dp else 0.0,
        noise_multiplier=instruction.noise_multiplier,
        sample_rate=instruction.sample_rate,
        steps=ledger.steps if cfg.dp else cfg.local_steps,
        train_loss=result.mean_loss if math.isfinite(result.mean_loss) else None,
    )
    content = RecordDict({ARRAYS: ArrayRecord(uploaded), METRICS: MetricRecord(report.to_record())})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_locally(msg: Message, context: Context) -> Message:
    """Score the round's global adapter (with this client's own factors, if it keeps any) on the client's
    held-out slice, which it never trains on."""
    cfg, node = _identity(context)
    model = _model_with_round_arrays(cfg, msg, context)
    tokens = _cached_tokens(cfg, node, _num_labels(msg), held_out=True)
    accuracy, loss = evaluate(model, tokens, resolve_device(cfg.device))
    reply = EvaluationReply(accuracy=accuracy, loss=loss, num_examples=len(tokens["labels"]))
    return Message(RecordDict({METRICS: MetricRecord(reply.to_record())}), reply_to=msg)


def _continuing_ledger(
    context: Context, cfg: ExperimentConfig, instruction: TrainInstruction, partition_id: int
) -> PrivacyLedger:
    """This client's ledger before this round: its own, or the server's record of it when its own is shorter.

    A client restarted without its state, or one whose reply was lost, would otherwise forget rounds it was
    charged for; a client whose own record holds rounds the server never charged refuses to train.
    """
    own = (
        PrivacyLedger.from_record(context.state[PRIVACY_STATE_KEY])  # type: ignore[arg-type]
        if PRIVACY_STATE_KEY in context.state
        else PrivacyLedger(cfg.accountant)
    )
    earlier = list(instruction.privacy_rounds[:-1])
    unknown = sorted(set(own.rounds) - set(instruction.privacy_rounds))
    if unknown:
        raise RuntimeError(
            f"client {partition_id} refuses to train: it trained in rounds {unknown}, which the server never charged"
        )
    if own.rounds == earlier:
        return own
    event = (instruction.noise_multiplier, instruction.sample_rate, cfg.local_steps)
    return PrivacyLedger(cfg.accountant, [event] * len(earlier), earlier)
