"""The accountants a run may name, and the ones it may not (with the reason): one list for the config and the
accounting. Nothing here imports Opacus, so that checking a config stays fast."""

from __future__ import annotations

ACCOUNTANTS = ("rdp", "prv")
REFUSED_ACCOUNTANTS = {
    "gdp": "Opacus's GDP accountant is a CLT approximation that under-reports epsilon at small sample rates; "
    "use 'rdp' or 'prv'",
}


class PrivacyConfigError(ValueError):
    """A privacy setting that cannot give the promised guarantee; the message names the key or the client."""


def accountant_refusal(accountant: str) -> str | None:
    """Why ``accountant`` cannot be used (one line naming the key), or None when it can."""
    if accountant in REFUSED_ACCOUNTANTS:
        return f"accountant = {accountant!r} is not allowed: {REFUSED_ACCOUNTANTS[accountant]}"
    if accountant not in ACCOUNTANTS:
        return f"accountant = {accountant!r} is not allowed: must be one of: {', '.join(ACCOUNTANTS)}"
    return None


def check_accountant(accountant: str) -> None:
    """Refuse an accountant this package does not compute with; for ``"gdp"`` say why."""
    if (reason := accountant_refusal(accountant)) is not None:
        raise PrivacyConfigError(reason)
