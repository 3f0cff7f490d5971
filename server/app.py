"""Flower ServerApp: runs one federated LoRA experiment, records every round and can resume after a crash.

The same app serves simulation (``fedsvd run`` / ``flwr run`` on the Ray backend) and deployment
(SuperLink + SuperNodes): only the launcher differs. ``set_up`` discovers the clients, plans their privacy,
builds the ledger and the strategy (or restores them from the run's checkpoint); ``Federation.run`` drives
the rounds and hands what each round returned to the ``RoundRecorder``, which writes the metrics row, the
adapter, the ledger and the checkpoint after every round. The server evaluates on the held-out split of the
run config's ``dataset``; clients train on their partition of it, or, in deployment, on a data file of their
own (see ``clients.node``), planned from the size they report.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedsvd.config import MAX_SHORT_ROUNDS, RESUMABLE_KEYS, ExperimentConfig, resume_conflict
from fedsvd.data import tokenize
from fedsvd.federation import ClientPlan, FederationData, client_level_plan, client_plan, data_for
from fedsvd.heap import retain_freed_memory
from fedsvd.methods import FederatedLoraMethod, build_method
from fedsvd.model import build_lora_model, evaluate, get_arrays, load_tokenizer, resolve_device, set_arrays
from fedsvd.privacy.client_level import ClientLevelLedger
from fedsvd.privacy.record_level import ServerPrivacyLedger
from fedsvd.protocol import CONFIG, METRICS, Description, ProtocolError
from fedsvd.results import (
    RESTART_FILE,
    CheckpointError,
    ResultsExist,
    RunRecorder,
    ServerState,
    progress_line,
    write_progress,
    write_restart_request,
)
from server.strategy import BudgetExhausted, LoraStrategy, Progress, RoundRecord, client_error, exchange

# How long the server waits for every SuperNode to connect and introduce itself.
DISCOVERY_TIMEOUT_S = 600.0
# How long a round waits for its replies; a client that has not answered by then is counted as failed.
ROUND_TIMEOUT_S = 3600.0
# What Flower's Ray backend says when the worker process that ran a client has died.
DEAD_WORKER_SIGNS = ("ActorDiedError", "RayActorError", "ActorUnavailableError")

# Flower's simulation engine runs this thread in the ServerApp's process (flwr 1.42, vce_api.run_api): it asks the
# LinkState for every node's next message, node by node, every 0.1 s.
ENGINE_POLLING_THREAD = "add_messages_to_queue"
LOWEST_PRIORITY = 19

app = ServerApp()


class SetupError(RuntimeError):
    """The federation cannot start or continue; the message says why in one line."""


def results_dir(cfg: ExperimentConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser().resolve()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("results", f"{cfg.method}-{stamp}").resolve()


def discover_clients(
    grid: Grid, cfg: ExperimentConfig, num_labels: int, progress: Progress | None = None
) -> dict[int, tuple[int, Description]]:
    """Ask every node who it is: node ids are not stable across runs, partitions are.

    A node that fails to describe itself, or describes itself wrongly, is left out with a logged reason; two
    nodes claiming one partition are both left out (neither can be trusted to be it).
    Returns ``partition -> (node id, description)``.
    """
    deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
    while len(node_ids := list(grid.get_node_ids())) < cfg.num_clients:
        if time.monotonic() > deadline:
            raise SetupError(f"only {len(node_ids)} of {cfg.num_clients} clients connected")
        time.sleep(1.0)
    query = RecordDict({CONFIG: ConfigRecord({"num-labels": num_labels})})
    messages = [Message(query, node, MessageType.QUERY) for node in node_ids]
    found: dict[int, tuple[int, Description]] = {}
    claimed: Counter[int] = Counter()
    for reply in exchange(grid, messages, DISCOVERY_TIMEOUT_S, progress, (0, "discovery")):
        node = reply.metadata.src_node_id
        try:
            if reply.has_error():
                raise ProtocolError(client_error(reply))
            metrics = reply.content.metric_records.get(METRICS)
            if metrics is None:
                raise ProtocolError(f"reply lacks '{METRICS}'")
            description = Description.parse(
                dict(metrics), num_partitions=cfg.num_clients, max_examples=cfg.max_client_examples
            )
        except ProtocolError as reason:
            log(ERROR, "discovery: node %d left out: %s", node, reason)
            continue
        claimed[description.partition_id] += 1
        found[description.partition_id] = (node, description)
    for partition, count in claimed.items():
        if count > 1:
            log(ERROR, "discovery: %d nodes claim partition %d; all of them are left out", count, partition)
            del found[partition]
    return found


def plan_clients(
    cfg: ExperimentConfig, data: FederationData, found: dict[int, tuple[int, Description]]
) -> dict[int, ClientPlan]:
    """Every client's DP-SGD plan, from the sizes the clients report.

    A client that trains on its partition of the config's dataset must report the size the server derives from
    the config (and the held-out slice it derives): another size means it sees other data than planned, and it
    is left out. A data owner's own file is known only to its owner, so its reported size is what the noise is
    calibrated for (the server's ledger then checks every epsilon it reports).
    """
    plans = {}
    for partition, (_, description) in sorted(found.items()):
        if not description.own_data:
            local_eval = data.local_eval[partition]
            planned = (len(data.partitions[partition]), len(local_eval) if local_eval is not None else 0)
            if (description.num_examples, description.num_eval_examples) != planned:
                log(ERROR, "discovery: partition %d reports sizes %s, planned %s; left out", partition,
                    (description.num_examples, description.num_eval_examples), planned)  # fmt: skip
                continue
        plans[partition] = client_plan(cfg, partition, description.num_examples)
    return plans


def majority_accuracy(labels: Sequence[int]) -> float:
    """Accuracy of always predicting the most common label: the bar any trained model must clear."""
    return Counter(labels).most_common(1)[0][1] / len(labels)


@dataclass(frozen=True)
class Score:
    """The held-out set's verdict on one round's adapter, and on how many of its examples."""

    accuracy: float
    loss: float
    examples: int
    sampled: bool


@dataclass
class RoundRecorder:
    """Turns what a round returned into a metrics row and the console line, and makes the round durable."""

    cfg: ExperimentConfig
    results: RunRecorder
    method: FederatedLoraMethod
    ledger: ServerPrivacyLedger | None
    client_level: ClientLevelLedger | None
    state: ServerState
    last_time: float = field(default_factory=time.monotonic)

    def record(
        self, server_round: int, arrays: ArrayRecord, score: Score | None, trained: RoundRecord | None
    ) -> dict[str, Any]:
        """Write the round; ``score`` is None for a round the held-out set was not scored in (``eval_every``)."""
        accuracy, loss = (score.accuracy, score.loss) if score is not None else (None, None)
        epsilon = self.state.epsilon
        if self.ledger is not None:
            # The server's ledger is the source of truth: it counts every client that was instructed to train.
            epsilon.update({p: self.ledger.epsilon(p) for p in self.ledger.rounds})
        elif trained is not None:
            epsilon.update({p: entry["epsilon"] for p, entry in trained.privacy.items()})
        now = time.monotonic()
        row = {
            "round": server_round,
            "method": self.cfg.method,
            "accuracy": accuracy,
            "loss": loss,
            "eval_examples": score.examples if score is not None else 0,
            "eval_sampled": score is not None and score.sampled,
            "local_accuracy": trained.local_accuracy if trained else None,
            "local_loss": trained.local_loss if trained else None,
            "epsilon_max": max(epsilon.values(), default=0.0),
            "epsilon_mean": sum(epsilon.values()) / self.cfg.num_clients,
            "client_epsilon": self.client_level.epsilon() if self.client_level is not None else None,
            "num_trained": len(trained.clients) if trained else 0,
            "clients": trained.clients if trained else [],
            "train_loss": trained.train_loss if trained else None,
            "bytes_up": trained.bytes_up if trained else 0,
            "bytes_down": trained.bytes_down if trained else 0,
            "seconds": now - self.last_time,
            "privacy": {str(p): entry for p, entry in sorted(trained.privacy.items())} if trained else {},
            "epsilon": {str(p): eps for p, eps in sorted(epsilon.items())},
            "rejected": {str(p): reason for p, reason in sorted(trained.rejected.items())} if trained else {},
            "clipped": {str(p): scale for p, scale in sorted(trained.clipped.items())} if trained else {},
            "dropped": trained.dropped if trained else None,
        }
        self.state.wall_seconds += now - self.last_time
        self.last_time = now
        self.results.record_round(row)
        log(INFO, "fedsvd: %s", progress_line(row))

        tensors = arrays.to_torch_state_dict()
        self.state.completed_round = server_round
        self.state.arrays = tensors
        if score is not None:
            self.state.latest = {
                "round": server_round,
                "accuracy": accuracy,
                "loss": loss,
                "local_accuracy": row["local_accuracy"],
                "sampled": score.sampled,
            }
        if trained is not None:
            self.state.short_rounds = self.state.short_rounds + 1 if trained.dropped else 0
        self.results.save_adapter(tensors, adapter_metadata(self.cfg, self.method))
        if self.ledger is not None:
            self.state.privacy_rounds = {p: list(rounds) for p, rounds in self.ledger.rounds.items()}
        if self.client_level is not None:
            self.state.client_level_rounds = list(self.client_level.rounds)
        if self.ledger is not None or self.client_level is not None:
            report = self.ledger.report() if self.ledger is not None else {}
            if self.client_level is not None:
                report["client_level"] = self.client_level.report()
            self.results.write_privacy(report)
        self.state.save(self.results.out_dir)  # last: a checkpoint never runs ahead of the other files
        return row


def adapter_metadata(cfg: ExperimentConfig, method: FederatedLoraMethod) -> dict[str, str]:
    return {
        "method": cfg.method,
        "model": cfg.model,
        "lora_rank": str(cfg.lora_rank),
        "lora_alpha": str(cfg.lora_alpha),
        "lora_targets": cfg.lora_targets,
        # FLoRA / FedEx-LoRA: the merged base weights of the adapted modules are part of the result.
        "includes_base_weights": str(method.merges_into_base).lower(),
    }


@dataclass
class Federation:
    """A federation ready to run its next round: built by ``set_up``."""

    cfg: ExperimentConfig
    grid: Grid
    data: FederationData
    strategy: LoraStrategy
    recorder: RoundRecorder
    model: torch.nn.Module
    held_out: dict[str, torch.Tensor]
    device: torch.device
    arrays: ArrayRecord
    resumed: bool

    def score(self, arrays: ArrayRecord, server_round: int, whole: bool = False) -> Score | None:
        """Score the adapter on the held-out set as ``eval_every`` and ``eval_sample`` say for this round (None:
        not this round); the last round, and ``whole``, on every held-out example."""
        cfg = self.cfg
        last = server_round == cfg.rounds or whole
        if not last and server_round % cfg.eval_every != 0:
            return None
        examples = len(self.held_out["labels"])
        rows = None
        if not last and 0 < cfg.eval_sample < examples:
            # The same examples every round (seeded), so that the sampled rounds compare with each other.
            order = np.random.default_rng([cfg.seed, examples]).permutation(examples)
            rows = torch.from_numpy(order[: cfg.eval_sample])
        if self.strategy.progress is not None:
            self.strategy.progress(server_round, "scoring the held-out set", 0, 0)
        set_arrays(self.model, arrays.to_torch_state_dict(), cfg.train_head)
        tokens = self.held_out if rows is None else {key: value[rows] for key, value in self.held_out.items()}
        accuracy, loss = evaluate(self.model, tokens, self.device)
        return Score(accuracy, loss, len(tokens["labels"]), rows is not None)

    def run(self) -> None:
        cfg, state = self.cfg, self.recorder.state
        if not self.resumed:
            self.recorder.record(0, self.arrays, self.score(self.arrays, 0), None)
        stop: dict[str, str] = {}
        for server_round in range(state.completed_round + 1, cfg.rounds + 1):
            try:
                new_arrays, trained = self.strategy.train_round(self.grid, server_round, self.arrays, ROUND_TIMEOUT_S)
            except BudgetExhausted as exhausted:
                stop["stopped_early"] = str(exhausted)
                log(WARNING, "fedsvd: stopping: %s; results up to round %d are kept", exhausted, state.completed_round)
                break
            if new_arrays is not None:
                self.arrays = new_arrays
            score = self.score(self.arrays, server_round)
            if new_arrays is not None and score is not None:
                self.strategy.evaluate_round(self.grid, server_round, self.arrays, ROUND_TIMEOUT_S)
            self.recorder.record(server_round, self.arrays, score, trained)
            dead = sorted(p for p, reason in trained.rejected.items() if any(s in reason for s in DEAD_WORKER_SIGNS))
            if state.short_rounds >= MAX_SHORT_ROUNDS:
                stop["failed"] = (
                    f"{state.short_rounds} rounds in a row had fewer than min_replies = {cfg.min_replies} valid "
                    f"updates (last: round {server_round}, {trained.dropped})"
                )
                log(ERROR, "fedsvd: stopping: %s", stop["failed"])
                break
            if dead and server_round < cfg.rounds:
                # Flower's Ray actor pool never replaces a dead worker: every later message to it would fail.
                # End this attempt at a checkpointed round; the launcher starts the federation again from it.
                write_restart_request(self.recorder.results.out_dir, server_round, dead)
                log(
                    ERROR, "fedsvd: the worker of partitions %s died in round %d; restart requested", dead, server_round
                )
                return
        self.finish(stop)

    def finish(self, stop: dict[str, str]) -> None:
        state = self.recorder.state
        if state.latest.get("round") != state.completed_round or state.latest.get("sampled"):
            # A run that stopped early may end on a round that was not scored, or only on the sample: the final
            # figures are always the final adapter on the whole held-out set.
            final = self.score(self.arrays, state.completed_round, whole=True)
            assert final is not None
            state.latest = {"round": state.completed_round, "accuracy": final.accuracy, "loss": final.loss}
        self.recorder.results.finish(
            {
                "method": self.cfg.method,
                "rounds": state.latest["round"],
                "stopped_early": stop.get("stopped_early"),
                "failed": stop.get("failed"),
                "final_accuracy": state.latest["accuracy"],
                "final_loss": state.latest["loss"],
                "final_local_accuracy": state.latest.get("local_accuracy"),
                "epsilon_max": max(state.epsilon.values(), default=0.0),
                "epsilon_target": self.cfg.epsilon if self.cfg.dp else None,
                "delta": self.cfg.delta if self.cfg.dp else None,
                "client_epsilon": self.recorder.client_level.epsilon() if self.recorder.client_level else None,
                "client_epsilon_target": self.cfg.client_epsilon if self.cfg.client_dp else None,
                "client_delta": self.cfg.client_delta if self.cfg.client_dp else None,
                "majority_accuracy": majority_accuracy(self.data.held_out.labels),
                # What a final accuracy can resolve: its binomial standard error is sqrt(p(1-p)/N).
                "held_out_examples": len(self.data.held_out.labels),
                "wall_seconds": state.wall_seconds,
            }
        )


def set_up(grid: Grid, cfg: ExperimentConfig) -> Federation:
    """Discover the clients, plan their privacy, build the ledger, the strategy and the recorder; with
    ``resume``, restore all of it from the run's checkpoint instead of starting at round 0."""
    out_dir = results_dir(cfg)
    (out_dir / RESTART_FILE).unlink(missing_ok=True)
    stored = ServerState.load(out_dir) if cfg.resume else None
    if stored is not None and (conflict := resume_conflict(stored.config, cfg)):
        raise SetupError(conflict)
    results = RunRecorder(out_dir, cfg, resume_after=stored.completed_round if stored else None)
    log(INFO, "fedsvd: %s on %s, %d clients, results in %s", cfg.method, cfg.dataset, cfg.num_clients, out_dir)

    data = data_for(cfg)
    method = build_method(
        cfg.method,
        svd_every=cfg.svd_every,
        svd_warmup=cfg.svd_warmup,
        scaling=cfg.lora_alpha / cfg.lora_rank,
        seed=cfg.seed,
    )
    device = resolve_device(cfg.device)
    model = build_lora_model(
        cfg.model, data.num_labels, cfg.lora_rank, cfg.lora_alpha, cfg.targets, cfg.seed, cfg.pooling
    ).to(device)
    held_out = tokenize(data.held_out, load_tokenizer(cfg.model), cfg.max_length)

    def progress(server_round: int, stage: str, replied: int, sent: int) -> None:
        write_progress(out_dir, server_round, stage, replied, sent)

    found = discover_clients(grid, cfg, data.num_labels, progress)
    if stored is None:
        plans = plan_clients(cfg, data, found)
    else:
        # The noise is planned once per run: a resumed run keeps it, even when its rounds were raised.
        plans = {p: ClientPlan(p, n, q, sigma, 0) for p, (n, q, sigma) in stored.plans.items() if p in found}
        changed = [p for p, plan in plans.items() if found[p][1].num_examples != plan.num_examples]
        if changed:
            raise SetupError(f"resume: clients {changed} report other data sizes than when the run started")
    if len(plans) < max(cfg.min_replies, 1):
        raise SetupError(
            f"only {len(plans)} usable clients (partitions {sorted(plans)}); min_replies = {cfg.min_replies}"
        )
    ledger = None
    if cfg.dp:
        planned = {p: (plan.noise_multiplier, plan.sample_rate) for p, plan in plans.items()}
        if stored is not None:
            # Every client charged so far stays in the ledger, also one that did not come back this time.
            planned |= {p: (sigma, q) for p, (_, q, sigma) in stored.plans.items()}
        ledger = ServerPrivacyLedger(cfg.accountant, cfg.delta, cfg.local_steps, planned)
        if stored is not None:
            ledger.rounds = {p: list(rounds) for p, rounds in stored.privacy_rounds.items()}
    client_level = None
    if (plan := client_level_plan(cfg, stored.client_level_noise if stored is not None else None)) is not None:
        client_level = ClientLevelLedger(plan, cfg.client_delta, cfg.accountant, cfg.client_epsilon)
        if stored is not None:
            client_level.rounds = list(stored.client_level_rounds)
    strategy = LoraStrategy(
        method=method,
        nodes={p: found[p][0] for p in plans},
        plans=plans,
        num_eval_examples={p: found[p][1].num_eval_examples for p in plans},
        num_labels=data.num_labels,
        clients_per_round=min(cfg.clients_per_round, len(plans)),
        seed=cfg.seed,
        delta=cfg.delta,
        min_replies=cfg.min_replies,
        ledger=ledger,
        # Without a budget check 'every_round' planning cannot overspend; 'expected' planning relies on it.
        target_epsilon=cfg.epsilon if cfg.dp else None,
        poisson_rate=cfg.fraction if cfg.client_sampling == "poisson" else None,
        client_level=client_level,
        local_eval=cfg.local_eval_fraction > 0,
        progress=progress,
    )
    if stored is None:
        arrays = ArrayRecord(get_arrays(model, cfg.train_head, base_weights=method.merges_into_base))
        state = ServerState(
            completed_round=0,
            arrays={},
            plans={p: (plan.num_examples, plan.sample_rate, plan.noise_multiplier) for p, plan in plans.items()},
            privacy_rounds={},
            epsilon={},
            latest={},
            short_rounds=0,
            wall_seconds=0.0,
            config=cfg.to_flat(),
            client_level_noise=client_level.plan.noise_multiplier if client_level is not None else 0.0,
        )
    else:
        arrays = ArrayRecord(stored.arrays)
        state = stored
        state.config = {**stored.config, **{k: v for k, v in cfg.to_flat().items() if k in RESUMABLE_KEYS}}
        log(INFO, "fedsvd: resuming after round %d", stored.completed_round)
    recorder = RoundRecorder(cfg, results, method, ledger, client_level, state)
    return Federation(cfg, grid, data, strategy, recorder, model, held_out, device, arrays, stored is not None)


def yield_engine_polling() -> bool:
    """Put Flower's simulation engine's polling thread at the lowest CPU priority; False where there is none
    (deployment) or threads have no priority of their own (other systems than Linux).

    At 1,000 nodes its polling takes a fifth of a core, taken from the clients' training on a busy machine. At
    the lowest priority it still runs at once on an idle core, as when a round's instructions are pushed and
    nothing trains yet, and yields the core to training otherwise.
    """
    if not sys.platform.startswith("linux"):
        return False
    for thread in threading.enumerate():
        if thread.name.endswith(f"({ENGINE_POLLING_THREAD})") and thread.native_id is not None:
            os.setpriority(os.PRIO_PROCESS, thread.native_id, LOWEST_PRIORITY)
            return True
    return False


@app.main()
def main(grid: Grid, context: Context) -> None:
    retain_freed_memory()
    cfg = ExperimentConfig.from_mapping(context.run_config, source="run config")
    try:
        federation = set_up(grid, cfg)
    except (SetupError, ResultsExist, CheckpointError) as err:
        log(ERROR, "fedsvd: cannot run: %s", err)
        return
    # The engine is polling by now: the clients have been discovered through it.
    if yield_engine_polling():
        log(INFO, "fedsvd: the simulation engine polls its nodes at the lowest CPU priority")
    federation.run()
