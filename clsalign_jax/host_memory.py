"""Huge pages for the training process's host allocations on Linux/glibc.

Why: XLA CPU takes a training step's temporaries (5.6 GiB for SmolLM2 at 8 x 256) as one buffer
that glibc maps fresh and unmaps after every step, so each step page-faulted all of it again
in 4 KiB pages (1.47 M minor faults, 2-6 s of a ~12 s step; docs/performance.md). glibc's
`glibc.malloc.hugetlb=1` tunable makes malloc ask for transparent huge pages on its maps
(faults per step: 3.4 K). glibc reads tunables only at process start, so the entry point
re-executes itself once with the tunable set. Values and results are unchanged.

Opt out with CLSALIGN_HUGEPAGES=0. Nothing happens off glibc, when the kernel's transparent
huge pages are "never", or when GLIBC_TUNABLES already names the tunable.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "CLSALIGN_HUGEPAGES"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def wanted(environ=os.environ) -> bool:
  """Whether this process should re-execute itself with the tunable set."""
  if environ.get(OPT_OUT, "1") == "0" or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
    return False
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    with open(_THP) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def with_tunable(environ=os.environ) -> dict:
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), f"{TUNABLE}=1"]))
  return env


def reexec_with_huge_pages() -> None:
  """Replace this process (same pid, same command line) by one started with the tunable set;
  returns only when that is not wanted. Call it first thing in an entry point, before anything
  is read, written or imported that the restart would repeat."""
  if wanted():
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_tunable())
