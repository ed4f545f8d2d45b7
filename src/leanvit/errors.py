"""Errors that leanvit raises for bad input. The CLI prints them as one line and exits with status 2."""
from __future__ import annotations


class LeanvitError(Exception):
    """Base class: a problem with what the user asked for, reported without a traceback by the CLI."""


class DataError(LeanvitError, FileNotFoundError):
    """Missing, empty or corrupt dataset, or an unknown data spec."""


class CheckpointError(LeanvitError):
    """Corrupt, truncated or mismatched checkpoint."""


class ConfigError(LeanvitError, ValueError):
    """Unknown model or method, impossible ratio or schedule, wrong option."""


class UnsupportedModelError(LeanvitError, TypeError):
    """A model whose structure a patch does not understand."""


class TrainingError(LeanvitError, RuntimeError):
    """Training went wrong in a way the user must act on (e.g. NaN loss)."""
