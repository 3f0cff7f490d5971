"""The messages between the server and the clients, parsed and validated in one place.

Every field of every message goes through this module on the receiving side. A value that is missing, of
the wrong type, non-finite, negative, fractional where a count belongs, or outside what was planned raises
``ProtocolError`` with a one-line reason; the server turns that into a logged rejection of the reply, never
into an exception that ends the run, and a client turns it into an error reply. Nothing here knows Flower:
the callers hand over plain mappings (a record's items) and arrays in NumPy's ``.npy`` format.

Reasons name the field, never its raw content beyond a number, so that nothing a client holds travels in
an error message.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

# Keys of the records inside a message.
CONFIG = "config"
METRICS = "metrics"
ARRAYS = "arrays"


class ProtocolError(ValueError):
    """A message that cannot be used; the text says which field and why, in one line."""


def _present(fields: Mapping[str, Any], key: str) -> Any:
    if key not in fields:
        raise ProtocolError(f"'{key}' is missing")
    return fields[key]


def _number(key: str, value: Any) -> float | int:
    # bool is an int to Python, but never a count or a rate on the wire.
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ProtocolError(f"'{key}' must be a number, got {type(value).__name__}")
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        raise ProtocolError(f"'{key}' is not finite")
    return value


def integer(fields: Mapping[str, Any], key: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    """A whole number in ``[minimum, maximum]``; an integral float (3.0) is accepted, 2.5 is not."""
    value = _number(key, _present(fields, key))
    if isinstance(value, float | np.floating) and not float(value).is_integer():
        raise ProtocolError(f"'{key}' must be a whole number, got {float(value):g}")
    count = int(value)
    if count < minimum or (maximum is not None and count > maximum):
        bound = f"[{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ProtocolError(f"'{key}' = {count} is outside {bound}")
    return count


def real(
    fields: Mapping[str, Any], key: str, *, minimum: float = 0.0, maximum: float = math.inf, open_minimum: bool = False
) -> float:
    """A finite number in ``[minimum, maximum]`` (``(minimum, maximum]`` with ``open_minimum``)."""
    value = float(_number(key, _present(fields, key)))
    below = value <= minimum if open_minimum else value < minimum
    if below or value > maximum:
        bound = f"{'(' if open_minimum else '['}{minimum:g}, {maximum:g}]"
        raise ProtocolError(f"'{key}' = {value:g} is outside {bound}")
    return value


def integer_list(fields: Mapping[str, Any], key: str, *, minimum: int = 0) -> list[int]:
    values = _present(fields, key)
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ProtocolError(f"'{key}' must be a list of whole numbers, got {type(values).__name__}")
    return [integer({key: value}, key, minimum=minimum) for value in values]


def string_list(fields: Mapping[str, Any], key: str) -> list[str]:
    values = _present(fields, key)
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ProtocolError(f"'{key}' must be a list of strings, got {type(values).__name__}")
    if not all(isinstance(value, str) for value in values):
        raise ProtocolError(f"'{key}' must hold strings only")
    return list(values)


@dataclass(frozen=True)
class Description:
    """A client's answer to the server's discovery query: who it is and how much data it holds."""

    partition_id: int
    num_examples: int
    num_eval_examples: int  # its own held-out slice (0 without per-client evaluation)
    own_data: bool

    def to_record(self) -> dict[str, int]:
        return {
            "partition-id": self.partition_id,
            "num-examples": self.num_examples,
            "num-eval-examples": self.num_eval_examples,
            "own-data": int(self.own_data),
        }

    @classmethod
    def parse(cls, fields: Mapping[str, Any], *, num_partitions: int, max_examples: int) -> Description:
        """``max_examples`` is the operator's bound on a self-reported size (a size decides a client's weight)."""
        return cls(
            partition_id=integer(fields, "partition-id", maximum=num_partitions - 1),
            num_examples=integer(fields, "num-examples", minimum=1, maximum=max_examples),
            num_eval_examples=integer(fields, "num-eval-examples", maximum=max_examples),
            own_data=bool(integer(fields, "own-data", maximum=1)),
        )


@dataclass(frozen=True)
class TrainInstruction:
    """What the server asks of one client in one round.

    ``noise_multiplier`` and ``sample_rate`` are the client's plan, made once by the server for the whole run
    (a resumed run keeps it even when its rounds are raised). ``privacy_rounds`` is the server's record of
    every round this client was instructed to train, this one included: the client's accountant continues
    from it whenever its own record is shorter (a restarted client, a lost reply), so no spend is forgotten.
    """

    server_round: int
    train_keys: tuple[str, ...]
    num_labels: int
    noise_multiplier: float
    sample_rate: float
    privacy_rounds: tuple[int, ...]

    def to_record(self) -> dict[str, Any]:
        return {
            "server-round": self.server_round,
            "train-keys": list(self.train_keys),
            "num-labels": self.num_labels,
            "noise-multiplier": self.noise_multiplier,
            "sample-rate": self.sample_rate,
            "privacy-rounds": list(self.privacy_rounds),
        }

    @classmethod
    def parse(cls, fields: Mapping[str, Any]) -> TrainInstruction:
        server_round = integer(fields, "server-round", minimum=1)
        rounds = integer_list(fields, "privacy-rounds", minimum=1)
        if rounds != sorted(set(rounds)) or (rounds and rounds[-1] != server_round):
            raise ProtocolError("'privacy-rounds' must be increasing and end with this round")
        return cls(
            server_round=server_round,
            train_keys=tuple(string_list(fields, "train-keys")),
            num_labels=integer(fields, "num-labels", minimum=2),
            noise_multiplier=real(fields, "noise-multiplier"),
            sample_rate=real(fields, "sample-rate", maximum=1.0, open_minimum=True),
            privacy_rounds=tuple(rounds),
        )


@dataclass(frozen=True)
class TrainReply:
    """A client's report after local training (its arrays travel next to it)."""

    partition_id: int
    num_examples: int
    epsilon: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    # Mean loss over the non-empty Poisson batches; None when every batch of the round was empty.
    train_loss: float | None

    def to_record(self) -> dict[str, int | float]:
        record = {k.replace("_", "-"): v for k, v in asdict(self).items() if k != "train_loss"}
        if self.train_loss is not None:
            record["train-loss"] = self.train_loss
        return record

    @classmethod
    def parse(cls, fields: Mapping[str, Any]) -> TrainReply:
        return cls(
            partition_id=integer(fields, "partition-id"),
            num_examples=integer(fields, "num-examples", minimum=1),
            epsilon=real(fields, "epsilon"),
            noise_multiplier=real(fields, "noise-multiplier"),
            sample_rate=real(fields, "sample-rate", maximum=1.0, open_minimum=True),
            steps=integer(fields, "steps"),
            train_loss=real(fields, "train-loss") if "train-loss" in fields else None,
        )


