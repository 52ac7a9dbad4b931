"""Training-step benchmark: our jitted step against a transformers/torch step on the same weights.

  .venv/bin/python benchmarks/train.py                 # SmolLM2-135M, fp32, CPU, batch 8 x 256
  .venv/bin/python benchmarks/train.py --smoke         # tiny model, one step (CI: checks it runs)
  .venv/bin/python benchmarks/train.py --variants 0,2,2d   # torch, ours scan, ours scan on default malloc

Every variant runs in its own process so that peak memory (max RSS) and compile time are its own.
Rows: torch eager (the baseline), ours with layers as a Python loop and with `nn.scan`, and ours
with each remat policy. Both sides train the same weights on the same batch with AdamW; ours also
computes the CLS head and its BCE (one extra row of a [D, 1] matmul).

FLOPs per step are counted analytically (6 x params x tokens for the matmuls forward and backward,
the tied head included, plus 12 x L x B x T^2 x N x H for the attention scores and mixing) and set
against an fp32 matmul rate measured in its own process in the same run (the best of jax and torch
on a large square matmul), so the table says how far each step is from the machine's matmul
roofline.

Allocation: XLA CPU takes each step's temporaries (5.6 GiB here) as one allocation that glibc
serves by a fresh mmap from a worker thread and unmaps afterwards, so every step page-faults all of
it in 4 KiB pages (1.47 M minor faults, seconds of kernel time on 2 cores). Workers therefore run
with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (2 MiB transparent huge pages for malloc's mmaps: ~85x
fewer faults), torch included; a variant suffixed `d` (`--variants 2d`) runs on the default malloc.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

VARIANTS = [
  ("torch", {}),
  ("jax", {"scan": False, "remat": "none"}),
  ("jax", {"scan": True, "remat": "none"}),
  ("jax", {"scan": True, "remat": "full"}),
  ("jax", {"scan": True, "remat": "dots"}),
  ("jax", {"scan": True, "remat": "dots_no_batch"}),
  ("jax", {"scan": True, "remat": "save_qkv_proj"}),
  ("jax", {"scan": True, "remat": "save_attn_mlp_out"}),
]
SMOKE_VARIANTS = [VARIANTS[0], VARIANTS[2], VARIANTS[3]]
HUGETLB = "glibc.malloc.hugetlb=1"


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _minflt() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _model(spec):
  from clsalign_jax import artifacts
  from clsalign_jax import model as M

  if spec["smoke"]:
    cfg = M.ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
    import jax

    params = jax.tree.map(np.asarray, M.init_params(cfg, jax.random.key(0)))
    return cfg, params
  loaded = artifacts.load("smollm2", tokenizer="none")
  return loaded.cfg, loaded.params


def _batch(cfg, batch, seq, seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, cfg.vocab_size, (batch, seq)).astype(np.int32)
  tokens[:, 0] = cfg.cls_id
  tokens[:, 1] = cfg.bos_id
  q_end = seq // 2
  loss_mask = np.zeros((batch, seq), np.int32)
  loss_mask[:, q_end:] = 1
  return {
    "tokens": tokens,
    "segment_ids": np.ones((batch, seq), np.int32),
    "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
    "query_span": np.tile(np.array([[2, q_end]], np.int32), (batch, 1)),
    "response_span": np.tile(np.array([[q_end, seq]], np.int32), (batch, 1)),
    "loss_mask": loss_mask,
    "cls_label": (np.arange(batch) % 2).astype(np.int32),
  }


def run_jax(spec) -> dict:
  import jax
  import jax.numpy as jnp
  from clsalign_jax import train
  from clsalign_jax.config import default_config
  from clsalign_jax import model as M

  cfg, params = _model(spec)
  cfg = cfg.replace(scan_layers=spec["scan"], remat_policy=spec["remat"], dtype="float32", param_dtype="float32")
  config = default_config()
  config.optimizer.learning_rate = 1e-5
  config.schedule.name = "constant"
  schedule = train.make_schedule(config, 100)
  tx = train.make_optimizer(config, schedule)
  params = jax.tree.map(jnp.asarray, M.to_layout(params, cfg))
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0))
  )
  batch = jax.tree.map(jnp.asarray, _batch(cfg, spec["batch"], spec["seq"]))
  step = jax.jit(train.make_train_step(config, cfg, tx, schedule), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  flt0, t0 = _minflt(), time.perf_counter()
  for _ in range(spec["steps"]):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / spec["steps"]
  faults = (_minflt() - flt0) / spec["steps"]
  if spec.get("profile"):
    _profile_step(compiled, state, batch)
  return {
    "compile_s": compile_s,
    "step_s": step_s,
    "loss": float(metrics["lm_loss"]),
    "peak_gib": _peak_rss_gib(),
    "minflt": faults,
    "flops": step_flops(cfg, M.count_params(params), spec["batch"], spec["seq"]),
  }


def _op_group(name: str, opcode: str, op_name: str) -> str:
  """A coarse cost group for one XLA CPU thunk, from its HLO opcode and jax op_name."""
  kind = (
    "matmul"
    if name.startswith(("ynn_fusion", "xnn_fusion", "onednn")) or opcode == "dot"
    else "transpose/copy"
    if name.startswith("copy")
    else "scan stacking"
    if "dynamic" in name
    else "elementwise"
  )
  if "btd,vd->btv" in op_name or "btd,dv->btv" in op_name:
    return "LM head matmul"
  if "/layers/" in op_name or "while/body" in op_name:
    return f"layers: {kind}"
  if "Transformer" in op_name:
    return f"embedding/final norm: {kind}"
  if "jvp()" in op_name:
    return "loss (log-softmax, CE)"
  if name.startswith(("wrapped_broadcast", "copy.")):
    return "buffer init/copies outside the layers"
  return "optimizer and the rest"


def _profile_step(compiled, state, batch) -> None:
  """One more step under jax.profiler; prints thunk time per group to stderr (the XLA CPU
  runtime runs thunks mostly one after another here, so the groups add up to about the step)."""
  import collections
  import gzip
  import glob
  import re
  import jax

  ops = {}
  for line in compiled.as_text().splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ (\w+)\(", line)
    if m:
      op_name = re.search(r'op_name="([^"]*)"', line)
      ops[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      jax.block_until_ready(compiled(state, batch))
    events = json.load(gzip.open(glob.glob(f"{d}/**/*perfetto_trace.json.gz", recursive=True)[0]))
  events = events["traceEvents"] if isinstance(events, dict) else events
  groups = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in ops:
      groups[_op_group(e["name"], *ops[e["name"]])] += e.get("dur", 0) / 1e6
  total = sum(groups.values())
  for group, sec in groups.most_common():
    print(f"profile: {sec:8.2f} s {sec / total:6.1%}  {group}", file=sys.stderr, flush=True)


def run_torch(spec) -> dict:
  import torch
  import transformers
  from clsalign_jax.interop import hf

  cfg, params = _model(spec)
  with tempfile.TemporaryDirectory() as d:
    hf.save_hf(d, cfg, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
  b = _batch(cfg, spec["batch"], spec["seq"])
  # transformers has no [CLS] row: it trains on the same sequences without position 0.
  ids = torch.tensor(b["tokens"][:, 1:], dtype=torch.long)
  labels = torch.where(torch.tensor(b["loss_mask"][:, 1:]) > 0, ids, torch.full_like(ids, -100))

  def one_step():
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

  one_step()
  flt0, t0 = _minflt(), time.perf_counter()
  for _ in range(spec["steps"]):
    loss = one_step()
  step_s = (time.perf_counter() - t0) / spec["steps"]
  faults = (_minflt() - flt0) / spec["steps"]
  n_params = sum(p.numel() for p in model.parameters())
  return {
    "compile_s": 0.0,
    "step_s": step_s,
    "loss": loss,
    "peak_gib": _peak_rss_gib(),
    "minflt": faults,
    "flops": step_flops(cfg, n_params, spec["batch"], spec["seq"] - 1),
  }


def run_matmul(spec) -> dict:
  """Best-of-3 fp32 GFLOP/s of one large square matmul, in jax and in torch."""
  import jax
  import jax.numpy as jnp
  import torch

  n = 512 if spec["smoke"] else 4096
  a_NN = np.random.RandomState(0).randn(n, n).astype(np.float32)
  dot = jax.jit(jnp.dot)
  a_j = jnp.asarray(a_NN)
  a_t = torch.from_numpy(a_NN)
  rates = {}
  for name, fn in (("jax", lambda: jax.block_until_ready(dot(a_j, a_j))), ("torch", lambda: torch.mm(a_t, a_t))):
    fn()
    best = float("inf")
    for _ in range(3):
      t0 = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - t0)
    rates[name] = 2 * n**3 / best / 1e9
  return {"jax_gflops": rates["jax"], "torch_gflops": rates["torch"], "n": n}


def step_flops(cfg, n_params: int, batch: int, seq: int) -> float:
  """Matmul FLOPs of one training step: 6 x params x tokens (forward 2, backward 4; the tied
  embedding counted once, as the LM head) plus the attention scores and mixing, 2 matmuls of
  2 x B x T^2 x N x H each per layer forward, x3 with the backward."""
  return 6.0 * n_params * batch * seq + 12.0 * cfg.n_layers * batch * seq**2 * cfg.n_heads * cfg.head_dim


def _worker(spec_json: str) -> None:
  spec = json.loads(spec_json)
  run = {"torch": run_torch, "jax": run_jax, "matmul": run_matmul}[spec["kind"]]
  result = run(spec)
  print("RESULT " + json.dumps(result), flush=True)


def _name(kind, opts, default_malloc=False):
  malloc = ", default malloc" if default_malloc else ""
  if kind == "torch":
    return f"transformers/torch eager (baseline){malloc}"
  return f"ours, {'scan' if opts['scan'] else 'loop'}, remat={opts['remat']}{malloc}"


def _run_worker(spec: dict, default_malloc: bool = False) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  if not default_malloc:
    env["GLIBC_TUNABLES"] = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), HUGETLB) if t)
  proc = subprocess.run(
    [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env
  )
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  sys.stderr.write("".join(l + "\n" for l in proc.stderr.splitlines() if l.startswith("profile: ")))
  if proc.returncode != 0 or not lines:
    sys.stderr.write(proc.stderr[-4000:])
    raise SystemExit(f"worker {spec} failed (exit {proc.returncode})")
  return json.loads(lines[-1][len("RESULT ") :])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true", help="tiny model, 1 step: checks that the benchmark runs")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument(
    "--variants",
    help="comma-separated indices into VARIANTS (0 = torch), run in this "
    "order; suffix d = on the default malloc (no huge pages). Default: all",
  )
  ap.add_argument(
    "--profile",
    action="store_true",
    help="after timing, profile one more step of each jax variant and print its time per op group to stderr",
  )
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    _worker(args.worker)
    return
  if args.smoke:
    args.batch, args.seq, args.steps = 2, 32, 1
  if args.variants:
    picks = [(VARIANTS[int(v.rstrip("d"))], v.endswith("d")) for v in args.variants.split(",")]
  else:
    picks = [(v, False) for v in (SMOKE_VARIANTS if args.smoke else VARIANTS)]
  tokens = args.batch * args.seq
  mm = _run_worker(dict(kind="matmul", smoke=args.smoke))
  roof = max(mm["jax_gflops"], mm["torch_gflops"])
  print(
    f"done: fp32 matmul {mm['n']}^3: jax {mm['jax_gflops']:.1f}, torch {mm['torch_gflops']:.1f} GFLOP/s",
    file=sys.stderr,
    flush=True,
  )
  rows = []
  for (kind, opts), default_malloc in picks:
    spec = dict(
      kind=kind, smoke=args.smoke, batch=args.batch, seq=args.seq, steps=args.steps, profile=args.profile, **opts
    )
    result = _run_worker(spec, default_malloc)
    rows.append((_name(kind, opts, default_malloc), result))
    print(f"done: {rows[-1][0]}: {result}", file=sys.stderr, flush=True)

  base = next((r["step_s"] for n, r in rows if n.startswith("transformers")), rows[0][1]["step_s"])
  print(
    f"\ntraining step, {'tiny smoke model' if args.smoke else 'SmolLM2-135M'}, fp32, "
    f"batch {args.batch} x {args.seq} ({tokens} tokens), mean of {args.steps} steps after one warm-up; "
    f"fp32 matmul roofline {roof:.1f} GFLOP/s ({mm['n']}^3: jax {mm['jax_gflops']:.1f}, "
    f"torch {mm['torch_gflops']:.1f})\n"
  )
  print(
    "| variant | compile s | step s | tokens/s | vs torch | GFLOP/step | GFLOP/s | of roofline "
    "| minor faults/step | peak RSS GiB | final loss |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for name, r in rows:
    rate = r["flops"] / r["step_s"] / 1e9
    print(
      f"| {name} | {r['compile_s']:.1f} | {r['step_s']:.3f} | {tokens / r['step_s']:,.0f} | "
      f"{base / r['step_s']:.2f}x | {r['flops'] / 1e9:,.0f} | {rate:.1f} | {rate / roof:.0%} | "
      f"{r['minflt']:,.0f} | {r['peak_gib']:.2f} | {r['loss']:.4f} |"
    )


if __name__ == "__main__":
  main()
