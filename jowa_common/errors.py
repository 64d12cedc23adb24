"""Typed, user-facing errors.

Every error a user can cause (bad manifest, corrupt replay file, wrong dataset version, bad config)
is a `JowaError`: the CLI prints its message on one line and exits with status 1, without a traceback.
Internal invariants stay as `assert`. Messages name the file and the key/field that is wrong.
"""

from __future__ import annotations


class JowaError(Exception):
    """Base class of all expected, user-facing errors."""


class ManifestError(JowaError):
    """A game manifest is missing, malformed or inconsistent with the others."""


class ReplayFormatError(JowaError):
    """A DQN-Replay file is missing, truncated, corrupt, or has the wrong dtype/shape."""


class DatasetError(JowaError):
    """A built dataset (shards, index, info.json) is missing, corrupt or of an unsupported version."""


class ConfigError(JowaError):
    """A configuration file or override names an unknown key or a value of the wrong type."""


class CheckpointError(JowaError):
    """A checkpoint is missing, corrupt, or does not match the requested configuration."""


class LockedError(JowaError):
    """An output folder is held by another running jowa process."""
