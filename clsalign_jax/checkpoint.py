"""Orbax checkpoints of a training run: one step directory holds every item needed to resume.

    <dir>/<step>/params      parameter pytree (the model's layout, sharded arrays)
                 opt_state   optimizer state
                 progress    {"step", "rng"}
                 data        data-iterator state, one JSON file per process
                 meta        JSON: model config and run config, checked on resume

Saves are asynchronous (orbax `args` API); a step directory appears under its final name
only once every item is written, so a run killed mid-save resumes from the previous step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

ITEMS = ("params", "opt_state", "progress", "data", "meta")


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used; training must not silently start over."""


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
      raise FileNotFoundError(f"{path}: no data-iterator state for this process "
                              f"(was the checkpoint written with a different process count?)")
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
  """Keeps the newest `keep` step directories under `directory`."""

  def __init__(self, directory: str, keep: int | None = None, async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                             enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params, opt_state, progress: dict, data_state: Any, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        progress=ocp.args.StandardSave(progress),
        data=DataStateSave(data_state),
        meta=ocp.args.JsonSave(meta)))

  @contextlib.contextmanager
  def _restoring(self, step: int):
    try:
      yield
    except Exception as e:  # orbax and tensorstore raise many types; all mean "unusable"
      raise CheckpointError(
          f"{self.directory}/{step}: checkpoint exists but cannot be restored ({type(e).__name__}: {e}). "
          f"Refusing to start from scratch. Fix the config to match it, or move this step directory "
          f"away to resume from an earlier one.") from e

  def read_meta(self, step: int) -> dict:
    with self._restoring(step):
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_params, abstract_opt_state, abstract_progress) -> dict:
    """All items of `step`, arrays placed as the abstract trees' shardings say."""
    with self._restoring(step):
      restored = self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params),
          opt_state=ocp.args.StandardRestore(abstract_opt_state),
          progress=ocp.args.StandardRestore(abstract_progress),
          data=DataStateRestore(),
          meta=ocp.args.JsonRestore()))
    return {name: restored[name] for name in ITEMS}

  def restore_params(self, step: int, abstract_params) -> Any:
    with self._restoring(step):
      return self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
