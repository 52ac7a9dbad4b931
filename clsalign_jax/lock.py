"""A workdir belongs to one run at a time: an advisory `flock` on `<workdir>/.lock`.

Training holds it on its workdir, `evaluate` on its output directory (`what` names which in the
refusal). Readers do not take it: `holder` tells them a run is still writing there.

The kernel drops a flock when its holder exits or dies (kill -9 included), so a lock file left
by a dead process is not a held lock: the next run takes it over and logs whose it was. The file
records pid, host and start time, so a refused run can say who holds the workdir. On release the
file is removed, and a workdir this process created and left empty is removed too, so a refused
invocation leaves no trace. Re-entrant within a process (`main` holds it around training and the
after-training stages, `train_and_evaluate` takes it again when called directly).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from typing import Iterator

from absl import logging

from clsalign_jax.errors import UsageError, WorkdirBusyError

LOCK_NAME = ".lock"
_held: dict[str, list] = {}  # realpath of the workdir -> [fd, depth]


def _describe(path: str) -> str:
  try:
    with open(path) as f:
      owner = json.load(f)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["time"]))
    return f"process {owner['pid']} on {owner['host']} (started {started})"
  except (OSError, ValueError, KeyError, TypeError):
    return "another process"


def holder(directory: str) -> str | None:
  """Who holds `directory`'s lock ("process PID on HOST (started ...)"), or None when no live
  process does. Looks without creating anything (a shared lock, dropped at once)."""
  path = os.path.join(directory, LOCK_NAME)
  if os.path.realpath(directory) in _held:
    return None  # this process: it knows what it is doing
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      return _describe(path)
    return None
  finally:
    os.close(fd)  # closing drops the shared lock, if taken
  return None


def _acquire(path: str, what: str = "workdir") -> int:
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        flag = "--workdir" if what == "workdir" else "--config.output_dir"
        raise WorkdirBusyError(
          f"{what} {os.path.dirname(path)} is in use by {_describe(path)}; wait for that "
          f"run to end or use another {flag} (lock: {path})"
        ) from None
      raise
    # The holder we waited on may have removed the file meanwhile; our lock must be on the live one.
    try:
      if os.stat(path).st_ino == os.fstat(fd).st_ino:
        return fd
    except FileNotFoundError:
      pass
    os.close(fd)


@contextlib.contextmanager
def workdir_lock(workdir: str, enabled: bool = True, what: str = "workdir") -> Iterator[None]:
  """Hold `<workdir>/.lock` for the duration; raises WorkdirBusyError if a live process has it.
  `what` names the directory in messages ("workdir", "output directory")."""
  if not enabled:
    yield
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f"{what} {workdir}: exists and is not a directory")
  created = not os.path.exists(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UsageError(f"{what} {workdir}: cannot be created ({e.strerror})") from None
  key = os.path.realpath(workdir)
  if key in _held:
    _held[key][1] += 1
    try:
      yield
    finally:
      _held[key][1] -= 1
    return
  path = os.path.join(key, LOCK_NAME)
  try:
    fd = _acquire(path, what)
  except BaseException:
    if created:
      with contextlib.suppress(OSError):
        os.rmdir(workdir)
    raise
  stale = os.fstat(fd).st_size > 0
  if stale:
    logging.warning("taking over the workdir lock of %s, which is no longer running", _describe(path))
  record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}).encode()
  os.ftruncate(fd, 0)
  os.pwrite(fd, record, 0)
  _held[key] = [fd, 1]
  try:
    yield
  finally:
    del _held[key]
    # Unlink before unlocking: a waiter that opened the old file then sees the inode is gone.
    with contextlib.suppress(OSError):
      os.unlink(path)
    os.close(fd)
    if created:
      with contextlib.suppress(OSError):
        os.rmdir(workdir)  # only succeeds if the refused run left it empty
