"""A workdir belongs to one run at a time: an advisory `flock` on `<workdir>/.lock`.

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

from clsalign_jax.errors import WorkdirBusyError

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


def _acquire(path: str) -> int:
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirBusyError(
          f"workdir {os.path.dirname(path)} is in use by {_describe(path)}; wait for that "
          f"run to end or use another --workdir (lock: {path})"
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
def workdir_lock(workdir: str, enabled: bool = True) -> Iterator[None]:
  """Hold `<workdir>/.lock` for the duration; raises WorkdirBusyError if a live process has it."""
  if not enabled:
    yield
    return
  created = not os.path.exists(workdir)
  os.makedirs(workdir, exist_ok=True)
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
    fd = _acquire(path)
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
