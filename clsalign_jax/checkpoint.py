"""Orbax checkpoints of a training run: one step directory holds every item needed to resume.

    <dir>/<step>/params      parameter pytree (the model's layout, sharded arrays)
                 opt_state   optimizer state
                 progress    {"step", "rng"}
                 data        data-iterator state, one JSON file per process
                 meta        JSON: model config and run config, checked on resume
                 digests.json  sha256 of every file above

A step is written under a temporary name and renamed to `<step>` by orbax once every process
has written its part. `digests.json` is written into the temporary directory just before that
rename (orbax's post-finalisation callback, on the primary process), so a step that exists under
its final name always carries the digests of all its files: a kill at any moment leaves either
a complete, hashed step or a temporary directory that the next run deletes. The only files not
hashed are the two orbax writes at the rename itself (`COMMIT_FILES`).

A save that fails (disk full, I/O error) is never finalised: its temporary directory is removed
and one `CheckpointSaveError` line names the step and the cause; the earlier steps are untouched.
Rotation is ours, not orbax's: an older step is deleted only after the newest one has been
hashed again and matches its digests, so the newest intact step is never the one deleted.

Before a restore every file is hashed again: a file that differs, a listed file that is missing
and a file the digests do not list all refuse the step, naming the file. A step without
`digests.json` (written by an older version) is refused by name unless `allow_unverified`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import threading
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
# Written by orbax into the step root while it renames the step, after the digests exist: the
# commit marker and the step metadata's commit time. Not hashed, and not "unlisted" either.
COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class _NoOrbaxTracebacks:
  """Orbax logs a failed background write with its traceback (several, one per thread it passes
  through) before `wait` raises it; the failure is reported as one CheckpointSaveError line, so
  its log records keep their message and lose the traceback."""

  def filter(self, record) -> bool:
    if record.exc_info and "/orbax/" in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


logging.get_absl_logger().addFilter(_NoOrbaxTracebacks())


class CorruptCheckpointError(CheckpointError):
  """A step's files differ from their digests or cannot be read; an earlier step may still be
  intact (`checkpoint.fallback_to_intact`)."""


class UnverifiedCheckpointError(CheckpointError):
  """A step has no digests, so its files cannot be checked (`checkpoint.allow_unverified`)."""


class CheckpointSaveError(CheckpointError):
  """Writing a step failed; nothing of it was kept and the earlier steps are as they were."""


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


def _listed(step_dir: str) -> list[str]:
  """Relative paths of the files of a step that its digests cover (all but DIGESTS, COMMIT_FILES
  and our own atomic-write temporaries at the root)."""
  paths = sorted(
    os.path.relpath(os.path.join(root, name), step_dir) for root, _, names in os.walk(step_dir) for name in names
  )
  skip = set(COMMIT_FILES) | {DIGESTS}
  return [p for p in paths if p not in skip and not (p.startswith(f".{DIGESTS}.") and p.endswith(".tmp"))]


def file_digests(step_dir: str) -> dict[str, str]:
  """sha256 of every file under `step_dir` that the digests cover (relative path -> hex).
  hashlib releases the GIL on large buffers, so a thread pool reads several files at once."""
  paths = _listed(step_dir)
  with futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    hashes = pool.map(lambda p: _sha256(os.path.join(step_dir, p)), paths)
    return dict(zip(paths, hashes))


def _cause(e: BaseException) -> str:
  """One line for why a save failed: the innermost OSError when there is one (orbax and
  tensorstore wrap it several times), else the exception's first line."""
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  found = next((x for x in reversed(chain) if isinstance(x, OSError) and x.errno), None)
  if found is None:
    # tensorstore reports a failed write as ValueError("RESOURCE_EXHAUSTED: ... Failed writing:
    # "FILE": ... [os_error_code='28']"): say it as Python says an OSError.
    text = " ".join(str(x) for x in chain)
    code = re.search(r"os_error_code='(\d+)'", text)
    if code:
      path = re.search(r'Failed (?:writing|to write|creating|to open)[^"]*"([^"]+)"', text)
      return f"OSError: [Errno {code.group(1)}] {os.strerror(int(code.group(1)))}" + (
        f": '{path.group(1)}'" if path else ""
      )
    found = chain[0]
  text = str(found).strip().splitlines()
  return f"{type(found).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


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
  """Keeps the newest `keep` step directories under `directory`, each with its digests.

  async_save False waits for each save to be on disk before `save` returns. allow_unverified:
  restore steps without digests (with a warning) instead of refusing them.
  """

  def __init__(
    self,
    directory: str,
    keep: int | None = None,
    async_save: bool = True,
    read_only: bool = False,
    allow_unverified: bool = False,
  ):
    if keep is not None and keep < 1:
      raise CheckpointError(f"config.checkpoint.keep={keep}: must be >= 1 (0 would delete the final checkpoint)")
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self.async_save = async_save
    self.allow_unverified = allow_unverified
    self._pending: int | None = None  # saved step not yet waited for
    self._writing: int | None = None  # the step the digest callback hashes
    self._broken = False  # a save failed: orbax's manager may re-raise on close
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True)
    else:
      # Always orbax's async path: the digest callback exists only there; `async_save` False
      # waits right after each save instead.
      options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_digests),
      )
    try:
      if not read_only and jax.process_index() == 0:
        # Steps a killed or failed save left unfinished (orbax's own clean-up runs only later, in
        # the background).
        for tmp in glob.glob(os.path.join(glob.escape(self.directory), f"*{TMP_SUFFIX}*")):
          shutil.rmtree(tmp)
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise CheckpointError(f"{self.directory}: cannot open the checkpoint directory ({_cause(e)})") from None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _tmp_dirs(self, step: int) -> list[str]:
    return glob.glob(os.path.join(glob.escape(self.directory), f"{step}{TMP_SUFFIX}*"))

  def _write_digests(self) -> None:
    """orbax's post-finalisation callback (primary process, background thread): every process has
    written its part into the temporary step directory, which is renamed once this returns."""
    step = self._writing
    found = self._tmp_dirs(step)
    # A filesystem without atomic rename (GCS) writes straight into the final directory.
    where = found[0] if len(found) == 1 else self.step_dir(step)
    if len(found) > 1 or not os.path.isdir(where):
      raise CheckpointSaveError(f"{self.step_dir(step)}: cannot find the directory orbax is writing ({found})")
    record = {"algorithm": "sha256", "files": file_digests(where)}
    files.atomic_write_json(os.path.join(where, DIGESTS), record)

  def save(self, step: int, params, opt_state, progress: dict, data_state: Any, meta: dict) -> None:
    """Start writing `step` (in the background unless async_save is off); a failure of the
    previous save, or of this one when it is synchronous, raises CheckpointSaveError."""
    self._finalize()
    self._writing = step
    try:
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
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
      self._failed(step, e)
    self._pending = step
    if not self.async_save:
      self._finalize()

  def _failed(self, step: int, e: BaseException) -> None:
    self._broken = True
    if jax.process_index() == 0:
      for tmp in self._tmp_dirs(step):
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
    with contextlib.suppress(Exception):
      self.manager.reload()
    kept = self.all_steps()
    raise CheckpointSaveError(
      f"{self.step_dir(step)}: saving the checkpoint failed ({_cause(e)}); nothing of step {step} was kept"
      + (f", the earlier steps {kept} are intact" if kept else ", and no earlier step exists")
      + f" in {self.directory}"
    ) from e

  def _finalize(self) -> None:
    """Once the pending save is on disk (renamed, digests inside it): rotate."""
    if self._pending is None:
      return
    # Cleared first: a failed save is reported once, never finalised by a later wait or close.
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - the background write's error, whatever its type
      self._failed(step, e)
    self.manager.reload()
    if step not in self.all_steps():
      self._failed(step, CheckpointSaveError(f"step {step} is not in {self.directory} after its save"))
    self._rotate(step)

  def _rotate(self, newest: int) -> None:
    if self.keep is None:
      return
    old = [s for s in self.all_steps() if s < newest][: -(self.keep - 1) or None]
    if not old:
      return
    ok, reason = True, ""
    if jax.process_index() == 0:
      try:
        self.verify(newest)
      except CheckpointError as e:
        ok, reason = False, str(e)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      ok = bool(multihost_utils.broadcast_one_to_all(ok))
    if not ok:
      raise CorruptCheckpointError(
        f"{reason or self.step_dir(newest)}; it was just saved and does not verify, so the older steps {old} "
        f"were not deleted (is the disk failing?)"
      )
    for s in old:
      self.manager.delete(s)

  def verify(self, step: int) -> None:
    """Raises CorruptCheckpointError if a file of `step` differs from its recorded digest, a listed
    file is missing or a file is not listed; UnverifiedCheckpointError if the step has no digests
    (unless `allow_unverified`)."""
    step_dir = self.step_dir(step)
    path = os.path.join(step_dir, DIGESTS)
    if not os.path.exists(path):
      if self.allow_unverified:
        logging.warning("%s has no %s; restoring it unverified (checkpoint.allow_unverified)", step_dir, DIGESTS)
        return
      raise UnverifiedCheckpointError(
        f"{step_dir}: no {DIGESTS}, so its files cannot be checked (written by an older version, or "
        f"copied without it); to restore it anyway, rerun with --config.checkpoint.allow_unverified=true "
        f"(training, init_from) or --allow_unverified (convert)"
      )
    try:
      with open(path) as f:
        recorded = json.load(f)["files"]
      if not isinstance(recorded, dict):
        raise TypeError("'files' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CorruptCheckpointError(f"{path}: unreadable digest file ({e})") from None
    missing_items = [i for i in ITEMS if not any(name.startswith(f"{i}/") for name in recorded)]
    if missing_items:
      raise CorruptCheckpointError(
        f"{step_dir}: checkpoint is incomplete: its {DIGESTS} lists no file of {', '.join(missing_items)}"
      )
    found = file_digests(step_dir)
    for name, digest in sorted(recorded.items()):
      commit_file = os.path.join(step_dir, name)
      if name not in found and name in COMMIT_FILES and os.path.exists(commit_file):
        # Digests written after orbax's commit (before the digests moved into its temporary
        # directory) also cover its commit files: steps of older runs keep verifying.
        found[name] = _sha256(commit_file)
      if name not in found:
        raise CorruptCheckpointError(f"{step_dir}: checkpoint is corrupted: {name} is missing")
      if found[name] != digest:
        raise CorruptCheckpointError(
          f"{step_dir}: checkpoint is corrupted: {name} differs from the sha256 recorded when it was saved"
        )
    extra = sorted(set(found) - set(recorded))
    if extra:
      raise CorruptCheckpointError(
        f"{step_dir}: checkpoint is corrupted: {extra[0]} is not listed in its {DIGESTS}"
        + (f" ({len(extra)} such files)" if len(extra) > 1 else "")
      )

  def latest_intact_step(self) -> int | None:
    """The newest step whose files match their digests (None if there is none)."""
    self._finalize()
    for step in reversed(self.all_steps()):
      try:
        self.verify(step)
        return step
      except CheckpointError:
        continue
    return None

  def move_aside(self, step: int, destination: str) -> str:
    """Move a step directory out of the managed directory (kept, never deleted); returns the new path."""
    self._finalize()
    target = os.path.join(destination, str(step))
    if jax.process_index() == 0:
      try:
        os.makedirs(destination, exist_ok=True)
        if os.path.exists(target):
          shutil.rmtree(target)
        os.replace(self.step_dir(step), target)
      except OSError as e:
        raise CheckpointError(
          f"{self.step_dir(step)}: cannot move this step aside to {target} ({_cause(e)}); move or remove it "
          f"by hand, then rerun"
        ) from None
    self.manager.reload()
    return target

  @contextlib.contextmanager
  def _restoring(self, step: int):
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # orbax and tensorstore raise many types; all mean "unusable"
      if not os.path.isdir(self.step_dir(step)):
        # Deleted under us: the run that owns the directory rotated it away.
        raise CheckpointError(
          f"{self.step_dir(step)}: the step was deleted while being read (the run writing "
          f"{self.directory} is still going and rotated it away); rerun to read its newest step"
        ) from None
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
    self._finalize()

  def close(self) -> None:
    try:
      self._finalize()
    finally:
      if self._broken:
        # The failed save was reported already; orbax may raise its error again here.
        with contextlib.suppress(Exception):
          self.manager.close()
      else:
        self.manager.close()


class PreemptionWatch:
  """Has a preemption notice (SIGTERM) arrived? Every process gets the same answer at the same step.

  Multi-process runs (jax.distributed) use JAX's preemption sync service: the coordination
  service catches SIGTERM on any process and `reached_preemption_sync_point(step)` turns True on
  every process at the same step. A single process without jax.distributed has no such service;
  a SIGTERM handler sets a flag instead (installed only while the watch is open, and only from
  the main thread).
  """

  def __init__(self):
    self.signalled = False
    self._previous = None
    from jax._src import distributed  # noqa: PLC0415 - the one place JAX exposes whether it is initialised

    self._distributed = jax.process_count() > 1 or distributed.global_state.client is not None

  def __enter__(self) -> PreemptionWatch:
    if not self._distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self.signalled = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def reached(self, step: int) -> bool:
    """Call at every step boundary, on every process, with the same step."""
    if self._distributed:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # the preemption service is turned off (jax_enable_preemption_service)
        return False
    return self.signalled
