"""Domain errors.

Every error a user can cause derives from :class:`RapidInError`, so the CLI can turn it
into a one-line message and a non-zero exit without a traceback. Messages name the flag
or file that fixes the problem.
"""

from __future__ import annotations


class RapidInError(Exception):
    """Base class of every user-facing error of rapidin-index."""


class DataError(RapidInError, ValueError):
    """A training or query data file is missing, malformed or empty."""


class SettingsError(RapidInError, ValueError):
    """A setting is invalid on its own (K not a power of two, say)."""


class SettingsMismatchError(RapidInError, ValueError):
    """An index was reopened with settings different from the ones it was built with."""

    def __init__(self, differences: dict[str, tuple[object, object]], hint: str = "") -> None:
        self.differences = differences
        rows = "; ".join(
            f"{key}: index has {old!r}, requested {new!r}"
            for key, (old, new) in differences.items()
        )
        message = f"the index was built with other settings ({rows})"
        if hint:
            message += f". {hint}"
        super().__init__(message)


class StoreError(RapidInError, RuntimeError):
    """The on-disk store is missing, truncated or corrupted."""


class ModelError(RapidInError, RuntimeError):
    """The model, tokenizer or adapter cannot be loaded or does not fit the index."""
