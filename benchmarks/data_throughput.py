"""CPU throughput of the data pipeline on the shipped `safety_mix` train split.

    python benchmarks/data_throughput.py                      # SmolLM2 GGUF tokenizer, ChatML
    python benchmarks/data_throughput.py --tokenizer mistral --template llama2 --packing

Two stages are timed separately:
* encode: records -> [CLS] + template + query + response + EOS with exact spans (done once, when
  the pipeline is built);
* batch: one epoch of batches through the grain iterator (padding to length buckets, or packing).
records/s counts examples; tokens/s counts real (non-padding) tokens.
"""

import argparse
import os
import platform
import time

from absl import flags

from clsalign_jax.data import mixture
from clsalign_jax.data.pipeline import Pipeline, PipelineConfig, encode_sft
from clsalign_jax.data.templates import get_template
from clsalign_jax.data.tokenizer import Tokenizer, mistral_sentencepiece_path, smollm2_gguf_path


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokenizer", choices=["smollm2", "mistral"], default="smollm2")
  parser.add_argument("--template", choices=["chatml", "llama2", "mistral"], default=None)
  parser.add_argument("--max-length", type=int, default=2048)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--packing", action="store_true")
  parser.add_argument("--balance", action="store_true")
  parser.add_argument("--workers", type=int, default=0, help="grain worker processes")
  args = parser.parse_args()
  # grain's worker processes read absl flags; parse them (none of ours) before starting any.
  flags.FLAGS(["data_throughput"])

  template_name = args.template or ("chatml" if args.tokenizer == "smollm2" else "llama2")
  t0 = time.perf_counter()
  if args.tokenizer == "smollm2":
    tok = Tokenizer.from_gguf(smollm2_gguf_path())
  else:
    tok = Tokenizer.from_sentencepiece(mistral_sentencepiece_path())
  load_s = time.perf_counter() - t0
  records = mixture.build_safety_mix()[0]["train"]

  t0 = time.perf_counter()
  corpus = encode_sft(records, tok, get_template(template_name), max_length=args.max_length)
  encode_s = time.perf_counter() - t0
  real_tokens = int(corpus.lengths.sum())

  config = PipelineConfig(
    max_length=args.max_length,
    batch_size=args.batch_size,
    packing=args.packing,
    balance_classes=args.balance,
    length_grouping=0 if args.packing else 8,
    worker_count=args.workers,
  )
  pipeline = Pipeline(corpus, config, pad_id=tok.pad_id, process_index=0, process_count=1)
  t0 = time.perf_counter()
  examples = tokens = slots = batches = 0
  for batch in pipeline:
    batches += 1
    labels = batch["cls_label"]
    examples += int((labels >= 0).sum())
    tokens += int((batch["segment_ids"] > 0).sum())
    slots += batch["tokens"].size
  batch_s = time.perf_counter() - t0

  print(f"machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}")
  print(f"tokenizer: {args.tokenizer} ({tok.vocab_size} + [CLS]) loaded in {load_s:.2f}s; template {template_name}")
  print(f"records: {len(records)} train -> {len(corpus)} examples, {real_tokens} tokens; stats {corpus.stats}")
  mode = "packing" if args.packing else "padding (length buckets, grouping 8)"
  print(f"batches: {batches} x {args.batch_size} rows, {mode}, workers {args.workers}, fill {tokens / slots:.1%}")
  print("| stage | seconds | records/s | tokens/s |")
  print("|---|---|---|---|")
  print(f"| encode | {encode_s:.2f} | {len(corpus) / encode_s:,.0f} | {real_tokens / encode_s:,.0f} |")
  print(f"| batch (1 epoch) | {batch_s:.2f} | {examples / batch_s:,.0f} | {tokens / batch_s:,.0f} |")


if __name__ == "__main__":
  main()
