"""The workdir lock (clsalign_jax/lock.py): who holds it, as readers see it, and directories it refuses.
Two processes on one workdir and a dead holder's lock file: tests/test_bad_inputs.py."""

import subprocess
import sys
import textwrap

import pytest

from clsalign_jax import lock
from clsalign_jax.errors import UsageError, WorkdirBusyError

_HOLD = textwrap.dedent("""
    import sys, time
    from clsalign_jax.lock import workdir_lock
    with workdir_lock(sys.argv[1], what="output directory"):
      print("locked", flush=True)
      time.sleep(600)
""")


def test_holder_names_a_live_holder_and_nobody_else(tmp_path):
  assert lock.holder(str(tmp_path)) is None  # no lock file
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    found = lock.holder(str(tmp_path))
    assert found is not None and found.startswith(f"process {holder.pid} on ")
    with pytest.raises(WorkdirBusyError, match=f"output directory {tmp_path} is in use by process {holder.pid}"):
      with lock.workdir_lock(str(tmp_path), what="output directory"):
        pass
    assert lock.holder(str(tmp_path)) is not None  # looking took nothing from the holder
  finally:
    holder.kill()
    holder.wait()
  assert (tmp_path / lock.LOCK_NAME).exists()  # a killed holder leaves its file ...
  assert lock.holder(str(tmp_path)) is None  # ... but no held lock
  with lock.workdir_lock(str(tmp_path)):
    assert lock.holder(str(tmp_path)) is None  # this process's own lock is not "a run in progress"
  assert not (tmp_path / lock.LOCK_NAME).exists()


def test_a_file_is_not_a_workdir(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(UsageError, match=f"workdir {path}: exists and is not a directory"):
    with lock.workdir_lock(str(path)):
      pass
  assert path.read_text() == "x"
