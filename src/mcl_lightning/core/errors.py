"""Errors meant for people: each message says what is wrong and how to fix it.

`train.py` prints a `UserError` as one clear message (no traceback) and exits with status 2.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's configuration, data or inputs (not a bug in mcl_lightning)."""


class ConfigError(UserError, ValueError):
    """An invalid or inconsistent configuration value."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """Dataset files are missing and could not be downloaded."""


class DatasetIntegrityError(UserError, RuntimeError):
    """Dataset files exist but are truncated, corrupted or of the wrong kind."""


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss term became NaN or infinite: training stopped before writing that state anywhere."""


class NoScoreError(UserError, RuntimeError):
    """A search trial without a validation score (it stopped before its first validation): the
    sweeper records it as failed, with this message, and goes on to its other trials."""


def one_line(error: BaseException, limit: int = 160) -> str:
    """``error`` as ``Type: message`` on one line (parsers' messages span several), at most ``limit`` characters."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
