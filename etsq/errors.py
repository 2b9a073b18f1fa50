"""Error types: user errors (bad input), transient faults (retry) and permanent faults (record)."""

from __future__ import annotations


class EtsqError(Exception):
    """Base class for every error etsq raises on purpose."""


class UserError(EtsqError):
    """Bad input from the user: unknown dataset, bad option, unreadable file."""


class DatasetError(UserError):
    """A dataset could not be found or one of its rows is malformed."""


class ConfigError(UserError):
    """A run or search configuration is invalid."""


class BrokerUnavailable(UserError):
    """The Celery broker (Redis) cannot be reached."""


class TransientError(EtsqError):
    """A fault that may go away on retry: a server down, a timeout, a lost connection."""


class PermanentError(EtsqError):
    """A fault that retrying cannot fix; the job is marked failed with this reason."""


class ModelError(PermanentError):
    """A model could not be loaded or does not fit its role (e.g. no label tokens)."""
