"""What the federation looks like for one config: who holds which data, and each client's privacy plan.

The server, every client and the CLI's pre-flight check all derive the split, the partitions and the
noise multipliers from the config alone (seeded), so they agree without exchanging anything.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from fedsvd.config import ExperimentConfig
from fedsvd.data import HUB_TASKS, TextDataset, held_out_split, load_texts, partition_indices, subset
from fedsvd.privacy.calibration import calibrate_noise_multiplier
from fedsvd.privacy.client_level import ClientLevelPlan, plan_client_level
from fedsvd.privacy.record_level import check_delta, sample_rate_for


@dataclass(frozen=True)
class FederationData:
    """The clients' training partitions, their own held-out slices and the server's held-out set (disjoint).

    ``local_eval[k]`` is None when no per-client evaluation is configured; it never overlaps ``partitions[k]``,
    so a client's evaluation never scores examples it trained on.
    """

    partitions: tuple[TextDataset, ...]
    local_eval: tuple[TextDataset | None, ...]
    held_out: TextDataset

    @property
    def num_labels(self) -> int:
        return self.held_out.num_labels


@dataclass(frozen=True)
class ClientPlan:
    """How one client trains: its data size, Poisson rate and the noise that meets the target epsilon."""

    partition_id: int
    num_examples: int
    sample_rate: float
    noise_multiplier: float
    planned_steps: int


@dataclass(frozen=True)
class Split:
    """The config keys that decide who holds which examples: what the cached split functions are keyed by, so
    that runs differing in anything else (the method, say) share one split."""

    dataset: str
    eval_fraction: float
    num_clients: int
    partition: str
    dirichlet_alpha: float
    min_partition_size: int
    seed: int
    local_eval_fraction: float = 0.0

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> Split:
        return cls(
            cfg.dataset,
            cfg.eval_fraction,
            cfg.num_clients,
            cfg.partition,
            cfg.dirichlet_alpha,
            cfg.min_partition_size,
            cfg.seed,
            cfg.local_eval_fraction,
        )


def _split_federation(train: TextDataset, held_out: TextDataset, split: Split) -> FederationData:
    indices = partition_indices(
        train.labels, split.num_clients, split.partition, split.dirichlet_alpha, split.seed, split.min_partition_size
    )
    parts = [subset(train, part) for part in indices]
    if split.local_eval_fraction == 0:
        return FederationData(tuple(parts), (None,) * split.num_clients, held_out)
    splits = [
        # A stream per client, so one client's slice does not depend on how the others were drawn.
        held_out_split(
            part, split.local_eval_fraction, int(np.random.SeedSequence([split.seed, pid]).generate_state(1)[0])
        )
        for pid, part in enumerate(parts)
    ]
    return FederationData(tuple(part for part, _ in splits), tuple(local for _, local in splits), held_out)


@functools.lru_cache(maxsize=4)
def federation_data(split: Split) -> FederationData:
    """Load, split and partition once per process (the server and each Ray worker call this every round).

    Hub tasks (GLUE, SNLI) keep their published splits: clients share the train split and the server
    evaluates on the validation split, which is what their results are reported on. Other data is split
    into ``eval_fraction`` held out and the rest for the clients.
    """
    if split.dataset in HUB_TASKS:
        train, held_out = load_texts(split.dataset), load_texts(split.dataset, split="eval")
    else:
        train, held_out = held_out_split(load_texts(split.dataset), split.eval_fraction, split.seed)
    return _split_federation(train, held_out, split)


@functools.lru_cache(maxsize=4)
def federation_shape_from_label_counts(split: Split) -> FederationData:
    """The federation of a hub task built from its published train label counts instead of its data.

    Partitions and held-out slices are drawn per class, so their sizes depend only on the class counts and
    the seed, never on the texts or their order: the result has the exact sizes (and label mix) of the real
    federation, with empty texts. It lets ``fedsvd plan`` run before the data is downloaded.
    """
    task = HUB_TASKS[split.dataset]
    labels = tuple(label for label, count in enumerate(task.train_label_counts) for _ in range(count))
    train = TextDataset(("",) * len(labels), labels, task.num_labels, f"{split.dataset} (label counts only)")
    held_out = TextDataset(("",), (0,), task.num_labels, f"{split.dataset} eval (not loaded)")
    return _split_federation(train, held_out, split)


def data_for(cfg: ExperimentConfig) -> FederationData:
    return federation_data(Split.of(cfg))


def planned_steps(cfg: ExperimentConfig) -> int:
    """Local steps the noise is calibrated for.

    'every_round' plans as if the client trains in every round: the target then holds whatever the sampling
    does. 'expected' plans for rounds x fraction participations (less noise), which is only safe because the
    server then stops selecting a client whose next round would take it past its target.
    """
    if cfg.planned_participation == "expected":
        return math.ceil(cfg.rounds * cfg.fraction) * cfg.local_steps
    return cfg.rounds * cfg.local_steps


@functools.lru_cache(maxsize=64)  # clients call this every round; calibration is a numerical search
def client_plan(cfg: ExperimentConfig, partition_id: int, num_examples: int) -> ClientPlan:
    """The client's fixed DP-SGD parameters; raises PrivacyConfigError when delta is too large for it."""
    sample_rate = sample_rate_for(cfg.batch_size, num_examples)
    steps = planned_steps(cfg)
    noise = 0.0
    if cfg.dp:
        check_delta(cfg.delta, num_examples, f"client {partition_id}")
        noise = calibrate_noise_multiplier(cfg.epsilon, cfg.delta, sample_rate, steps, cfg.accountant)
    return ClientPlan(partition_id, num_examples, sample_rate, noise, steps)


def client_level_plan(cfg: ExperimentConfig, noise_multiplier: float | None = None) -> ClientLevelPlan | None:
    """The federation's client-level DP mechanism (None without ``client_dp``): the denominator is the cohort
    under fixed-size sampling and its expectation, fraction x num_clients, under Poisson sampling. The noise
    multiplier is ``noise_multiplier`` (a resumed run keeps the one it started with), else the config's, else
    calibrated for the planned rounds."""
    if not cfg.client_dp:
        return None
    poisson = cfg.client_sampling == "poisson"
    return plan_client_level(
        num_clients=cfg.num_clients,
        sampling=cfg.client_sampling,
        cohort=cfg.fraction * cfg.num_clients if poisson else cfg.clients_per_round,
        clip_norm=cfg.client_clip_norm,
        rounds=cfg.rounds,
        noise_multiplier=(noise := noise_multiplier or cfg.client_noise_multiplier or None),
        target_epsilon=None if noise else cfg.client_epsilon,
        delta=cfg.client_delta,
        accountant=cfg.accountant,
    )


def plan_federation(cfg: ExperimentConfig, from_label_counts: bool = False) -> list[ClientPlan]:
    """Every client's plan, in partition order: the pre-flight check of a run.

    ``from_label_counts`` plans a hub task from its published label counts, without its data (same sizes).
    """
    data = federation_shape_from_label_counts(Split.of(cfg)) if from_label_counts else data_for(cfg)
    return [client_plan(cfg, pid, len(part)) for pid, part in enumerate(data.partitions)]
