"""Errors a user can cause. Each carries one message naming the bad value and what is valid.

launch.py catches `FewshotError` and prints only the message (exit code 2), so the
user sees one clear line instead of a traceback.
"""


class FewshotError(Exception):
  """Base class of user-facing errors."""


class ConfigError(FewshotError, ValueError):
  """A config value, preset, method or flag is invalid."""


class DataError(FewshotError, ValueError):
  """A data directory is missing, incomplete or holds a corrupt file."""


class CheckpointError(FewshotError, ValueError):
  """A checkpoint is unreadable or does not match the config."""


class UnreadableCheckpoint(CheckpointError):
  """A checkpoint's files cannot be read (truncated, deleted, half-written by a killed writer)."""


class TrainingDiverged(FewshotError):
  """The loss or the gradients became non-finite."""