@dataclass(frozen=True)
class EvaluationReply:
    """A client's score of the global adapter on its own held-out slice."""

    accuracy: float
    loss: float
    num_examples: int

    def to_record(self) -> dict[str, int | float]:
        return {"accuracy": self.accuracy, "loss": self.loss, "num-examples": self.num_examples}

    @classmethod
    def parse(cls, fields: Mapping[str, Any], *, planned_examples: int) -> EvaluationReply:
        """``planned_examples`` is the size of the slice the client described: a reply claiming another
        count would weigh its score by a number it made up."""
        reply = cls(
            accuracy=real(fields, "accuracy", maximum=1.0),
            loss=real(fields, "loss"),
            num_examples=integer(fields, "num-examples", minimum=1),
        )
        if reply.num_examples != planned_examples:
            raise ProtocolError(f"'num-examples' = {reply.num_examples} differs from the {planned_examples} planned")
        return reply


def parse_arrays(arrays: Mapping[str, bytes], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Read uploaded arrays (``.npy`` bytes, as Flower's ArrayRecord carries them) and check them against the keys
    and shapes the server expects: float32, C order, right shape, right length.

    The tensors view the bytes without copying them (a round of 30 clients moves gigabytes) and must not be
    written to. Whether their values are finite is left to the pass that measures each change
    (``fedsvd.methods.base.change_norm``): a NaN or an infinity makes that norm non-finite, so the values are
    read once, not twice.
    """
    keys = set(arrays)
    if keys != set(shapes):
        missing, unexpected = sorted(set(shapes) - keys), sorted(keys - set(shapes))
        raise ProtocolError(
            f"uploaded keys differ from the trained ones: missing {missing[:2]}, unexpected {unexpected[:2]}"
        )
    with warnings.catch_warnings():
        # torch warns that bytes are not writable; these tensors are read-only by contract (see above).
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return {key: _float32_tensor(key, data, shapes[key]) for key, data in arrays.items()}


def float32_npy(tensor: torch.Tensor) -> bytes:
    """A float32 tensor as the exact bytes ``np.save`` writes for it (its header, then the values), in one copy."""
    if tensor.dtype != torch.float32:
        raise ValueError(f"expected a float32 tensor, got {tensor.dtype}")
    # join reads the values straight from the tensor's memory: header + tobytes() would copy them twice.
    return b"".join((_float32_header(tuple(tensor.shape)), memoryview(tensor.detach().cpu().contiguous().numpy())))


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@functools.lru_cache(maxsize=1024)
def _float32_header(shape: tuple[int, ...]) -> bytes:
    """The exact .npy header ``np.save`` writes for a C-ordered float32 array of this shape."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return stream.getvalue()


def _float32_tensor(key: str, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    expected = _float32_header(shape)
    # Almost every upload carries exactly the header np.save writes; only another one is parsed (slowly).
    offset = len(expected) if data[: len(expected)] == expected else _parsed_header_length(key, data, shape)
    size = math.prod(shape)
    if len(data) - offset != 4 * size:
        raise ProtocolError(f"{key}: {len(data) - offset} bytes of data, expected {4 * size}")
    if size == 0:
        return torch.empty(shape, dtype=torch.float32)
    return torch.frombuffer(data, dtype=torch.float32, offset=offset, count=size).reshape(shape)


def _parsed_header_length(key: str, data: bytes, shape: tuple[int, ...]) -> int:
    stream = io.BytesIO(data)
    try:
        read_header = _NPY_HEADER_READERS.get(np.lib.format.read_magic(stream))
        if read_header is None:
            raise ValueError("unsupported .npy version")
        stored_shape, fortran_order, dtype = read_header(stream)
    except ValueError:
        raise ProtocolError(f"{key}: not a readable .npy array") from None
    if dtype != np.dtype("<f4"):
        raise ProtocolError(f"{key}: dtype {dtype}, expected float32")
    if tuple(stored_shape) != shape:
        raise ProtocolError(f"{key}: shape {tuple(stored_shape)}, expected {shape}")
    if fortran_order and len(shape) > 1:
        raise ProtocolError(f"{key}: Fortran order, expected C order")
    return stream.tell()
