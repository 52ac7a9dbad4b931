"""Orbax checkpoints of a training run: one step directory holds every item needed to resume.

    <dir>/<step>/params      parameter pytree (the model's layout, sharded arrays)
                 opt_state   optimizer state
                 progress    {"step", "rng"}
                 data        data-iterator state, one JSON file per process
                 meta        JSON: model config and run config, checked on resume
                 digests.json  sha256 of every file above, written once the save is final

Saves are asynchronous (orbax `args` API); a step directory appears under its final name
only once every item is written, so a run killed mid-save resumes from the previous step.
The digests are computed from the files on disk after orbax finalises the step (at the next
save, `wait` or `close`) and checked before a restore: a flipped byte refuses the step, naming
the file. Rotation is ours, not orbax's: older steps are deleted only after the newest one's
digests are written, so the newest intact step is never the one deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from concurrent import futures
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from clsalign_jax import files
from clsalign_jax.errors import CheckpointError

ITEMS = ("params", "opt_state", "progress", "data", "meta")
DIGESTS = "digests.json"


class CorruptCheckpointError(CheckpointError):
  """A step's files differ from their digests or cannot be read; an earlier step may still be
  intact (`checkpoint.fallback_to_intact`)."""


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


def file_digests(step_dir: str) -> dict[str, str]:
  """sha256 of every file under `step_dir` (relative path -> hex), the digest file excepted.
  hashlib releases the GIL on large buffers, so a thread pool reads several files at once."""
  paths = sorted(
    os.path.relpath(os.path.join(root, name), step_dir) for root, _, names in os.walk(step_dir) for name in names
  )
  paths = [p for p in paths if p != DIGESTS]
  with futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    hashes = pool.map(lambda p: _sha256(os.path.join(step_dir, p)), paths)
    return dict(zip(paths, hashes))


class DataStateHandler(ocp.CheckpointHandler):
  """Per-process JSON state of a data iterator (the same file layout grain's handler uses).

  The state is captured when `save` is called, not when the async write runs, so the
  iterator may keep advancing meanwhile.
  """

  def _path(self, directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: DataStateSave):
    self._path(directory).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> Any:
    path = self._path(directory)
    if not path.exists():
      raise FileNotFoundError(
        f"{path}: no data-iterator state for this process (was the checkpoint written with a different process count?)"
      )
    return json.loads(path.read_text())


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  """Keeps the newest `keep` step directories under `directory`, each with its digests."""

  def __init__(self, directory: str, keep: int | None = None, async_save: bool = True, read_only: bool = False):
    if keep is not None and keep < 1:
      raise CheckpointError(f"config.checkpoint.keep={keep}: must be >= 1 (0 would delete the final checkpoint)")
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self._pending: int | None = None  # saved step whose digests are not written yet
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True)
    else:
      options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save
      )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, params, opt_state, progress: dict, data_state: Any, meta: dict) -> None:
    self._finalize()
    self.manager.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        progress=ocp.args.StandardSave(progress),
        data=DataStateSave(data_state),
        meta=ocp.args.JsonSave(meta),
      ),
    )
    self._pending = step

  def _finalize(self) -> None:
    """Once the pending save is on disk: record its digests, then rotate."""
    if self._pending is None:
      return
    self.manager.wait_until_finished()
    step, self._pending = self._pending, None
    if jax.process_index() == 0:
      record = {"algorithm": "sha256", "files": file_digests(self.step_dir(step))}
      files.atomic_write_json(os.path.join(self.step_dir(step), DIGESTS), record)
    if self.keep is not None:
      # `step` was just written and hashed, so it is intact: deleting older ones never leaves none.
      for old in [s for s in self.all_steps() if s < step][: -(self.keep - 1) or None]:
        self.manager.delete(old)

  def verify(self, step: int) -> None:
    """Raises CorruptCheckpointError if a file of `step` differs from its recorded digest. A step
    without digests (an older version wrote it) passes with a warning."""
    step_dir = self.step_dir(step)
    path = os.path.join(step_dir, DIGESTS)
    if not os.path.exists(path):
      logging.warning("%s has no %s (written by an older version); restoring it unverified", step_dir, DIGESTS)
      return
    try:
      with open(path) as f:
        recorded = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CorruptCheckpointError(f"{path}: unreadable digest file ({e})") from None
    found = file_digests(step_dir)
    for name, digest in sorted(recorded.items()):
      if name not in found:
        raise CorruptCheckpointError(f"{step_dir}: checkpoint is corrupted: {name} is missing")
      if found[name] != digest:
        raise CorruptCheckpointError(
          f"{step_dir}: checkpoint is corrupted: {name} differs from the sha256 recorded when it was saved"
        )

  def latest_intact_step(self) -> int | None:
    """The newest step whose files match their digests (None if there is none)."""
    self._finalize()
    for step in reversed(self.all_steps()):
      try:
        self.verify(step)
        return step
      except CorruptCheckpointError:
        continue
    return None

  def move_aside(self, step: int, destination: str) -> str:
    """Move a step directory out of the managed directory (kept, never deleted); returns the new path."""
    self._finalize()
    target = os.path.join(destination, str(step))
    if jax.process_index() == 0:
      os.makedirs(destination, exist_ok=True)
      if os.path.exists(target):
        shutil.rmtree(target)
      os.replace(self.step_dir(step), target)
    self.manager.reload()
    return target

  @contextlib.contextmanager
  def _restoring(self, step: int):
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # orbax and tensorstore raise many types; all mean "unusable"
      raise CorruptCheckpointError(
        f"{self.directory}/{step}: checkpoint exists but cannot be restored ({type(e).__name__}: "
        f"{str(e)[:300]}); refusing to start from scratch. Fix the config to match it, or move this step "
        f"directory away to resume from an earlier one."
      ) from e

  def read_meta(self, step: int) -> dict:
    with self._restoring(step):
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_params, abstract_opt_state, abstract_progress) -> dict:
    """All items of `step`, arrays placed as the abstract trees' shardings say."""
    with self._restoring(step):
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params),
          opt_state=ocp.args.StandardRestore(abstract_opt_state),
          progress=ocp.args.StandardRestore(abstract_progress),
          data=DataStateRestore(),
          meta=ocp.args.JsonRestore(),
        ),
      )
    return {name: restored[name] for name in ITEMS}

  def restore_params(self, step: int, abstract_params) -> Any:
    with self._restoring(step):
      return self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))[
        "params"
      ]

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._finalize()

  def close(self) -> None:
    self._finalize()
    self.manager.close()
