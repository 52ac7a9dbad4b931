"""The repository's one formatter (ruff format, configured in pyproject.toml) leaves every file as
committed: CI fails on unformatted code, and the message says which files and how to fix them."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_code_is_formatted():
  out = subprocess.run(
    [sys.executable, "-m", "ruff", "format", "--check", "."], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  # ruff exits 1 with the file list when something would be reformatted, 2 on its own errors.
  assert out.returncode == 0, f"run `ruff format .` in the repository root:\n{out.stdout}{out.stderr}"
  assert "already formatted" in out.stdout  # it looked at files, not at an empty selection
