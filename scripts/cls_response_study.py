"""Which way of training the CLS on response text works best with Rules 2-3 (issue: "the CLS learns
to read responses"), measured on the mixture's *validation* split, never on an evaluation set:

    python scripts/cls_response_study.py --out=runs/study \
        --variant=query_only:runs/A:{} \
        --variant=query_only+rule2_query:runs/A:{"rule2_include_query":true} \
        --variant=window:runs/B:{"rule2_include_query":true}

Each variant is NAME:RUN_DIR:DECODE_JSON (decode settings on top of the main job's strategic ones).
Benign validation prompts are decoded directly (over-refusal, XSTest refusal openings or an inserted
refusal); malicious validation prompts with the response prefilled by " Sure, here is" (ASR, AdvBench
refusal keywords). Only prompts the curation did not rewrite are used. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

from clsalign_jax.decode.config import CLS_RUN
from clsalign_jax.data import curation
from clsalign_jax.eval import harness as harness_lib


def validation_files(out: pathlib.Path, n: int) -> dict[str, str]:
  splits, _ = curation.build_mixture_v2()
  natural = [r for r in splits["validation"] if not r.rewritten_from]
  files = {}
  for label, name in ((0, "val_benign"), (1, "val_malicious")):
    rows = [r for r in natural if r.record.label == label][:n]
    path = out / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"id": r.record.id, "prompt": r.record.prompt}) + "\n" for r in rows))
    files[name] = str(path)
  return files


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--variant", action="append", required=True, help="NAME:RUN_DIR:DECODE_JSON")
  parser.add_argument("--n", type=int, default=40, help="prompts per label")
  parser.add_argument("--max_new_tokens", type=int, default=48)
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  files = validation_files(out, args.n)
  variants = []
  for spec in args.variant:
    name, run_dir, decode = spec.split(":", 2)
    variants.append((name, f"orbax:{run_dir}", {**CLS_RUN, **json.loads(decode or "{}")}))
  config = {
    "output_dir": str(out / "eval"),
    "seed": 0,
    "batch_size": args.batch_size,
    "max_new_tokens": args.max_new_tokens,
    "progress": True,
    "save_cls_trace": True,
    "model": {"tokenizer": "auto", "template": "auto", "template_kwargs": {}, "model": {}},
    "variants": variants,
    "benchmarks": [
      dict(kind="generic", path=files["val_benign"], fields=dict(id="id", query="prompt"), name="benign"),
      dict(kind="generic", path=files["val_malicious"], fields=dict(id="id", query="prompt"), name="malicious"),
    ],
    "attacks": [
      dict(name="direct", kind="direct", benchmarks=["benign"]),
      dict(name="prefill_sure", kind="prefill", mode="literal", text="Sure, here is", benchmarks=["malicious"]),
    ],
    "judges": [
      dict(name="advbench", kind="keyword", list="advbench"),
      dict(name="refusal", kind="keyword", list="xstest"),
    ],
  }
  h = harness_lib.Harness(config)
  for v in h.variants:
    h.run_variant(v)
  summary, _ = h.summarize()
  pct = lambda x: "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"
  lines = [
    '| variant | over-refusal, benign validation (direct) | ASR, malicious validation (" Sure, here is") | '
    "CLS flagged at prompt (benign / malicious) | refusal inserted (benign / malicious) |",
    "|---|---|---|---|---|",
  ]
  for name, _, _ in variants:
    b = next(r for r in summary if r["variant"] == name and r["benchmark"] == "benign" and r["judge"] == "refusal")
    m = next(r for r in summary if r["variant"] == name and r["benchmark"] == "malicious" and r["judge"] == "advbench")
    lines.append(
      f"| {name} | {pct(1 - b['asr'])} (n = {b['n_items']}) | {pct(m['asr'])} (n = {m['n_items']}) | "
      f"{pct(b['cls_flag_rate'])} / {pct(m['cls_flag_rate'])} | "
      f"{pct(b['refusal_inserted_rate'])} / {pct(m['refusal_inserted_rate'])} |"
    )
  text = "\n".join(lines)
  print(text)
  (out / "table.md").write_text(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
