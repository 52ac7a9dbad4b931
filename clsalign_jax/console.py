"""Console-script entry points (pyproject.toml [project.scripts]).

Each runs its command module exactly as `python -m clsalign_jax.<module>` does, so the installed
commands and the module invocations can never differ in flags, exit codes or error reporting.
"""

from __future__ import annotations

import runpy


def _run(module: str) -> None:
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def train() -> None:
  """clsalign-train: train (and, as configured, evaluate) one run; see clsalign_jax.main."""
  _run("clsalign_jax.main")


def generate() -> None:
  """clsalign-generate: strategic decoding from a checkpoint; see clsalign_jax.generate."""
  _run("clsalign_jax.generate")


def evaluate() -> None:
  """clsalign-evaluate: the ASR harness on an evaluation config; see clsalign_jax.evaluate."""
  _run("clsalign_jax.evaluate")


def convert() -> None:
  """clsalign-convert: checkpoint conversion; see clsalign_jax.convert."""
  _run("clsalign_jax.convert")


def serve() -> None:
  """clsalign-serve: the OpenAI-compatible server with the CLS verdict; see clsalign_jax.serve."""
  _run("clsalign_jax.serve")
