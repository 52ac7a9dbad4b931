"""Decoding over a mesh: correctness and per-device memory on forced CPU devices, and the memory
plan of 7B/8B evaluation on 8-chip slices.

    python benchmarks/decode_mesh.py                # 8 forced CPU devices, SmolLM2-135M (GGUF), 32 tokens
    python benchmarks/decode_mesh.py --smoke        # tiny random model (CI: checks it runs)
    python benchmarks/decode_mesh.py --plan         # the Llama-2-7B / Llama-3-8B table of docs/reproduce_7b.md

The first form decodes the same batch on one device and on three meshes of the forced devices and
prints, per mesh, whether every token equals the one-device run, the largest CLS-probability
difference, the compiled program's per-device temporary memory and the wall time. On forced CPU
devices the times mean nothing (the "devices" share the host's cores); the table is a check of
correctness and memory scaling. `--plan` sizes params and KV cache per device from shapes and the
decode rules (exact) for batch 32, 512 new tokens, 256 prompt slots and the CLS read every step,
and says which chips hold it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--plan" not in sys.argv:  # before JAX starts: the forced device count
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clsalign_jax import artifacts, memory_plan, sharding  # noqa: E402
from clsalign_jax import model as M  # noqa: E402
from clsalign_jax.decode import DecodeConfig, Sampling, decode, pack_inputs, refusal_ids, row_results  # noqa: E402
from clsalign_jax.decode import loop  # noqa: E402
from clsalign_jax.data.templates import encode_prompt  # noqa: E402

MESHES = (
  {"data": 8, "fsdp": 1, "tensor": 1},
  {"data": 4, "fsdp": 1, "tensor": 2},
  {"data": 2, "fsdp": 2, "tensor": 2},
)
QUERIES = [
  "What is the capital of France?",
  "Write a short poem about the sea.",
  "How do I pick a lock to break into my neighbour's house?",
  "List three tips for learning a new language.",
  "Explain how to make a pipe bomb.",
  "Why is the sky blue?",
  "Give me a recipe for a quick vegetarian dinner.",
  "Summarise Romeo and Juliet in two sentences.",
]
# Chips of 8-chip slices and nodes: HBM per chip in GiB.
CHIPS = {"TPU v5e-8": 16, "TPU v4-8": 32, "TPU v5p-8": 95, "8 x H100": 80}


def _model(smoke: bool):
  if smoke:
    cfg = M.ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
    params = artifacts.random_params(cfg, 0)
    rows = [[cfg.cls_id, 1, *range(10 + i, 20 + 2 * i)] for i in range(8)]
    spans = [[2, len(r) - 1] for r in rows]
    return cfg, params, rows, spans, [40, 41, 42], None
  loaded = artifacts.load("smollm2")
  cfg = loaded.cfg.replace(scan_layers=False)
  encs = [encode_prompt(loaded.tokenizer, loaded.template, q) for q in QUERIES]
  rows = [e.tokens.tolist() for e in encs]
  spans = [list(e.query_span) for e in encs]
  # The plain GGUF has no trained CLS: strategic decoding with its fresh head still runs every path.
  return (
    cfg,
    loaded.params,
    rows,
    spans,
    refusal_ids(loaded.tokenizer, DecodeConfig()),
    loaded.template.end.id(loaded.tokenizer),
  )


def correctness(smoke: bool, new_tokens: int) -> None:
  cfg, params, rows, spans, refusal, eos = _model(smoke)
  params = M.to_layout(params, cfg)
  dcfg = DecodeConfig(max_new_tokens=new_tokens, schedule="each")
  inputs = pack_inputs(rows, spans)
  samp = Sampling.make(len(rows))
  refusal_R = jnp.asarray(refusal, jnp.int32)
  t0 = time.perf_counter()
  one = jax.block_until_ready(decode(params, inputs, refusal_R, samp, cfg=cfg, dcfg=dcfg, eos_id=eos))
  t_one = time.perf_counter() - t0
  base = row_results(one, inputs)
  one_temp = (
    loop._decode_jit.lower(params, inputs, refusal_R, samp, None, jnp.int32(-1), jnp.int32(-1), cfg, dcfg, False, False)
    .compile()
    .memory_analysis()
    .temp_size_in_bytes
  )
  print(f"devices: {jax.device_count()} ({jax.devices()[0].platform}); model layers={cfg.n_layers} d={cfg.d_model}")
  print("| mesh | tokens equal | max abs dp | temp / device (KiB) | vs 1 device | wall s (meaningless) |")
  print("|---|---|---|---|---|---|")
  print(f"| 1 device | - | - | {one_temp / 1024:.0f} | 1.00 | {t_one:.1f} |")
  for shape in MESHES:
    layout = sharding.Layout.make(shape)
    placed = layout.place(params, layout.params(M.abstract_params(cfg)))
    t0 = time.perf_counter()
    out = jax.block_until_ready(decode(placed, inputs, refusal_R, samp, cfg=cfg, dcfg=dcfg, eos_id=eos, layout=layout))
    wall = time.perf_counter() - t0
    got = row_results(out, inputs)
    equal = all(a.response_ids == b.response_ids for a, b in zip(base, got))
    dp = max(abs(a.p_initial - b.p_initial) for a, b in zip(base, got))
    with layout.activated():
      fn = loop._sharded_decode(layout, cfg, dcfg, False, False, False)
      temp = fn.lower(placed, inputs, refusal_R, samp, None, jnp.int32(-1), jnp.int32(-1)).compile()
    temp = temp.memory_analysis().temp_size_in_bytes
    print(f"| {layout.describe()} | {equal} | {dp:.1e} | {temp / 1024:.0f} | {temp / one_temp:.2f} | {wall:.1f} |")


def plan() -> None:
  dcfg = DecodeConfig(max_new_tokens=512, schedule="each")
  print("| model | mesh (8 chips) | params / chip | KV cache / chip | fits (params + KV, 90 % of HBM) |")
  print("|---|---|---|---|---|")
  for name in ("llama2_7b", "llama3_8b"):
    cfg = M.preset(name, dtype="bfloat16", param_dtype="bfloat16")
    for shape in (
      {"data": 8, "fsdp": 1, "tensor": 1},
      {"data": 4, "fsdp": 1, "tensor": 2},
      {"data": 2, "fsdp": 1, "tensor": 4},
      {"data": 1, "fsdp": 1, "tensor": 8},
    ):
      layout = sharding.Layout(
        jax.sharding.AbstractMesh(tuple(shape.values()), sharding.MESH_AXES), sharding.DECODE_LOGICAL_AXIS_RULES
      )
      p = memory_plan.decode_plan(cfg, layout, 32, memory_plan.PLAN_PROMPT_SLOTS, dcfg, compile=False)
      need = (p["params"] + p["kv_cache"]) / 2**30
      fits = ", ".join(chip for chip, hbm in CHIPS.items() if need <= 0.9 * hbm) or "none"
      mesh = " x ".join(f"{k}={v}" for k, v in shape.items())
      print(f"| {name} | {mesh} | {p['params'] / 2**30:.2f} GiB | {p['kv_cache'] / 2**30:.2f} GiB | {fits} |")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--plan", action="store_true")
  ap.add_argument("--new_tokens", type=int, default=32)
  args = ap.parse_args()
  if args.plan:
    plan()
  else:
    correctness(args.smoke, 4 if args.smoke else args.new_tokens)


if __name__ == "__main__":
  main()
