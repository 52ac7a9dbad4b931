"""Several processes, one outcome: process 0 decides and writes, every process computes.

After training, every process takes part in decoding (each holds only its shards of the params
and its rows of every batch), but files are written once, by process 0, and any decision that
depends on what a file holds (is a cell already generated? is a cached value current?) is taken
by process 0 and broadcast, so no process reads a half-written file or takes another branch and
waits forever in a collective. On one process every function here is the identity.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils


def primary() -> bool:
  """True on the process that writes files (process 0)."""
  return jax.process_index() == 0


def agree(flag: bool) -> bool:
  """Process 0's `flag`, on every process."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))


def share(obj):
  """Process 0's JSON-serialisable `obj`, on every process (the others' argument is ignored)."""
  if jax.process_count() == 1:
    return obj
  data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8) if primary() else np.zeros(0, np.uint8)
  n = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
  buf = np.zeros(n, np.uint8)
  buf[: data.size] = data[:n]
  out = multihost_utils.broadcast_one_to_all(buf)
  return json.loads(np.asarray(out, np.uint8).tobytes().decode("utf-8"))


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (a no-op on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
