"""Flower ServerApp: runs one federated LoRA experiment and records every round.

The same app serves simulation (``fedsvd run`` / ``flwr run`` on the Ray backend) and deployment
(SuperLink + SuperNodes): only the launcher differs. The server evaluates on the held-out split of the run
config's ``dataset``. Clients train on their partition of that dataset, or, in deployment, on a data file of
their own (see ``clients.node``); those are planned from the size they report.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedsvd.config import ExperimentConfig
from fedsvd.data import tokenize
from fedsvd.federation import ClientPlan, client_plan, data_for
from fedsvd.methods import build_method
from fedsvd.model import build_lora_model, evaluate, get_arrays, load_tokenizer, resolve_device, set_arrays
from fedsvd.privacy import ServerPrivacyLedger
from fedsvd.results import RunRecorder, progress_line
from server.strategy import BudgetExhausted, LoraStrategy

# How long the server waits for every SuperNode to connect and introduce itself.
DISCOVERY_TIMEOUT_S = 600.0

app = ServerApp()


def results_dir(cfg: ExperimentConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser().resolve()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("results", f"{cfg.method}-{stamp}").resolve()


def discover_clients(
    grid: Grid, num_clients: int, task: ConfigRecord
) -> tuple[dict[int, int], dict[int, int], set[int]]:
    """Ask every node for its partition id and size: node ids are not stable across runs, partitions are.

    Returns the node of each partition, each partition's size and the partitions whose owner trains on a
    data file of its own rather than on its partition of the config's dataset.
    """
    deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
    while len(node_ids := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of {num_clients} clients connected")
        time.sleep(1.0)
    queries = [Message(RecordDict({"config": task}), node, MessageType.QUERY) for node in node_ids]
    nodes: dict[int, int] = {}
    sizes: dict[int, int] = {}
    own_data: set[int] = set()
    for reply in grid.send_and_receive(queries, timeout=DISCOVERY_TIMEOUT_S):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to describe itself: {reply.error.reason}")
        metrics = reply.content.metric_records["metrics"]
        partition = int(metrics["partition-id"])
        if partition in nodes:
            raise RuntimeError(f"two nodes claim partition {partition}")
        nodes[partition] = reply.metadata.src_node_id
        sizes[partition] = int(metrics["num-examples"])
        if metrics.get("own-data"):
            own_data.add(partition)
    if sorted(nodes) != list(range(num_clients)):
        raise RuntimeError(f"expected partitions 0..{num_clients - 1}, got {sorted(nodes)}")
    return nodes, sizes, own_data


def plan_clients(cfg: ExperimentConfig, sizes: dict[int, int], own_data: set[int]) -> dict[int, ClientPlan]:
    """Every client's DP-SGD plan, from the sizes the clients report.

    A client that trains on its partition of the config's dataset must report the size the server derives from
    the config: another size means it sees other data than planned. A data owner's own file is known only to
    its owner, so its reported size is what the noise is calibrated for (the client calibrates from the same
    size, and the server's ledger then checks every epsilon it reports).
    """
    partitions = data_for(cfg).partitions
    mismatched = {p: (n, len(partitions[p])) for p, n in sizes.items() if p not in own_data and n != len(partitions[p])}
    if mismatched:
        raise RuntimeError(f"clients report other partition sizes than planned (got, planned): {mismatched}")
    return {p: client_plan(cfg, p, n) for p, n in sorted(sizes.items())}


def majority_accuracy(labels: Sequence[int]) -> float:
    """Accuracy of always predicting the most common label: the bar any trained model must clear."""
    return Counter(labels).most_common(1)[0][1] / len(labels)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = ExperimentConfig.from_mapping(context.run_config, source="run config")
    out_dir = results_dir(cfg)
    recorder = RunRecorder(out_dir, cfg)
    log(INFO, "fedsvd: %s on %s, %d clients, results in %s", cfg.method, cfg.dataset, cfg.num_clients, out_dir)

    data = data_for(cfg)
    # Sent with every message: a data owner's own file need not contain every class.
    task = ConfigRecord({"num-labels": data.num_labels})
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
    )
    model.to(device)
    held_out = tokenize(data.held_out, load_tokenizer(cfg.model), cfg.max_length)

    nodes, sizes, own_data = discover_clients(grid, cfg.num_clients, task)
    plans = plan_clients(cfg, sizes, own_data)
    ledger = None
    if cfg.dp:
        planned = {p: (plan.noise_multiplier, plan.sample_rate) for p, plan in plans.items()}
        ledger = ServerPrivacyLedger(cfg.accountant, cfg.delta, cfg.local_steps, planned)
    # Without a budget check 'every_round' planning cannot overspend; 'expected' planning relies on it.
    target = cfg.epsilon if cfg.dp else None
    strategy = LoraStrategy(
        method, nodes, sizes, cfg.clients_per_round, cfg.seed, cfg.delta, ledger, target, cfg.local_eval_fraction > 0
    )

    epsilon_so_far: dict[int, float] = {}
    latest: dict = {}  # the last evaluated global adapter and its scores: what is kept if the run stops early
    last_time = [time.monotonic()]
    started = last_time[0]

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_arrays(model, arrays.to_torch_state_dict(), cfg.train_head)
        accuracy, loss = evaluate(model, held_out, device)
        trained = strategy.rounds.get(server_round)
        if ledger is not None:
            # The server's ledger is the source of truth: it also counts clients whose update was rejected.
            epsilon_so_far.update({p: ledger.epsilon(p) for p in ledger.rounds})
        elif trained is not None:
            epsilon_so_far.update({p: entry["epsilon"] for p, entry in trained.privacy.items()})
        now = time.monotonic()
        row = {
            "round": server_round,
            "method": cfg.method,
            "accuracy": accuracy,
            "loss": loss,
            "local_accuracy": trained.local_accuracy if trained else None,
            "local_loss": trained.local_loss if trained else None,
            "epsilon_max": max(epsilon_so_far.values(), default=0.0),
            "epsilon_mean": sum(epsilon_so_far.values()) / cfg.num_clients,
            "num_trained": len(trained.clients) if trained else 0,
            "clients": trained.clients if trained else [],
            "train_loss": trained.train_loss if trained else None,
            "bytes_up": trained.bytes_up if trained else 0,
            "bytes_down": trained.bytes_down if trained else 0,
            "seconds": now - last_time[0],
            "privacy": {str(p): entry for p, entry in sorted(trained.privacy.items())} if trained else {},
            "epsilon": {str(p): eps for p, eps in sorted(epsilon_so_far.items())},
            "rejected": {str(p): reason for p, reason in trained.rejected.items()} if trained else {},
        }
        last_time[0] = now
        latest.update(
            arrays=arrays, round=server_round, accuracy=accuracy, loss=loss, local_accuracy=row["local_accuracy"]
        )
        recorder.record_round(row)
        log(INFO, "fedsvd: %s", progress_line(row))
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    initial = ArrayRecord(get_arrays(model, cfg.train_head, base_weights=method.merges_into_base))
    stopped_early = None
    try:
        strategy.start(
            grid, initial, num_rounds=cfg.rounds, train_config=task, evaluate_config=task, evaluate_fn=evaluate_round
        )
    except BudgetExhausted as stop:
        stopped_early = str(stop)
        log(WARNING, "fedsvd: stopping: %s; results up to round %d are kept", stop, latest["round"])
    recorder.save_adapter(
        latest["arrays"].to_torch_state_dict(),
        {
            "method": cfg.method,
            "model": cfg.model,
            "lora_rank": str(cfg.lora_rank),
            "lora_alpha": str(cfg.lora_alpha),
            "lora_targets": cfg.lora_targets,
            # FLoRA / FedEx-LoRA: the merged base weights of the adapted modules are part of the result.
            "includes_base_weights": str(method.merges_into_base).lower(),
        },
    )
    if ledger is not None:
        recorder.write_privacy(ledger.report())
    recorder.finish(
        {
            "method": cfg.method,
            "rounds": latest["round"],
            "stopped_early": stopped_early,
            "final_accuracy": latest["accuracy"],
            "final_loss": latest["loss"],
            "final_local_accuracy": latest.get("local_accuracy"),
            "epsilon_max": max(epsilon_so_far.values(), default=0.0),
            "epsilon_target": cfg.epsilon if cfg.dp else None,
            "delta": cfg.delta if cfg.dp else None,
            "majority_accuracy": majority_accuracy(data.held_out.labels),
            "wall_seconds": time.monotonic() - started,
        }
    )
