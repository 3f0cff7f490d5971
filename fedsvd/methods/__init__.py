"""Federated LoRA aggregation methods and their registry (see METHODS.md for the rules)."""

from __future__ import annotations

from typing import Any

from fedsvd.methods.base import ClientUpdate, FederatedLoraMethod
from fedsvd.methods.fedavg import FedAvgLora
from fedsvd.methods.fedex import FedExLora
from fedsvd.methods.fedsa import FedSaLora
from fedsvd.methods.fedsvd import FedSvd, refactorize
from fedsvd.methods.ffa import FfaLora
from fedsvd.methods.flora import FLora
from fedsvd.methods.rolora import RoLora

METHODS: dict[str, type[FederatedLoraMethod]] = {
    cls.name: cls for cls in (FedSvd, FfaLora, FedAvgLora, FedSaLora, RoLora, FLora, FedExLora)
}


def build_method(name: str, **options: Any) -> FederatedLoraMethod:
    """Instantiate a registered method.

    Callers may always pass the full option set of the experiment config: each method receives only the
    options it declares, so e.g. ``svd_every`` is ignored for ``ffa``.

    Parameters
    ----------
    name
        A key of ``METHODS``.
    **options
        Method options; every one must be declared by at least one registered method.

    Returns
    -------
    The configured method.

    Raises
    ------
    ValueError
        For an unknown method, an option that no method takes, or an invalid option value.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    known = {option for cls in METHODS.values() for option in cls.options}
    unknown = sorted(options.keys() - known)
    if unknown:
        raise ValueError(f"unknown method option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cls = METHODS[name]
    return cls(**{option: value for option, value in options.items() if option in cls.options})


__all__ = [
    "METHODS",
    "ClientUpdate",
    "FLora",
    "FedAvgLora",
    "FedExLora",
    "FedSaLora",
    "FedSvd",
    "FederatedLoraMethod",
    "FfaLora",
    "RoLora",
    "build_method",
    "refactorize",
]
