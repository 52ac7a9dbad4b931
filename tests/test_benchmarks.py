"""Smoke runs of the benchmark scripts: they run and print their tables (no timing assertions)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = dict(os.environ, JAX_PLATFORMS="cpu")


def _bench(script: str, *args: str, timeout: int = 900, env: dict | None = None) -> str:
  """Run benchmarks/`script` with `args`; its stdout, after checking it exited 0."""
  out = subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_train_benchmark_smoke():
  stdout = _bench("train.py", "--smoke", env=CPU)
  rows = [l for l in stdout.splitlines() if l.startswith("| ")]
  assert rows[0].startswith("| variant |")
  names = [r.split("|")[1].strip() for r in rows[1:]]
  assert names == ["transformers/torch eager (baseline)", "ours, scan, remat=none", "ours, scan, remat=full"]
  # Same weights, same rows: the LM losses agree although the two stacks share no code.
  losses = [float(r.split("|")[-2]) for r in rows[1:]]
  assert max(losses) - min(losses) < 0.05


def test_data_throughput_documents_smoke():
  stdout = _bench("data_throughput.py", "--documents", "--smoke")
  rows = [l.split("|")[1:-1] for l in stdout.splitlines() if l.startswith("| ") and not l.startswith("| path")]
  assert [(r[0].strip(), r[1].strip()) for r in rows] == [
    ("old (encode all, then batch)", "300"),
    ("old (encode all, then batch)", "600"),
    ("new (streaming)", "300"),
    ("new (streaming)", "600"),
    ("floor: texts + batch encoder only", "300"),
    ("floor: texts + batch encoder only", "600"),
  ]
  # The same documents give the same real tokens on either path; the floor encodes the same texts
  # without the [CLS], BOS and EOS a row adds (at least 3 per document).
  tokens = [int(r[2].replace(",", "")) for r in rows]
  assert tokens[0] == tokens[2] > 0 and tokens[1] == tokens[3] > tokens[0]
  assert 0 < tokens[4] <= tokens[2] - 3 * 300 and 0 < tokens[5] <= tokens[3] - 3 * 600


def test_decode_benchmark_smoke():
  stdout = _bench("decode.py", "--smoke", env=CPU)
  # Rows are printed as measured and again as whole tables at the end: read the tables.
  tables = stdout[stdout.index("| batch | decoder |") :]
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
  assert "memory bandwidth" in stdout and "of roofline" in stdout


def test_small_matmul_benchmark_smoke():
  stdout = _bench("small_matmul.py", "--smoke", timeout=300, env=CPU)
  rows = [l.split("|")[1:-1] for l in stdout.splitlines() if l.startswith("| ") and not l.startswith("| rows")]
  assert [(r[0].strip(), r[1].strip()) for r in rows] == [
    ("1", "one M-row product"),
    ("2", "one M-row product"),
    ("2", "2 one-row products"),
    ("8", "one M-row product"),
    ("8", "8 one-row products"),
    ("16", "one M-row product"),
    ("16", "16 one-row products"),
  ]
  assert float(rows[0][4]) == 1.0


def test_cls_views_benchmark_smoke():
  stdout = _bench("cls_views.py", "--smoke", timeout=300, env=CPU)
  rows = [line for line in stdout.splitlines() if line.startswith("| views, exit")]
  assert len(rows) == 2 and "(baseline)" in stdout


def test_decode_mesh_plan():
  """The 7B plan prints one row per model and mesh, with Llama-3-8B's params at 1/8 per chip under
  tensor=8 (the correctness half of the script is what tests/test_decode_loop.py checks on a mesh)."""
  plan = _bench("decode_mesh.py", "--plan", env=CPU)
  rows = [r.split("|")[1:-1] for r in plan.splitlines() if r.startswith("| llama")]
  assert len(rows) == 8
  llama3 = {r[1].strip(): float(r[2].split()[0]) for r in rows if r[0].strip() == "llama3_8b"}
  assert abs(llama3["data=8 x fsdp=1 x tensor=1"] / llama3["data=1 x fsdp=1 x tensor=8"] - 8) < 0.05
