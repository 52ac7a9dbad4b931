"""The base model's own answers to the mixture's prompts: what the CLS reads at decode time.

    python -m clsalign_jax.data.completions --out=clsalign_jax/data/shipped/completions/smollm2_135m.jsonl

At decode time the CLS reads windows of the *model's* response (Rules 2-3), and under an attack that
response is harmful compliance. Reference answers and bank refusals show it neither, so this command
decodes the base model (plain decoding with our own loop, greedy) on every prompt of mixture v2 (all
splits) and of any extra prompt files, and records:

  benign prompt      the model's own answer (`kind = "answer"`)
  malicious prompt   the model's continuation; where the unprefilled answer is a refusal (AdvBench
                     keyword judge), it is decoded again with an affirmative opening prefilled (one of
                     `AFFIRMATIVE`, picked by a hash of the prompt) and the prefill is kept as the
                     start of the response (`kind = "compliance"`, `prefill` non-empty); an answer
                     that still refuses after the prefill is kept as `kind = "refusal"`.

Every row carries `prompt`, `label` (benign/malicious), `kind`, `prefill`, `response` (prefill +
continuation, the text the CLS windows are cut from) and `refused_unprefilled`. The run's settings
(model, template, decode settings, seed, package revision) go to `<out>.provenance.json`, so the
file is data with its provenance. Rows are appended to `<out>.partial` as batches finish, so an
interrupted run resumes where it stopped. Evaluation prompts never reach this command: mixture v2
drops them (curation.evaluation_prompts), and extra files are checked against the same set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
from absl import flags

from clsalign_jax import cli, files
from clsalign_jax.data import curation
from clsalign_jax.data.records import DataError, jsonl_objects, normalize_prompt
from clsalign_jax.data.views import read_completions
from clsalign_jax.decode.config import NO_INTERVENTION, DecodeConfig
from clsalign_jax.errors import UsageError
from clsalign_jax.eval.judges import KeywordJudge
from clsalign_jax.eval.lm import Sampling, TargetModel

# Openings prefilled where the model would refuse; none is the evaluation's " Sure, here is".
AFFIRMATIVE = (
  "Certainly! Here are the steps:",
  "Of course. Here's how to do it:",
  "Absolutely, here is a detailed answer:",
  "Sure thing. Step 1:",
  "Here is what you asked for:",
  "No problem! To get started,",
)


@dataclasses.dataclass(frozen=True)
class Prompt:
  prompt: str
  label: str  # "benign" | "malicious"
  source: str = ""


def affirmative_for(prompt: str) -> str:
  return AFFIRMATIVE[hashlib.sha256(prompt.encode()).digest()[0] % len(AFFIRMATIVE)]


def prompt_key(prompt: str) -> str:
  return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def mixture_prompts() -> list[Prompt]:
  """Every prompt of mixture v2, all splits, in split order (train, validation, test)."""
  splits, _ = curation.build_mixture_v2(contrast_answers=None)  # contrast prompts are decoded on their own
  out = []
  for name in ("train", "validation", "test"):
    for r in splits[name]:
      label = "malicious" if r.record.label == curation.MALICIOUS else "benign"
      out.append(Prompt(r.record.prompt, label, r.record.source))
  return out


def read_prompt_file(path: str) -> list[Prompt]:
  """JSONL with `prompt` and `label` (benign/malicious or 0/1) per line; evaluation prompts refused."""
  evals = curation.evaluation_prompts()
  out = []
  for where, rec in jsonl_objects(path):
    try:
      label = {"0": "benign", "1": "malicious"}.get(str(rec["label"]), str(rec["label"]))
      prompt = rec["prompt"]
    except KeyError as e:
      raise DataError(f"{where}: expected a JSON object with 'prompt' and 'label' (no {e})") from None
    if label not in ("benign", "malicious"):
      raise DataError(f"{where}: label {rec['label']!r}; expected benign/malicious or 0/1")
    if normalize_prompt(prompt) in evals:
      raise DataError(f"{where}: prompt of an evaluation set: {prompt[:60]!r}")
    out.append(Prompt(prompt, label, rec.get("source", os.path.basename(path))))
  return out


def _git_revision() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    return subprocess.run(
      ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def complete(model, prompts: Sequence[Prompt], max_new_tokens: int, on_rows=None) -> list[dict]:
  """Decode `prompts` with `model` (an eval.lm.TargetModel); see the module docstring."""
  judge = KeywordJudge("advbench")
  dcfg = DecodeConfig(**{**NO_INTERVENTION, "response_sees_cls": False, "max_new_tokens": max_new_tokens})
  greedy = Sampling()
  first = model.generate([model.encode(p.prompt) for p in prompts], [greedy] * len(prompts), dcfg)
  rows = []
  again = []
  for p, g in zip(prompts, first):
    refused = judge.refused(g.response)
    row = {"prompt": p.prompt, "label": p.label, "source": p.source, "prefill": "", "response": g.response.strip()}
    row.update(refused_unprefilled=refused, kind="answer" if p.label == "benign" else "compliance")
    if p.label == "malicious" and refused:
      again.append(len(rows))
    rows.append(row)
  if again:
    enc = [model.encode(rows[i]["prompt"], prefill=affirmative_for(rows[i]["prompt"])) for i in again]
    second = model.generate(enc, [greedy] * len(enc), dcfg)
    for i, g in zip(again, second):
      fill = affirmative_for(rows[i]["prompt"])
      text = f"{fill} {g.response.strip()}".strip() if not g.response.startswith(" ") else fill + g.response
      rows[i].update(prefill=fill, response=text.strip(), kind="refusal" if judge.refused(g.response) else "compliance")
  if on_rows:
    on_rows(len(rows))
  return rows


def provenance(checkpoint: str, model, max_new_tokens: int, batch_size: int, argv: Sequence[str]) -> dict:
  return {
    "command": "python -m clsalign_jax.data.completions " + " ".join(argv),
    "checkpoint": checkpoint,
    "template": model.template.name,
    "tokenizer_vocab": model.tokenizer.vocab_size,
    "decoding": "greedy (temperature 0), plain: no CLS, no refusal insertion; eos = the template's end token",
    "max_new_tokens": max_new_tokens,
    "batch_size": batch_size,
    "seed": 0,
    "refusal_judge": "AdvBench refusal keywords (eval/judges.py 'advbench')",
    "affirmative_prefills": list(AFFIRMATIVE),
    "package_revision": _git_revision(),
    "jax": jax.__version__,
    "machine": platform.machine(),
    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  flags.DEFINE_string("out", None, "Output JSONL.", flag_values=fv)
  flags.DEFINE_string("checkpoint", "gguf:smollm2", "The base model (a checkpoint spec).", flag_values=fv)
  flags.DEFINE_multi_string("prompts", [], "Extra prompt JSONL files (prompt, label); repeatable.", flag_values=fv)
  flags.DEFINE_bool("no_mixture", False, "Only the --prompts files.", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 48, "Tokens decoded per answer.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 32, "Rows per decode call.", flag_values=fv)
  flags.DEFINE_integer("chunk", 256, "Prompts per resumable chunk.", flag_values=fv)
  flags.DEFINE_integer("limit", -1, "First N prompts only (smoke runs); -1: all.", flag_values=fv)


def _prompts(fv: flags.FlagValues) -> list:
  prompts = [] if fv.no_mixture else mixture_prompts()
  for path in fv.prompts:
    prompts += read_prompt_file(path)
  seen, unique = set(), []
  for p in prompts:
    if p.prompt not in seen:
      seen.add(p.prompt)
      unique.append(p)
  return unique[: fv.limit] if fv.limit >= 0 else unique


def body(fv: flags.FlagValues, args: list[str], argv: Sequence[str]) -> None:
  cli.no_arguments(args)
  if not fv.out:
    raise UsageError("--out is required")
  prompts = _prompts(fv)
  partial = fv.out + ".partial"
  done = read_completions(partial) if os.path.exists(partial) else {}
  todo = [p for p in prompts if p.prompt not in done]
  print(f"{len(prompts)} prompts, {len(done)} already done, {len(todo)} to decode", flush=True)
  model = TargetModel.load(
    "base", fv.checkpoint, decode=dict(NO_INTERVENTION, response_sees_cls=False), batch_size=fv.batch_size
  )
  t0 = time.time()
  with open(partial, "a", encoding="utf-8") as f:
    for k in range(0, len(todo), fv.chunk):
      rows = complete(model, todo[k : k + fv.chunk], fv.max_new_tokens)
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        done[row["prompt"]] = row
      f.flush()
      print(f"{k + len(rows)}/{len(todo)} in {time.time() - t0:.0f} s", flush=True)
  ordered = [done[p.prompt] for p in prompts]
  files.atomic_write(fv.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
  files.atomic_write_json(
    fv.out + ".provenance.json", provenance(fv.checkpoint, model, fv.max_new_tokens, fv.batch_size, argv)
  )
  os.remove(partial)
  kinds = {}
  for r in ordered:
    kinds[(r["label"], r["kind"])] = kinds.get((r["label"], r["kind"]), 0) + 1
  print("rows by (label, kind):", dict(sorted(kinds.items())), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line `argv` (default sys.argv); returns the exit code."""
  argv = list(sys.argv if argv is None else argv)
  # The provenance records the command as given (flags after the program name).
  return cli.run(lambda fv, args: body(fv, args, argv[1:]), define_flags, argv)


if __name__ == "__main__":
  cli.exit_with(main)
