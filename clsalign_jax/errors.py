"""Errors a user can fix, and how a command line reports them.

Anything raised as a `UserError` ends a CLI with one line, `error: <what>, <where>`, and its
`exit_code` (2: the invocation itself is wrong, 1: an input or the run failed); `clsalign_jax.cli`
does the reporting. Messages name the culprit: the config key and value, the file (and line), the
tensor, the checkpoint step directory.
"""

from __future__ import annotations


class UserError(Exception):
  """A problem with what the user gave us, not a bug; the message names the culprit."""

  exit_code = 1


class UsageError(UserError):
  """The invocation is wrong (a flag or a config value); exit code 2."""

  exit_code = 2


class ConfigError(UsageError, ValueError):
  """A config key holds a value outside its range; the message is `config.<key>=<value>: ...`."""


class CheckpointError(UserError, ValueError):
  """A checkpoint exists but cannot be used (corrupted, another model, unreadable); training
  must not silently start over. The message names the step directory or file."""


class WorkdirBusyError(UserError):
  """Another live process holds the workdir's lock."""


class TrainingStopped(UserError):
  """The run stopped itself before saving a broken state (non-finite or diverging loss)."""


class Preempted(UserError):
  """SIGTERM (a preemption notice) arrived; the run saved a checkpoint at the next step boundary
  and stopped. Exit code 143, what a process killed by SIGTERM reports, so schedulers that requeue
  terminated jobs still do."""

  exit_code = 143
