"""Writing a file so that no reader, and no crash, ever sees part of it; reading JSON whose
failures name the file.

Every writer in the package (run facts, configs, reports, HF exports, metrics, checkpoint
digests) goes through here: the data goes to a temporary file in the target's directory, is
flushed to disk, and replaces the target in one `os.replace`; on any failure the temporary file
is removed and the previous file, if any, is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
from collections.abc import Iterator
from typing import Any

from clsalign_jax.errors import CheckpointError


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
  """Yields a temporary path beside `path` for a writer that takes a file name; on success it
  replaces `path`, on an exception it is deleted."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Not tempfile.mkstemp: its files are 0600, and an export or report must get the permissions
  # any new file gets (0666 less the umask) so that others can read it.
  while True:
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
      os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
      break
    except FileExistsError:
      continue
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write(path, data: str | bytes) -> None:
  """`data` (str as UTF-8) as the whole content of `path`."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_write_json(path, obj: Any, indent: int = 1) -> None:
  """`obj` as indented UTF-8 JSON with a final newline."""
  atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_json(path) -> Any:
  """The JSON in `path`; a missing, unreadable or malformed file raises one CheckpointError that
  names it (with the line, for malformed JSON)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: file not found") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
  except OSError as e:
    raise CheckpointError(f"{path}: unreadable ({e.strerror})") from None
