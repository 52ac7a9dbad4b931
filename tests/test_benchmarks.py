"""Smoke runs of the benchmark scripts: they run and print their tables (no timing assertions)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_benchmark_smoke():
  out = subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", "train.py"), "--smoke"],
    capture_output=True,
    text=True,
    timeout=900,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [l for l in out.stdout.splitlines() if l.startswith("| ")]
  assert rows[0].startswith("| variant |")
  names = [r.split("|")[1].strip() for r in rows[1:]]
  assert names == ["transformers/torch eager (baseline)", "ours, scan, remat=none", "ours, scan, remat=full"]
  # Same weights, same rows: the LM losses agree although the two stacks share no code.
  losses = [float(r.split("|")[-2]) for r in rows[1:]]
  assert max(losses) - min(losses) < 0.05


def test_data_throughput_documents_smoke():
  out = subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", "data_throughput.py"), "--documents", "--smoke"],
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [l.split("|")[1:-1] for l in out.stdout.splitlines() if l.startswith("| ") and not l.startswith("| path")]
  assert [(r[0].strip(), r[1].strip()) for r in rows] == [
    ("old (encode all, then batch)", "300"),
    ("old (encode all, then batch)", "600"),
    ("new (streaming)", "300"),
    ("new (streaming)", "600"),
  ]
  # The same documents give the same real tokens on either path.
  tokens = [int(r[2].replace(",", "")) for r in rows]
  assert tokens[0] == tokens[2] > 0 and tokens[1] == tokens[3] > tokens[0]


def test_decode_benchmark_smoke():
  out = subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", "decode.py"), "--smoke"],
    capture_output=True,
    text=True,
    timeout=900,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert out.returncode == 0, out.stderr[-3000:]
  # Rows are printed as measured and again as whole tables at the end: read the tables.
  tables = out.stdout[out.stdout.index("| batch | decoder |") :]
  rows = [l for l in tables.splitlines() if l.startswith("| ")]
  decoders = [r.split("|")[2].strip() for r in rows if r.split("|")[2].strip().startswith(("ours", "transformers"))]
  assert decoders[:6] == [
    "transformers generate",
    "ours, plain decoding",
    "ours, each",
    "ours, annealing",
    "ours, periodic(10)",
    "ours, first",
  ]
  assert len(decoders) == 12  # batch 1 and 2
  prefill = [r.split("|")[3].strip() for r in rows if r.split("|")[3].strip() in ("ours", "transformers")]
  assert prefill == ["transformers", "ours"] * 2
  assert "memory bandwidth" in out.stdout and "of roofline" in out.stdout
