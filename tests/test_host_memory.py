import os
import subprocess
import sys

from clsalign_jax import host_memory


def test_wanted_respects_the_opt_out_and_an_existing_tunable():
  base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
  assert not host_memory.wanted({**base, host_memory.OPT_OUT: "0"})
  assert not host_memory.wanted({**base, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})


def test_with_tunable_keeps_other_tunables():
  env = host_memory.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "X": "1"}
  assert host_memory.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def _run(env):
  code = (
    "import os; from clsalign_jax import host_memory; "
    "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True); host_memory.reexec_with_huge_pages()"
  )
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
  return [line.split(" ", 1) for line in out.stdout.splitlines()]


def test_reexec_restarts_once_in_the_same_process_with_the_tunable():
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
  lines = _run(env)
  if host_memory.wanted(env):
    assert [tun for _, tun in lines] == ["None", "glibc.malloc.hugetlb=1"]
    assert lines[0][0] == lines[1][0]  # execve: same pid, so launchers tracking it are not confused
  else:  # not glibc, or transparent huge pages off: runs on unchanged
    assert [tun for _, tun in lines] == ["None"]
  assert [tun for _, tun in _run({**env, host_memory.OPT_OUT: "0"})] == ["None"]
