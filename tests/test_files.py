import json
import os

import pytest

from clsalign_jax import files
from clsalign_jax.errors import CheckpointError


def test_atomic_write_replaces_whole_files_only(tmp_path):
  path = tmp_path / "sub" / "cell.json"
  files.atomic_write_json(path, {"a": 1})
  files.atomic_write(path, "second")
  assert path.read_text() == "second"

  class Boom(Exception):
    pass

  class Exploding(str):
    def encode(self, *args):
      raise Boom

  with pytest.raises(Boom):
    files.atomic_write(path, Exploding("third"))
  assert path.read_text() == "second" and [p.name for p in path.parent.iterdir()] == ["cell.json"]


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
  path = tmp_path / "model.safetensors"
  path.write_bytes(b"old")
  with pytest.raises(OSError):
    with files.atomic_path(path) as tmp:
      with open(tmp, "wb") as f:
        f.write(b"half")
      raise OSError("disk full")
  assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
  with files.atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(b"new")
  assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_atomic_write_json_is_utf8_with_a_final_newline(tmp_path):
  path = tmp_path / "facts.json"
  files.atomic_write_json(path, {"query": "Université", "n": 1}, indent=2)
  text = path.read_text(encoding="utf-8")
  assert text.endswith("}\n") and "Université" in text and json.loads(text) == {"query": "Université", "n": 1}


def test_written_files_get_the_default_permissions(tmp_path):
  old = os.umask(0o022)
  try:
    files.atomic_write(tmp_path / "config.json", "{}")
  finally:
    os.umask(old)
  assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644


def test_read_json_names_the_file_and_line(tmp_path):
  good, bad = tmp_path / "good.json", tmp_path / "bad.json"
  good.write_text('{"a": [1, 2]}')
  bad.write_text('{\n  "a": 1,\n}\n')
  assert files.read_json(good) == {"a": [1, 2]}
  with pytest.raises(CheckpointError, match=r"bad.json:3: invalid JSON"):
    files.read_json(bad)
  with pytest.raises(CheckpointError, match=r"missing.json: file not found"):
    files.read_json(tmp_path / "missing.json")
  with pytest.raises(CheckpointError, match=r": unreadable \("):
    files.read_json(tmp_path)  # a directory
