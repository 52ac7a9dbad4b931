"""Helpers shared by the training-room tests: config loading and `python -m clsalign_jax.main` runs.

Training runs go through subprocesses sharing one persistent XLA compilation cache per pytest
session, so each distinct program is compiled once (CPU compiles dominate these tests).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def compilation_cache(tmp_path_factory) -> str:
  return str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")


def subprocess_env(cache_dir: str, devices: int = 1) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir, PYTHONHASHSEED="0")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def main_command(config: str, workdir, *overrides: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "clsalign_jax.main",
    f"--config=configs/{config}.py",
    f"--workdir={workdir}",
    "--config.metrics.progress_bar=false",
    *overrides,
  ]


def run(cmd: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(workdir, split: str = "train") -> dict[int, dict]:
  with open(Path(workdir) / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r for r in records if r["split"] == split}


def saved_params(workdir, step: int):
  """Params of one checkpoint step as host numpy arrays, whatever topology wrote them."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  path = Path(workdir, "checkpoints", str(step), "params").resolve()
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def checkpoint_steps(workdir) -> list[int]:
  root = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
