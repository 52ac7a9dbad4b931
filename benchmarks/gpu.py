"""GPU benchmark (one script, sized for a few minutes on one H100): bf16 training steps with MFU,
decode throughput with the HBM-bandwidth fraction, and the cost of per-step CLS re-classification.

  python benchmarks/gpu.py [--peak_tflops=989] [--hbm_tbps=3.35] [--quick]

Random weights and batches in the shared batch format: this measures speed, not learning.
Model FLOPs per trained token = 6·N_matmul + 12·L·T·d_attn (causal attention counted at full
T² as the kernels compute it), N_matmul excluding the embedding gather; MFU = model FLOP/s / peak.
Decode bandwidth: every step reads all weights once plus the live KV cache.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from clsalign_jax import model as M
from clsalign_jax import train
from clsalign_jax.config import default_config
from clsalign_jax.decode import DecodeConfig, Sampling, decode, pack_inputs

SHAPES = {
  "smollm2_135m": M.preset("smollm2_135m"),
  "llama_1b": M.ModelConfig(
    vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=4, head_dim=128, d_ff=8192, max_seq_len=4096
  ),
}


def _batch(cfg, B, T, seed=0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, cfg.vocab_size, (B, T)).astype(np.int32)
  tokens[:, 0], tokens[:, 1] = cfg.cls_id, cfg.bos_id
  q_end = T // 4
  loss_mask = np.zeros((B, T), np.int32)
  loss_mask[:, q_end:] = 1
  return {
    "tokens": tokens,
    "segment_ids": np.ones((B, T), np.int32),
    "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
    "query_span": np.tile(np.array([[2, q_end]], np.int32), (B, 1)),
    "response_span": np.tile(np.array([[q_end, T]], np.int32), (B, 1)),
    "loss_mask": loss_mask,
    "cls_label": (np.arange(B) % 2).astype(np.int32),
  }


def train_flops_per_token(cfg, T):
  n_matmul = (
    cfg.n_layers * (cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.d_model * cfg.d_ff)
    + cfg.d_model * cfg.vocab_size
  )
  return 6 * n_matmul + 12 * cfg.n_layers * T * cfg.n_heads * cfg.head_dim


def bench_train(name, cfg, B, T, attention, remat, steps, peak):
  cfg = cfg.replace(
    dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, remat_policy=remat, attention_impl=attention
  )
  config = default_config()
  config.schedule.name = "constant"
  config.optimizer.state_dtype = "float32"
  schedule = train.make_schedule(config, 100)
  tx = train.make_optimizer(config, schedule)
  params = M.init_params(cfg, jax.random.key(0))
  state = train.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0))
  )
  batch = jax.tree.map(jnp.asarray, _batch(cfg, B, T))
  step = jax.jit(train.make_train_step(config, cfg, tx, schedule), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / steps
  tok_s = B * T / step_s
  mfu = tok_s * train_flops_per_token(cfg, T) / peak
  mem = jax.devices()[0].memory_stats() or {}
  return {
    "bench": "train",
    "shape": name,
    "B": B,
    "T": T,
    "attention": attention,
    "remat": remat,
    "params": M.count_params(params),
    "compile_s": round(compile_s, 1),
    "step_s": round(step_s, 4),
    "tokens_per_s": round(tok_s),
    "mfu": round(mfu, 4),
    "loss": float(metrics["loss"]),
    "peak_gib": round(mem.get("peak_bytes_in_use", 0) / 2**30, 2),
  }


def bench_decode(cfg, B, prompt_len, new_tokens, repeats, hbm):
  cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)
  params = M.init_params(cfg, jax.random.key(1))
  rng = np.random.RandomState(0)
  prompts = [[cfg.cls_id, cfg.bos_id] + rng.randint(3, cfg.vocab_size, prompt_len - 2).tolist() for _ in range(B)]
  inputs = pack_inputs(prompts, [[2, prompt_len] for _ in range(B)])
  refusal = jnp.asarray([5, 6, 7, 8], jnp.int32)
  sampling = Sampling.make(B)
  variants = {
    "plain": DecodeConfig(schedule="first", strategic_attention=False, strategic_decoding=False),
    "each": DecodeConfig(schedule="each"),
    "annealing": DecodeConfig(schedule="annealing"),
  }
  best = {}
  for name, dcfg in variants.items():
    dcfg = dcfg.replace(max_new_tokens=new_tokens)
    run = lambda: jax.block_until_ready(
      decode(params, inputs, refusal, sampling, cfg=cfg, dcfg=dcfg, eos_id=None).tokens_BS
    )
    run()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      run()
      times.append(time.perf_counter() - t0)
    best[name] = min(times)
  param_bytes = M.count_params(params) * 2
  slots = int(inputs.tokens_BP.shape[1]) + new_tokens
  kv_bytes = 2 * cfg.n_layers * B * slots * cfg.n_kv_heads * cfg.head_dim * 2 / 2  # half full on average
  per_step = best["plain"] / new_tokens
  return {
    "bench": "decode",
    "B": B,
    "prompt": prompt_len,
    "new_tokens": new_tokens,
    "tokens_per_s": round(B * new_tokens / best["plain"]),
    "step_ms": round(1e3 * per_step, 3),
    "hbm_fraction": round((param_bytes + kv_bytes) / per_step / hbm, 4),
    "each_over_plain": round(best["each"] / best["plain"], 3),
    "annealing_over_plain": round(best["annealing"] / best["plain"], 3),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--peak_tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
  ap.add_argument("--hbm_tbps", type=float, default=3.35, help="HBM bandwidth (H100 SXM: 3.35 TB/s)")
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  peak, hbm = args.peak_tflops * 1e12, args.hbm_tbps * 1e12
  print(json.dumps({"devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__}), flush=True)
  runs = [
    ("smollm2_135m", 16, 2048, "cudnn", "none"),
    ("llama_1b", 16, 2048, "cudnn", "dots_no_batch"),
    ("llama_1b", 8, 2048, "cudnn", "dots_no_batch"),
    ("llama_1b", 8, 2048, "xla", "dots_no_batch"),
    ("llama_1b", 8, 2048, "cudnn", "none"),
    ("llama_1b", 8, 2048, "cudnn", "dots"),
    ("llama_1b", 16, 2048, "cudnn", "save_qkv_proj"),
  ]
  for name, B, T, attention, remat in runs[:2] if args.quick else runs:
    try:
      print(json.dumps(bench_train(name, SHAPES[name], B, T, attention, remat, 5, peak)), flush=True)
    except Exception as e:  # one failing variant (e.g. out of memory) must not hide the others
      print(
        json.dumps(
          {
            "bench": "train",
            "shape": name,
            "attention": attention,
            "remat": remat,
            "error": f"{type(e).__name__}: {str(e)[:300]}",
          }
        ),
        flush=True,
      )
  for B in (1, 8, 64):
    print(json.dumps(bench_decode(SHAPES["smollm2_135m"], B, 128, 128, 3, hbm)), flush=True)


if __name__ == "__main__":
  main()
