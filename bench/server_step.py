"""The server's step, as ratios measured side by side in one run.

1. FedSVD's aggregate (average B, then re-factorise every adapter) against FFA-LoRA's (average B only) at the
   LLaMA-7B shape: 128 modules of 4096 x 4096 with r = 16, 3 clients. Target: at most 2x. What depends only on
   the A the server sent is prepared after the instructions go out, as the ServerApp does; its cost is printed
   beside the ratio.
2. At 30 clients, what the strategy spends around the aggregation once the last reply is in (reading and
   checking that reply, bounding update norms, packing the new global adapter) against the aggregation itself.
   Target: at most a quarter. The others were read and checked as they arrived, while the round's other clients
   trained; what that costs per reply is printed beside it.

Both run with freed memory kept for reuse, as the ServerApp runs (fedsvd/heap.py).

Usage: python bench/server_step.py [--modules 128] [--dim 4096] [--rank 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsvd.federation import ClientPlan
from fedsvd.heap import retain_freed_memory
from fedsvd.methods import ClientUpdate, build_method
from fedsvd.privacy.record_level import ServerPrivacyLedger
from fedsvd.protocol import ARRAYS, METRICS, TrainReply
from server.strategy import LoraStrategy

REPEATS = 7
SIGMA, RATE, STEPS, DELTA = 1.0, 0.05, 3, 1e-5


def alternating_medians(
    first: Callable[[], object], second: Callable[[], object], before_first: Callable[[], object] = lambda: None
) -> tuple[float, float]:
    """Median seconds of each, calls alternating so that load on a shared machine hits both alike;
    ``before_first`` runs, untimed, before every call of ``first``."""
    before_first(), first(), second()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(REPEATS):
        for run, bucket in ((first, times[0]), (second, times[1])):
            if run is first:
                before_first()
            started = time.perf_counter()
            run()
            bucket.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def adapter(modules: int, dim: int, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    arrays = {}
    for index in range(modules):
        arrays[f"layers.{index}.lora_A.weight"] = torch.randn(rank, dim, generator=generator) / dim**0.5
        arrays[f"layers.{index}.lora_B.weight"] = torch.randn(dim, rank, generator=generator) * 1e-3
    return arrays


def refactorisation_ratio(modules: int, dim: int, rank: int, clients: int = 3) -> str:
    generator = torch.Generator().manual_seed(0)
    global_arrays = adapter(modules, dim, rank, generator)
    fedsvd, ffa = build_method("fedsvd", svd_every=1, svd_warmup=0), build_method("ffa")
    uplink = sorted(fedsvd.uplink_keys(global_arrays, 1))
    updates = [
        ClientUpdate({key: global_arrays[key] + 1e-3 * torch.randn_like(global_arrays[key]) for key in uplink}, 100)
        for _ in range(clients)
    ]
    preparing: list[float] = []

    def prepare_while_clients_train() -> None:
        started = time.perf_counter()
        fedsvd.prepare(global_arrays, 1)
        preparing.append(time.perf_counter() - started)

    svd_s, mean_s = alternating_medians(
        lambda: fedsvd.aggregate(global_arrays, updates, 1),
        lambda: ffa.aggregate(global_arrays, updates, 1),
        before_first=prepare_while_clients_train,
    )
    ratio = svd_s / mean_s
    return (
        f"FedSVD aggregate / FFA-LoRA aggregate ({modules} modules of {dim}x{dim}, r={rank}, {clients} clients): "
        f"{svd_s * 1e3:.0f} ms / {mean_s * 1e3:.0f} ms = {ratio:.2f}x (target <= 2x) "
        f"{'ok' if ratio <= 2 else 'MISSED'}; preparing A's side as the clients train: "
        f"{statistics.median(preparing) * 1e3:.0f} ms"
    )


def strategy_overhead_ratio(modules: int, dim: int, rank: int, clients: int = 30) -> str:
    # Messages carry the run they belong to; outside a running app, say which one.
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    generator = torch.Generator().manual_seed(1)
    global_arrays = adapter(modules, dim, rank, generator)
    plans = {p: ClientPlan(p, 100 + p, RATE, SIGMA, STEPS) for p in range(clients)}
    ledger = ServerPrivacyLedger("rdp", DELTA, STEPS, {p: (SIGMA, RATE) for p in range(clients)})
    strategy = LoraStrategy(
        method=build_method("fedsvd", svd_every=1, svd_warmup=0),
        nodes={p: 1000 + p for p in range(clients)},
        plans=plans,
        num_eval_examples=dict.fromkeys(range(clients), 10),
        num_labels=2,
        clients_per_round=clients,
        seed=0,
        delta=DELTA,
        min_replies=1,
        ledger=ledger,
        target_epsilon=1e9,
    )
    sent = ArrayRecord(global_arrays)
    messages = list(strategy.configure_train(1, sent, {}, None))  # type: ignore[arg-type]
    replies = []
    for message in messages:
        partition = message.metadata.dst_node_id - 1000
        keys = message.content["config"]["train-keys"]
        uploaded = {key: global_arrays[key] + 1e-3 * torch.randn_like(global_arrays[key]) for key in keys}  # type: ignore[union-attr]
        epsilon = ledger.epsilon(partition)
        report = TrainReply(partition, plans[partition].num_examples, epsilon, SIGMA, RATE, STEPS, 0.5)
        content = RecordDict({ARRAYS: ArrayRecord(uploaded), METRICS: MetricRecord(report.to_record())})
        replies.append(Message(content, reply_to=message))
    updates = [
        ClientUpdate(
            {key: torch.from_numpy(array.numpy().copy()) for key, array in reply.content[ARRAYS].items()},
            plans[partition].num_examples,
        )
        for partition, reply in enumerate(replies)
    ]

    reading: list[float] = []

    def replies_before_the_last_arrive() -> None:
        strategy._round.record.rejected.clear()  # type: ignore[union-attr]
        for reply in replies[:-1]:
            started = time.perf_counter()
            strategy.read_on_arrival(reply)
            reading.append(time.perf_counter() - started)

    def after_the_last_reply() -> None:
        strategy.read_on_arrival(replies[-1])
        assert strategy._aggregate(1, replies) is not None

    total_s, aggregate_s = alternating_medians(
        after_the_last_reply,
        lambda: strategy.method.aggregate(global_arrays, updates, 1),
        before_first=replies_before_the_last_arrive,
    )
    around = (total_s - aggregate_s) / aggregate_s
    per_reply = statistics.median(reading)
    return (
        f"strategy around the aggregation after the last reply / aggregation ({clients} clients, {modules} modules "
        f"of {dim}x{dim}, r={rank}): {(total_s - aggregate_s) * 1e3:.0f} ms / {aggregate_s * 1e3:.0f} ms = "
        f"{around:.2f} (target <= 0.25) {'ok' if around <= 0.25 else 'MISSED'}; reading and checking a reply as "
        f"it arrives: {per_reply * 1e3:.1f} ms ({per_reply * clients * 1e3:.0f} ms for all {clients}, while "
        "the others train)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=128)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    retain_freed_memory()
    print(refactorisation_ratio(args.modules, args.dim, args.rank), flush=True)
    print(strategy_overhead_ratio(args.modules, args.dim, args.rank), flush=True)


if __name__ == "__main__":
    main()
