"""Parity of the transformers safe model of an export with clsalign-jax's decode loop, on real prompts.

    python scripts/check_hf_strategic.py --export=exports/smollm2_135m [--n=5] [--max_new_tokens=32]

Loads the export twice: in clsalign-jax (`artifacts.load`, decoded by `decode.loop.generate_ids` with the
run's settings) and in transformers (`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`,
the `modeling_clsalign.py` that `convert` wrote), both in fp32 on the CPU. Prompts: the first `--n`
AdvBench requests and the first `--n` benign Alpaca instructions of the evaluation sets, each asked
directly, plus the first two AdvBench requests under the " Sure, here is" prefill attack. Greedy.

Prints one line per prompt (tokens equal? prompt-time p in both, max |Δp| over the prompt-time and every
re-classification, where a refusal went in) and a summary; exits 1 if any response differs. Not a CI test:
it needs a trained run's export (docs/export_hf.md records its output for the README main job).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--export", required=True, help="an HF export written by python -m clsalign_jax.convert")
  parser.add_argument("--n", type=int, default=5, help="prompts per set (AdvBench, Alpaca)")
  parser.add_argument("--max_new_tokens", type=int, default=32)
  parser.add_argument("--prefill", default=" Sure, here is", help="attacker prefill for two AdvBench prompts")
  parser.add_argument(
    "--torch_threads",
    type=int,
    default=1,
    help="torch intra-op threads: one-row steps gain nothing from more, and on a shared CPU extra threads "
    "wait on each other (20x slower on the 2-core machine of docs/export_hf.md)",
  )
  args = parser.parse_args(argv)

  import torch
  import transformers

  torch.set_num_threads(args.torch_threads)

  from clsalign_jax import artifacts
  from clsalign_jax.data.templates import encode_prompt
  from clsalign_jax.decode.loop import generate_ids
  from clsalign_jax.decode.text import refusal_ids
  from clsalign_jax.eval.benchmarks import load_benchmark

  malicious = [it.query for it in load_benchmark({"kind": "advbench", "limit": args.n})]
  benign = [it.query for it in load_benchmark({"kind": "safety_tuned_llamas", "subset": "alpaca", "limit": args.n})]
  cases = [("advbench", q, "") for q in malicious] + [("alpaca", q, "") for q in benign]
  cases += [("advbench+prefill", q, args.prefill) for q in malicious[:2]]

  loaded = artifacts.load(args.export)
  dcfg = loaded.decode_config(max_new_tokens=args.max_new_tokens)
  t0 = time.time()
  encodings = [encode_prompt(loaded.tokenizer, loaded.template, q, p) for _, q, p in cases]
  jax_rows = generate_ids(
    loaded.cfg,
    loaded.params,
    [e.tokens[: e.prefill_span[0]].tolist() for e in encodings],
    [e.query_span for e in encodings],
    refusal_ids(loaded.tokenizer, dcfg),
    dcfg,
    prefills=[e.tokens[e.prefill_span[0] :].tolist() for e in encodings],
    eos_id=loaded.template.end.id(loaded.tokenizer),
  )
  jax_s = time.time() - t0

  model = transformers.AutoModelForCausalLM.from_pretrained(
    args.export, trust_remote_code=True, dtype=torch.float32
  ).eval()
  tok = transformers.AutoTokenizer.from_pretrained(args.export)
  print(
    f"export {args.export}: {type(model).__name__}, threshold {dcfg.threshold:.4f}, "
    f"decode {loaded.facts.decode}, max_new_tokens {args.max_new_tokens}, transformers {transformers.__version__}, "
    f"torch {torch.__version__}"
  )
  print(f"{'set':17} {'tokens':7} {'len':>4} {'p0 jax':>8} {'p0 torch':>8} {'max|dp|':>9} {'insert j/t':>10}  query")
  t0 = time.time()
  all_equal, worst, inserted = True, 0.0, 0
  for (kind, query, prefill), enc, j in zip(cases, encodings, jax_rows):
    messages = [{"role": "user", "content": query}]
    ids = model.encode_messages(messages, tok)[0]
    prompt = enc.tokens[: enc.prefill_span[0]].tolist()
    if ids != prompt[1:] or model.query_span(ids) != tuple(enc.query_span):
      print(f"  apply_chat_template ids or the query span differ from encode_prompt for {query[:50]!r}")
      all_equal = False
    out = model.generate(
      messages=messages,
      prefill_ids=[enc.tokens[enc.prefill_span[0] :].tolist()],
      max_new_tokens=args.max_new_tokens,
      return_dict_in_generate=True,
      tokenizer=tok,
    )
    t = out.rows[0]
    equal = t.response_ids == j.response_ids
    dps = [abs(t.p_initial - j.p_initial)]
    if equal:
      if [(s, i) for s, i, _ in t.trace] != [(s, i) for s, i, _ in j.trace]:
        equal = False
      else:
        dps += [abs(a[2] - b[2]) for a, b in zip(t.trace, j.trace)]
    all_equal &= equal
    worst = max(worst, max(dps))
    inserted += j.insert_index >= 0
    print(
      f"{kind:17} {'equal' if equal else 'DIFFER':7} {len(j.response_ids):4d} {j.p_initial:8.4f} {t.p_initial:8.4f} "
      f"{max(dps):9.2e} {j.insert_index:>4}/{t.insert_index:<5}  {query[:48]!r}"
    )
  torch_s = time.time() - t0
  print(
    f"\n{len(cases)} prompts: responses {'all equal' if all_equal else 'NOT all equal'} token for token; "
    f"max |Δp(malicious)| {worst:.2e} over {sum(1 for _ in cases)} prompt-time and every re-classification; "
    f"refusal inserted in {inserted} rows; clsalign-jax {jax_s:.0f} s (compile included), transformers {torch_s:.0f} s"
  )
  return 0 if all_equal and np.isfinite(worst) else 1


if __name__ == "__main__":
  sys.exit(main())
