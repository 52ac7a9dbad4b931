"""CPU throughput of the data pipeline: SFT records, and pretraining documents old path vs streaming.

    python benchmarks/data_throughput.py                      # SmolLM2 GGUF tokenizer, ChatML
    python benchmarks/data_throughput.py --tokenizer mistral --template llama2 --packing
    python benchmarks/data_throughput.py --documents          # 10k and 100k synthetic documents
    python benchmarks/data_throughput.py --documents --smoke  # a few hundred (the CI smoke run)

SFT mode, on the shipped `safety_mix` train split.
Two stages are timed separately:
* encode: records -> [CLS] + template + query + response + EOS with exact spans (done once, when
  the pipeline is built);
* batch: one epoch of batches through the grain iterator (padding to length buckets, or packing).
records/s counts examples; tokens/s counts real (non-padding) tokens.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

from absl import flags

from clsalign_jax.data import mixture
from clsalign_jax.data.pipeline import Pipeline, PipelineConfig, encode_sft, pretrain_pipeline
from clsalign_jax.data.streaming import ENCODE_GROUP, DocumentStream
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


class SyntheticDocuments:
  """A random-access corpus of `n` labelled documents, each made from its index on demand (so the
  source itself holds nothing and peak RSS is the pipeline's). Words are pseudo-words from
  syllables, lengths long-tailed (median ~110 words, a few past max_length)."""

  SYLLABLES = ("ka", "lo", "ren", "ti", "sor", "ma", "quel", "vi", "dan", "or", "es", "thu", "ne", "pa", "gri", "ul")

  def __init__(self, n: int, seed: int = 0):
    self.n = n
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(self.SYLLABLES, size=rng.integers(1, 4))) for _ in range(4000)]
    words += ["the", "of", "and", "in", "1887", "(born", "—", "Université", "München", "km²", ".", ","]
    self.words = np.asarray(words)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    rng = np.random.default_rng([7, i])
    count = int(min(4000, 1 + rng.lognormal(4.7, 0.8)))
    text = " ".join(self.words[rng.integers(0, len(self.words), size=count)])
    return {"id": f"doc{i}", "text": text, "label": int(rng.random() < 0.2)}


def document_child(args):
  """One path over one corpus size in this (fresh) process: JSON with tokens, seconds, peak RSS."""
  tok = Tokenizer.from_gguf(smollm2_gguf_path())
  docs = SyntheticDocuments(args.num_docs)
  config = PipelineConfig(
    max_length=args.max_length,
    batch_size=args.batch_size,
    packing=args.packing,
    bucket_lengths=(),
    num_epochs=1,
    drop_remainder=False,
    worker_count=args.workers,
  )
  setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  cpu0 = _cpu_seconds()
  t0 = time.perf_counter()
  if args.child == "old":
    batches = pretrain_pipeline(docs, tok, config, process_index=0, process_count=1)
  elif args.child == "new":
    batches = DocumentStream(docs, tok, config, process_index=0, process_count=1)
  else:  # the floor: making the texts and the tokenizer's batch encoder alone, nothing kept
    batches = _encode_only(docs, tok)
  tokens = rows = 0
  first = None
  for batch in batches:
    if first is None:
      first = time.perf_counter() - t0
    tokens += batch["real_tokens"] if "real_tokens" in batch else int((batch["segment_ids"] > 0).sum())
    rows += len(batch["tokens"])
  seconds = time.perf_counter() - t0
  cpu = _cpu_seconds() - cpu0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  if args.workers:  # the workers' pages count too
    peak += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  print(
    json.dumps(
      {
        "tokens": tokens,
        "rows": rows,
        "seconds": seconds,
        "cpu_s": cpu,
        "first_batch_s": first,
        "setup_rss_mb": setup_rss / 1024,
        "peak_rss_mb": peak / 1024,
      }
    )
  )


def _encode_only(docs, tok):
  """Yield one pseudo-batch per group of ENCODE_GROUP documents, encoded as the stream encodes them."""
  for start in range(0, len(docs), ENCODE_GROUP):
    ids = tok.encode_batch([docs[i]["text"] for i in range(start, min(start + ENCODE_GROUP, len(docs)))])
    lengths = np.asarray([len(x) for x in ids])
    yield {"real_tokens": int(lengths.sum()), "tokens": lengths}


def _cpu_seconds() -> float:
  # Every thread of this process and any worker processes: the work done, whatever the load.
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def documents(args):
  sizes = [300, 600] if args.smoke else [10_000, 100_000]
  load_before = os.getloadavg()
  results = {}
  for path in ("old", "new", "floor"):
    for n in sizes:
      cmd = [
        sys.executable,
        __file__,
        "--child",
        path,
        "--num-docs",
        str(n),
        "--max-length",
        str(args.max_length),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
      ] + (["--packing"] * args.packing)
      out = subprocess.run(cmd, capture_output=True, text=True)
      if out.returncode:
        raise SystemExit(f"{path} path on {n} documents failed:\n{out.stderr[-3000:]}")
      results[path, n] = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}; load average before: {load_before}")
  mode = f"packing (N = 16)" if args.packing else "one chunk per row"
  print(
    f"documents: synthetic, max_length {args.max_length}, batch {args.batch_size}, {mode}, one epoch, "
    f"workers {args.workers}, SmolLM2 tokenizer"
  )
  print(
    "| path | documents | tokens | seconds | tokens/s | CPU s | tokens/CPU s | first batch s | RSS after setup MB "
    "| peak RSS MB |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for (path, n), r in results.items():
    name = {
      "old": "old (encode all, then batch)",
      "new": "new (streaming)",
      "floor": "floor: texts + batch encoder only",
    }[path]
    print(
      f"| {name} | {n:,} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:,.0f} | "
      f"{r['cpu_s']:.1f} | {r['tokens'] / r['cpu_s']:,.0f} | {r['first_batch_s']:.2f} | {r['setup_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
    )
  small, big = sizes
  for path in ("old", "new"):
    print(
      f"{path}: peak RSS {big:,} / {small:,} documents = "
      f"{results[path, big]['peak_rss_mb'] / results[path, small]['peak_rss_mb']:.2f}x"
    )
  speed = {k: r["tokens"] / r["seconds"] for k, r in results.items()}
  print(
    f"new / old tokens/s: {speed['new', small] / speed['old', small]:.2f}x ({small:,}), "
    f"{speed['new', big] / speed['old', big]:.2f}x ({big:,})"
  )
  print(
    f"floor / old tokens/s (the most any path with this tokenizer can reach here): "
    f"{speed['floor', small] / speed['old', small]:.2f}x ({small:,}), {speed['floor', big] / speed['old', big]:.2f}x ({big:,})"
  )
  cpu = {k: r["cpu_s"] for k, r in results.items()}
  print(
    f"old / new CPU seconds: {cpu['old', small] / cpu['new', small]:.2f}x ({small:,}), "
    f"{cpu['old', big] / cpu['new', big]:.2f}x ({big:,}); load average after: {os.getloadavg()}"
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokenizer", choices=["smollm2", "mistral"], default="smollm2")
  parser.add_argument("--template", choices=["chatml", "llama2", "mistral"], default=None)
  parser.add_argument("--max-length", type=int, default=2048)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--packing", action="store_true")
  parser.add_argument("--balance", action="store_true")
  parser.add_argument("--workers", type=int, default=0, help="grain worker processes")
  parser.add_argument("--documents", action="store_true", help="pretraining documents: old path vs streaming")
  parser.add_argument("--smoke", action="store_true", help="with --documents: a few hundred documents")
  parser.add_argument("--child", choices=["old", "new", "floor"], help=argparse.SUPPRESS)
  parser.add_argument("--num-docs", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  # grain's worker processes read absl flags; parse them (none of ours) before starting any.
  flags.FLAGS(["data_throughput"])
  if args.child:
    return document_child(args)
  if args.documents:
    return documents(args)

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
