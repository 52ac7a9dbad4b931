"""Training-step benchmark: our jitted step against a transformers/torch step on the same weights.

  .venv/bin/python benchmarks/train.py                 # SmolLM2-135M, fp32, CPU, batch 8 x 256
  .venv/bin/python benchmarks/train.py --smoke         # tiny model, one step (CI: checks it runs)

Every variant runs in its own process so that peak memory (max RSS) and compile time are its own.
Rows: torch eager (the baseline), ours with layers as a Python loop and with `nn.scan`, and ours
with each remat policy. Both sides train the same weights on the same batch with AdamW; ours also
computes the CLS head and its BCE (one extra row of a [D, 1] matmul).
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


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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
      "tokens": tokens, "segment_ids": np.ones((batch, seq), np.int32),
      "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
      "query_span": np.tile(np.array([[2, q_end]], np.int32), (batch, 1)),
      "response_span": np.tile(np.array([[q_end, seq]], np.int32), (batch, 1)),
      "loss_mask": loss_mask, "cls_label": (np.arange(batch) % 2).astype(np.int32),
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
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           rng=jax.random.key_data(jax.random.key(0)))
  batch = jax.tree.map(jnp.asarray, _batch(cfg, spec["batch"], spec["seq"]))
  step = jax.jit(train.make_train_step(config, cfg, tx, schedule), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(spec["steps"]):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / spec["steps"]
  return {"compile_s": compile_s, "step_s": step_s, "loss": float(metrics["lm_loss"]), "peak_gib": _peak_rss_gib()}


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
  t0 = time.perf_counter()
  for _ in range(spec["steps"]):
    loss = one_step()
  step_s = (time.perf_counter() - t0) / spec["steps"]
  return {"compile_s": 0.0, "step_s": step_s, "loss": loss, "peak_gib": _peak_rss_gib()}


def _worker(spec_json: str) -> None:
  spec = json.loads(spec_json)
  result = run_torch(spec) if spec["kind"] == "torch" else run_jax(spec)
  print("RESULT " + json.dumps(result), flush=True)


def _name(kind, opts):
  if kind == "torch":
    return "transformers/torch eager (baseline)"
  return f"ours, {'scan' if opts['scan'] else 'loop'}, remat={opts['remat']}"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true", help="tiny model, 1 step: checks that the benchmark runs")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    _worker(args.worker)
    return
  if args.smoke:
    args.batch, args.seq, args.steps = 2, 32, 1
  tokens = args.batch * args.seq
  rows = []
  for kind, opts in (SMOKE_VARIANTS if args.smoke else VARIANTS):
    spec = dict(kind=kind, smoke=args.smoke, batch=args.batch, seq=args.seq, steps=args.steps, **opts)
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
      sys.stderr.write(proc.stderr[-4000:])
      raise SystemExit(f"variant {_name(kind, opts)} failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("RESULT "):])
    rows.append((_name(kind, opts), result))
    print(f"done: {_name(kind, opts)}: {result}", file=sys.stderr, flush=True)

  base = rows[0][1]["step_s"]
  print(f"\ntraining step, {'tiny smoke model' if args.smoke else 'SmolLM2-135M'}, fp32, "
        f"batch {args.batch} x {args.seq} ({tokens} tokens), mean of {args.steps} steps after one warm-up\n")
  print("| variant | compile s | step s | tokens/s | vs torch | peak RSS GiB | final loss |")
  print("|---|---|---|---|---|---|---|")
  for name, r in rows:
    print(f"| {name} | {r['compile_s']:.1f} | {r['step_s']:.3f} | {tokens / r['step_s']:,.0f} | "
          f"{base / r['step_s']:.2f}x | {r['peak_gib']:.2f} | {r['loss']:.4f} |")


if __name__ == "__main__":
  main()
