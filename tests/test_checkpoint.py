import shutil
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from clsalign_jax import checkpoint, train
from train_utils import (
  checkpoint_steps,
  compilation_cache,
  load_config,
  main_command,
  read_metrics,
  run,
  saved_params,
  subprocess_env,
)

SIX_STEPS = ("--config.train.num_steps=6", "--config.checkpoint.every_steps=3", "--config.eval.every_steps=3")

# Run B: the real CLI, except that right after the step-3 checkpoint is finalised on disk the
# process SIGKILLs itself (no cleanup, no further writes), like a pre-empted machine.
_KILLED_AFTER_STEP_3 = textwrap.dedent("""
    import os, signal
    from absl import app
    from clsalign_jax import checkpoint, main

    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
      save(self, step, *args, **kwargs)
      if step == 3:
        self.wait()
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.Checkpointer.save = save_then_die
    raise SystemExit(main.main())
""")


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
  """Six uninterrupted steps."""
  workdir = tmp_path_factory.mktemp("run_a")
  result = run(main_command("tiny", workdir, *SIX_STEPS), subprocess_env(compilation_cache(tmp_path_factory)))
  assert result.returncode == 0, result.stderr[-5000:]
  return workdir


def test_resume_after_sigkill_is_exact(run_a, tmp_path, tmp_path_factory):
  env = subprocess_env(compilation_cache(tmp_path_factory))
  killed = run([sys.executable, "-c", _KILLED_AFTER_STEP_3] + main_command("tiny", tmp_path, *SIX_STEPS)[3:], env)
  assert killed.returncode == -9, killed.stderr[-5000:]
  assert checkpoint_steps(tmp_path) == [3]
  assert max(read_metrics(tmp_path)) == 3

  resumed = run(main_command("tiny", tmp_path, *SIX_STEPS), env)
  assert resumed.returncode == 0, resumed.stderr[-5000:]
  assert "resumed from" in resumed.stderr

  a, b = read_metrics(run_a), read_metrics(tmp_path)
  assert sorted(b) == list(range(1, 7))
  for step in range(1, 7):
    for key in ("loss", "lm_loss", "cls_loss", "grad_norm"):
      assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
  params_a, params_b = saved_params(run_a, 6), saved_params(tmp_path, 6)
  for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(x, y)


def test_unloadable_checkpoint_stops_instead_of_starting_over(run_a, tmp_path, tmp_path_factory):
  workdir = tmp_path / "run"
  shutil.copytree(run_a, workdir)
  for f in (workdir / "checkpoints" / "6" / "params").rglob("*"):
    if f.is_file() and f.parent.name == "d":  # the array data files
      f.write_bytes(b"torn")
  result = run(
    main_command("tiny", workdir, "--config.train.num_steps=9"), subprocess_env(compilation_cache(tmp_path_factory))
  )
  assert result.returncode == 1
  # The digests recorded at save catch the torn files before orbax reads them.
  assert f"{workdir / 'checkpoints' / '6'}: checkpoint is corrupted: params/" in result.stderr
  assert "fallback_to_intact=true" in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: ")
  assert checkpoint_steps(workdir) == [3, 6]
  assert max(read_metrics(workdir)) == 6


def test_checkpoint_of_another_model_is_refused(run_a, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(run_a, workdir)
  config = load_config("tiny")
  config.model.d_ff = 256
  with pytest.raises(checkpoint.CheckpointError, match="d_ff: 128 there vs 256"):
    train.train_and_evaluate(config, str(workdir))


def test_data_state_is_captured_at_save_time(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  state = {"batches": 5}
  params = {"w": np.arange(3.0)}
  ckpt.save(5, params, {"count": np.array(1, np.int32)}, {"step": np.array(5, np.int32)}, state, {"note": "x"})
  state["batches"] = 6  # the iterator moves on while the async save runs
  ckpt.wait()
  restored = ckpt.restore(5, params, {"count": np.array(0, np.int32)}, {"step": np.array(0, np.int32)})
  ckpt.close()
  assert restored["data"] == {"batches": 5}
  assert restored["meta"] == {"note": "x"}
  assert (Path(tmp_path) / "5" / "data" / "process_0-of-1.json").exists()
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(3.0))


def test_rotation_keeps_the_newest_and_digests_catch_a_flipped_byte(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  params = {"w": np.arange(1000.0)}
  for step in (1, 2, 3):
    ckpt.save(step, params, {"count": np.array(step, np.int32)}, {"step": np.array(step, np.int32)}, {}, {})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  for step in (2, 3):
    assert (Path(tmp_path) / str(step) / checkpoint.DIGESTS).exists()
    ckpt.verify(step)
  victim = next(p for p in (Path(tmp_path) / "3" / "params").rglob("*") if p.is_file() and p.parent.name == "d")
  data = bytearray(victim.read_bytes())
  data[-1] ^= 1
  victim.write_bytes(bytes(data))
  with pytest.raises(
    checkpoint.CorruptCheckpointError, match=f"3: checkpoint is corrupted: params/.*{victim.name} differs"
  ):
    ckpt.verify(3)
  assert ckpt.latest_intact_step() == 2
  ckpt.close()
  with pytest.raises(checkpoint.CheckpointError, match="keep=0: must be >= 1"):
    checkpoint.Checkpointer(str(tmp_path), keep=0)
