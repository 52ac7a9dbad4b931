"""The wheel: builds offline from pyproject.toml without setuptools warnings, installs into a fresh
venv (dependencies borrowed from this environment, nothing downloaded) and its console scripts run."""

import os
import pathlib
import shutil
import site
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("clsalign-train", "clsalign-generate", "clsalign-evaluate", "clsalign-convert", "clsalign-serve")


def _run(args, **kw):
  out = subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)
  assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
  return out


def test_wheel_installs_and_its_scripts_run(tmp_path):
  # Build from a copy holding only what the sdist would: the tree's build/ and egg-info stay clean.
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, src / name)
  shutil.copytree(REPO / "clsalign_jax", src / "clsalign_jax", ignore=shutil.ignore_patterns("__pycache__"))
  built = _run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "-v",
      "--no-deps",
      "--no-build-isolation",
      "-w",
      str(tmp_path / "dist"),
      str(src),
    ]
  )
  log = built.stdout + built.stderr
  for warning in ("would be ignored", "SetuptoolsDeprecationWarning", "_Warning"):
    assert warning not in log, log[-3000:]
  (wheel,) = (tmp_path / "dist").glob("clsalign_jax-*.whl")

  # A fresh venv without pip; this environment's site-packages supply the dependencies, added by
  # a .pth line (so its editable install of this repository is not picked up).
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
  vpy = venv / "bin" / "python"
  purelib = _run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
  (pathlib.Path(purelib) / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
  _run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--quiet", "--no-deps", "--no-index", str(wheel)])

  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env["JAX_PLATFORMS"] = "cpu"
  where = _run(
    [str(vpy), "-c", "import clsalign_jax, pathlib; print(pathlib.Path(clsalign_jax.__file__).parent)"],
    cwd=tmp_path,
    env=env,
  ).stdout.strip()
  assert where.startswith(str(venv)), where
  shipped = pathlib.Path(where) / "data" / "shipped" / "advbench" / "harmful_behaviors.csv"
  assert shipped.stat().st_size > 0
  for script in SCRIPTS:
    assert (venv / "bin" / script).exists(), script
  helped = _run([str(venv / "bin" / "clsalign-generate"), "--help"], cwd=tmp_path, env=env)
  assert "--checkpoint" in helped.stdout + helped.stderr

  # One tiny generation from an exported random model with the test tokenizer.
  from clsalign_jax import model as M
  from clsalign_jax.data.tokenizer import Tokenizer
  from clsalign_jax.artifacts import random_params
  from clsalign_jax.interop import hf

  tok = Tokenizer.from_tokenizer_json(REPO / "tests" / "fixtures" / "eval" / "tiny_tokenizer")
  cfg = M.ModelConfig(
    vocab_size=tok.vocab_size,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=64,
    bos_id=tok.bos_id,
    eos_id=tok.eos_id,
    max_seq_len=256,
  )
  params = {k: np.asarray(v) if not isinstance(v, dict) else v for k, v in random_params(cfg, 0).items()}
  hf.save_hf(str(tmp_path / "tiny"), cfg, params, tokenizer=tok)
  gen = _run(
    [
      str(venv / "bin" / "clsalign-generate"),
      f"--checkpoint={tmp_path / 'tiny'}",
      "--prompt=Hello there",
      "--max_new_tokens=4",
    ],
    cwd=tmp_path,
    env=env,
  )
  assert "prompt-time p(malicious)" in gen.stdout and "response:" in gen.stdout
