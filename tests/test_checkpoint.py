import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from clsalign_jax import checkpoint, train
from train_utils import (
  REPO,
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


# --- faults at the Checkpointer level ------------------------------------------------------------


def _weights(step, size):
  return np.random.default_rng(step).standard_normal(size)  # incompressible: orbax compresses arrays


def _save(ckpt, step, size=1000):
  ckpt.save(
    step,
    {"w": _weights(step, size)},
    {"count": np.array(step, np.int32)},
    {"step": np.array(step, np.int32)},
    {"batches": step},
    {"note": step},
  )


def _enospc(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


def _tmp_dirs(directory) -> list[str]:
  return [p.name for p in Path(directory).iterdir() if checkpoint.TMP_SUFFIX in p.name]


@pytest.mark.parametrize("keep", [1, 3])
@pytest.mark.parametrize("where", ["data_write", "digest_write"])
def test_failed_save_leaves_nothing_that_looks_intact(tmp_path, monkeypatch, keep, where):
  """Disk full while writing a step: one line naming the step and the cause, the earlier steps kept
  and intact, no fake newer step (the step is finalised once, only after its write succeeded)."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=keep)
  for step in (1, 2):
    _save(ckpt, step)
  ckpt.wait()
  before = ckpt.all_steps()
  if where == "data_write":  # a handler's write (orbax runs it on its background thread)
    monkeypatch.setattr(checkpoint.DataStateHandler, "save", _enospc)
  else:  # the digest file, the last write before orbax renames the step
    monkeypatch.setattr(checkpoint, "file_digests", _enospc)
  with pytest.raises(checkpoint.CheckpointSaveError) as e:
    _save(ckpt, 3)
    ckpt.wait()
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"{tmp_path / '3'}: saving the checkpoint failed (OSError: [Errno 28] No space left")
  assert f"the earlier steps {before} are intact" in message
  ckpt.close()  # reports nothing twice and finalises nothing
  monkeypatch.undo()
  assert sorted(p.name for p in tmp_path.iterdir()) == [str(s) for s in before]
  reader = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  assert reader.all_steps() == before
  for step in before:
    reader.verify(step)
  reader.close()
  # The next save works and rotation then applies as usual.
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=keep)
  _save(ckpt, 4)
  ckpt.close()
  assert ckpt.all_steps() == (before + [4])[-keep:]


def test_disk_full_on_a_real_small_filesystem(tmp_path):
  """A 4 MiB tmpfs: step 1 (2.4 MB of float64) fits, step 2 does not. Needs mount rights (root)."""
  mount_point = tmp_path / "small"
  mount_point.mkdir()
  if (
    os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)]).returncode
  ):
    pytest.skip("mounting a small tmpfs needs root")
  try:
    directory = mount_point / "checkpoints"
    ckpt = checkpoint.Checkpointer(str(directory), keep=1)
    _save(ckpt, 1, size=300_000)
    ckpt.wait()
    with pytest.raises(
      checkpoint.CheckpointSaveError,
      match=r"/2: saving the checkpoint failed \(OSError: \[Errno 28\] No space left on device: '/",
    ):
      _save(ckpt, 2, size=300_000)
      ckpt.wait()
    ckpt.close()
    assert sorted(p.name for p in directory.iterdir()) == ["1"]
    reader = checkpoint.Checkpointer(str(directory), read_only=True)
    reader.verify(1)
    restored = reader.restore(
      1, {"w": np.zeros(300_000)}, {"count": np.array(0, np.int32)}, {"step": np.array(0, np.int32)}
    )
    reader.close()
    np.testing.assert_array_equal(restored["params"]["w"], _weights(1, 300_000))
  finally:
    subprocess.run(["umount", str(mount_point)], check=True)


def test_digests_are_inside_the_step_before_it_appears(tmp_path, monkeypatch):
  """orbax renames the temporary directory to the step's name last: by then digests.json is there."""
  seen = {}
  rename = os.rename

  def watch(src, dst):
    if os.path.basename(str(dst)) == "1":
      seen["digests"] = sorted(json.loads(Path(src, checkpoint.DIGESTS).read_text())["files"])
    return rename(src, dst)

  monkeypatch.setattr(os, "rename", watch)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  _save(ckpt, 1)
  ckpt.close()
  monkeypatch.undo()
  assert seen, "orbax did not rename a temporary directory to 1"
  listed = seen["digests"]
  on_disk = sorted(
    str(p.relative_to(tmp_path / "1"))
    for p in (tmp_path / "1").rglob("*")
    if p.is_file()
    and p.name != checkpoint.DIGESTS
    and str(p.relative_to(tmp_path / "1")) not in checkpoint.COMMIT_FILES
  )
  assert listed == on_disk
  assert {item for item in checkpoint.ITEMS if any(name.startswith(item + "/") for name in listed)} == set(
    checkpoint.ITEMS
  )


_KILLED_IN_THE_DIGEST_WRITE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from clsalign_jax import checkpoint

    ckpt = checkpoint.Checkpointer(sys.argv[1], keep=1)
    for step in (1, 2):
      ckpt.save(step, {"w": np.arange(9.0)}, {"c": np.arange(2)}, {"step": np.array(step)}, {}, {})
    ckpt.wait()
    write = checkpoint.file_digests
    def die(directory):
      write(directory)
      os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.file_digests = die
    ckpt.save(3, {"w": np.arange(9.0)}, {"c": np.arange(2)}, {"step": np.array(3)}, {}, {})
    ckpt.wait()
""")


def test_kill_during_finalisation_leaves_the_previous_step(tmp_path):
  killed = run(
    [sys.executable, "-c", _KILLED_IN_THE_DIGEST_WRITE, str(tmp_path)], dict(os.environ, JAX_PLATFORMS="cpu")
  )
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", f"3{checkpoint.TMP_SUFFIX}"]
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)  # a writer: removes the temporary directory
  assert ckpt.latest_intact_step() == 2
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2"]


def test_verify_refuses_unlisted_missing_and_undigested_files(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  _save(ckpt, 1)
  ckpt.close()
  step = tmp_path / "1"
  reader = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  reader.verify(1)

  (step / "params" / "stray.bin").write_bytes(b"x")
  with pytest.raises(checkpoint.CorruptCheckpointError, match="params/stray.bin is not listed in its digests.json"):
    reader.verify(1)
  (step / "params" / "stray.bin").unlink()

  digests = json.loads((step / checkpoint.DIGESTS).read_text())
  gone = next(name for name in digests["files"] if name.startswith("meta/"))
  saved = (step / gone).read_bytes()
  (step / gone).unlink()
  with pytest.raises(checkpoint.CorruptCheckpointError, match=f"{gone} is missing"):
    reader.verify(1)
  (step / gone).write_bytes(saved)

  # What the old finalise-twice bug left: a digest file that lists nothing.
  (step / checkpoint.DIGESTS).write_text('{"algorithm": "sha256", "files": {}}')
  with pytest.raises(
    checkpoint.CorruptCheckpointError, match="checkpoint is incomplete: its digests.json lists no file of params"
  ):
    reader.verify(1)

  (step / checkpoint.DIGESTS).unlink()
  with pytest.raises(checkpoint.UnverifiedCheckpointError) as e:
    reader.verify(1)
  assert str(e.value) == (
    f"{step}: no digests.json, so its files cannot be checked (written by an older version, or copied "
    "without it); to restore it anyway, rerun with --config.checkpoint.allow_unverified=true (training, "
    "init_from) or --allow_unverified (convert)"
  )
  assert reader.latest_intact_step() is None
  reader.close()
  lenient = checkpoint.Checkpointer(str(tmp_path), read_only=True, allow_unverified=True)
  lenient.verify(1)
  assert lenient.latest_intact_step() == 1
  lenient.close()


def test_rotation_deletes_nothing_when_the_newest_step_does_not_verify(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
  _save(ckpt, 1)
  ckpt.wait()
  _save(ckpt, 2)
  ckpt.manager.wait_until_finished()  # step 2 is on disk; our finalisation (rotation) has not run
  victim = next(p for p in (tmp_path / "2" / "params").rglob("*") if p.is_file() and p.parent.name == "d")
  victim.write_bytes(victim.read_bytes()[:-1] + bytes([victim.read_bytes()[-1] ^ 1]))
  with pytest.raises(
    checkpoint.CorruptCheckpointError, match="does not verify, so the older steps \\[1\\] were not deleted"
  ):
    ckpt.wait()
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_preemption_watch_turns_sigterm_into_a_flag():
  previous = signal.getsignal(signal.SIGTERM)
  with checkpoint.PreemptionWatch() as watch:
    assert not watch.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watch.reached(2)
  assert signal.getsignal(signal.SIGTERM) is previous


# --- preemption: SIGTERM saves at the next step boundary, resume is exact ------------------------

# The real CLI; SIGTERM arrives while the step-3 checkpoint is being saved (on `TERM_PROCESS` only,
# default every process), and from then on each step sleeps `STEP_SLEEP` seconds (the preemption
# sync of a 2-process run takes a moment to agree on a step).
_SIGTERM_AT_STEP_3 = textwrap.dedent("""
    import os, signal, time
    import jax
    from clsalign_jax import checkpoint, main

    save = checkpoint.Checkpointer.save
    reached = checkpoint.PreemptionWatch.reached

    def save_then_term(self, step, *args, **kwargs):
      save(self, step, *args, **kwargs)
      if step == 3 and str(jax.process_index()) == os.environ.get("TERM_PROCESS", str(jax.process_index())):
        os.kill(os.getpid(), signal.SIGTERM)

    def slow_reached(self, step):
      if step > 3:
        time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
      return reached(self, step)

    checkpoint.Checkpointer.save = save_then_term
    checkpoint.PreemptionWatch.reached = slow_reached
    raise SystemExit(main.main())
""")


def _assert_same_run(a, b, steps):
  ma, mb = read_metrics(a), read_metrics(b)
  assert sorted(mb) == list(steps)
  for step in steps:
    for key in ("loss", "lm_loss", "cls_loss", "grad_norm"):
      assert ma[step][key] == mb[step][key], (step, key, ma[step][key], mb[step][key])
  last = steps[-1]
  for x, y in zip(jax.tree.leaves(saved_params(a, last)), jax.tree.leaves(saved_params(b, last))):
    np.testing.assert_array_equal(x, y)


def test_sigterm_saves_at_the_next_step_and_resume_is_exact(run_a, tmp_path, tmp_path_factory):
  env = subprocess_env(compilation_cache(tmp_path_factory))
  termed = run([sys.executable, "-c", _SIGTERM_AT_STEP_3] + main_command("tiny", tmp_path, *SIX_STEPS)[3:], env)
  assert termed.returncode == 143, termed.stderr[-5000:]
  last = termed.stderr.strip().splitlines()[-1]
  assert last == (
    f"error: preempted (SIGTERM) at step 4: saved checkpoint 4 in {tmp_path / 'checkpoints'}; "
    "rerun the same command to resume"
  )
  assert "Traceback" not in termed.stderr
  assert checkpoint_steps(tmp_path) == [3, 4]
  assert max(read_metrics(tmp_path)) == 4

  resumed = run(main_command("tiny", tmp_path, *SIX_STEPS), env)
  assert resumed.returncode == 0, resumed.stderr[-5000:]
  _assert_same_run(run_a, tmp_path, range(1, 7))


def _two_processes(workdir, env, *overrides, script=None):
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = main_command("tiny", workdir, *overrides, f"--coordinator_address=127.0.0.1:{port}")
    cmd += ["--num_processes=2", f"--process_id={i}"]
    if script:
      cmd = [sys.executable, "-c", script] + cmd[3:]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  errs = [p.communicate(timeout=300)[1] for p in procs]
  return [(p.returncode, err) for p, err in zip(procs, errs)]


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_sigterm_on_one_of_two_processes_saves_one_step_on_both(tmp_path, tmp_path_factory):
  """jax.distributed on localhost: process 1 gets SIGTERM; JAX's preemption sync picks one step at
  which both save, both exit 143, and the resumed run matches an uninterrupted 2-process run."""
  env = subprocess_env(compilation_cache(tmp_path_factory))
  steps = ("--config.train.num_steps=12", "--config.checkpoint.every_steps=3", "--config.eval.every_steps=0")
  termed = _two_processes(
    tmp_path / "b", dict(env, TERM_PROCESS="1", STEP_SLEEP="0.3"), *steps, script=_SIGTERM_AT_STEP_3
  )
  for code, err in termed:
    assert code == 143, err[-5000:]
  lines = [err.strip().splitlines()[-1] for _, err in termed]
  assert lines[0] == lines[1] and lines[0].startswith("error: preempted (SIGTERM) at step "), lines
  saved = int(lines[0].split("at step ")[1].split(":")[0])
  assert 3 < saved < 12
  assert checkpoint_steps(tmp_path / "b")[-1] == saved
  assert sorted(p.name for p in (tmp_path / "b" / "checkpoints" / str(saved) / "data").glob("*.json")) == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
  for code, err in _two_processes(tmp_path / "b", env, *steps):
    assert code == 0, err[-5000:]
  for code, err in _two_processes(tmp_path / "a", env, *steps):
    assert code == 0, err[-5000:]
  _assert_same_run(tmp_path / "a", tmp_path / "b", range(1, 13))


def test_steps_of_older_runs_whose_digests_cover_the_commit_files_still_verify(tmp_path):
  """Earlier versions wrote the digests after orbax's commit, so they also list its commit files:
  such a step verifies, and a changed commit file is still caught."""
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  _save(ckpt, 1)
  ckpt.close()
  step = tmp_path / "1"
  digests = json.loads((step / checkpoint.DIGESTS).read_text())
  for name in checkpoint.COMMIT_FILES:
    if (step / name).exists():
      digests["files"][name] = hashlib.sha256((step / name).read_bytes()).hexdigest()
  assert set(checkpoint.COMMIT_FILES) & set(digests["files"])
  (step / checkpoint.DIGESTS).write_text(json.dumps(digests))
  reader = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  reader.verify(1)
  listed = next(n for n in checkpoint.COMMIT_FILES if n in digests["files"])
  (step / listed).write_bytes((step / listed).read_bytes() + b" ")
  with pytest.raises(checkpoint.CorruptCheckpointError, match=f"{listed} differs"):
    reader.verify(1)
