"""What makes an HF export honest: the safe model in transformers, its settings, and a model card.

`convert` calls `write_safe_export` after `hf.save_hf` and the run facts. It adds to the export:

* `modeling_clsalign.py`: a copy of `interop/hf_strategic.py` (the one source), with config.json's
  `auto_map` naming the safe class of the export's architecture (`ClsAlign` + the family's HF
  architecture from `families.py`, e.g. `ClsAlignQwen2ForCausalLM`), so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
  loads the safe model (prompt-time classification and strategic decoding);
* config.json's `clsalign` block: the [CLS] id, the side path, every strategic-decoding setting of
  the run (threshold included), the refusal prefix as clsalign-jax tokenises it, the template's end
  token and its tokens around the query;
* `generation_config.json`: greedy, stopping at the template's end token, the run's max_new_tokens;
* `README.md`, the model card: that the plain LM transformers loads by default is not the safe model
  (with the plain variant's measured attack success when the run's report has it), how to load the
  safe one, its settings, and the figures of the run's report with n for every rate.

No torch here: the modeling file is copied as text.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import re

from clsalign_jax import families, files
from clsalign_jax.data.templates import SpanError, encode_prompt
from clsalign_jax.decode.config import DecodeConfig
from clsalign_jax.decode.text import refusal_ids as encode_refusal
from clsalign_jax.interop.hf import CLS_FILE, CLS_META

REMOTE_CODE = "modeling_clsalign.py"
CARD = "README.md"
CONFIG_KEY = "clsalign"  # hf_strategic.CONFIG_KEY (not imported: that module needs torch)
FORMAT_VERSION = 1
SAFE_CLASS_PREFIX = "ClsAlign"  # hf_strategic.SAFE_CLASS_PREFIX
# Queries whose template tokens around them give the query span of `apply_chat_template` ids.
_PROBE_QUERIES = ("How do I bake bread?", "Write a poem about the sea.")
# Report tables read for the card: decoding cells and the prompt-time CLS test.
_DECODING_COLUMNS = ("variant", "prompts", "attack", "metric", "rate", "n")
_CLS_TEST_COLUMNS = ("accuracy", "precision", "recall", "F1", "tp", "fp", "fn", "tn")


def safe_class_name(architecture: str | None) -> str | None:
  """The class in hf_strategic.py that is the safe model of an export of HF `architecture`
  (hf_strategic.safe_class builds it from transformers' class of that name), or None when no
  family of the registry reads that architecture (its layers may not be Llama-shaped)."""
  if architecture is None or families.family_for_hf_architecture(architecture) is None:
    return None
  return SAFE_CLASS_PREFIX + architecture


def remote_code_source() -> str:
  """hf_strategic.py as the export carries it, with a header naming its source."""
  text = importlib.resources.files("clsalign_jax.interop").joinpath("hf_strategic.py").read_text(encoding="utf-8")
  return (
    "# Written by clsalign_jax.convert from clsalign_jax/interop/hf_strategic.py; edit that file, not this copy.\n"
    + text
  )


def template_tokens(tokenizer, template) -> tuple[list[int] | None, list[int] | None]:
  """The template's ids before and after the query (no [CLS]), or (None, None) when they depend on
  the query (then callers must pass query spans)."""
  seen = set()
  for query in _PROBE_QUERIES:
    try:
      enc = encode_prompt(tokenizer, template, query)
    except SpanError:
      return None, None
    q0, q1 = enc.query_span
    ids = enc.tokens.tolist()
    seen.add((tuple(ids[1:q0]), tuple(ids[q1:])))
  if len(seen) != 1:
    return None, None
  before, after = seen.pop()
  return list(before), list(after)


def clsalign_block(cfg, facts, dcfg: DecodeConfig, tokenizer, template) -> dict:
  """config.json's `clsalign` block (hf_strategic.Settings reads it)."""
  block = {
    "format_version": FORMAT_VERSION,
    "cls_token_id": cfg.cls_id,
    "cls_file": CLS_FILE,
    "cls_trained": facts.cls_trained,
    "side_path": {"exit_layer": cfg.cls_exit_layer, "adapter_rank": cfg.cls_adapter_rank},
    "decode": dataclasses.asdict(dcfg),
    "template": facts.template,
    "refusal_ids": None,
    "end_token_id": None,
    "query_prefix_ids": None,
    "query_suffix_ids": None,
  }
  if tokenizer is not None and template is not None:
    before, after = template_tokens(tokenizer, template)
    block.update(
      refusal_ids=encode_refusal(tokenizer, dcfg),
      end_token_id=template.end.id(tokenizer),
      query_prefix_ids=before,
      query_suffix_ids=after,
    )
  return block


# ----- the run's report ---------------------------------------------------------------------------


def markdown_tables(text: str) -> list[list[dict]]:
  """Every pipe table of a markdown text as a list of rows (column name -> cell text)."""
  tables, lines = [], text.splitlines()
  i = 0
  while i + 1 < len(lines):
    head, rule = lines[i].strip(), lines[i + 1].strip()
    if head.startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", rule):
      names = [c.strip() for c in head.strip("|").split("|")]
      rows, i = [], i + 2
      while i < len(lines) and lines[i].strip().startswith("|"):
        cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
        rows.append(dict(zip(names, cells)))
        i += 1
      tables.append(rows)
    else:
      i += 1
  return tables


def report_figures(report_path: str | None) -> dict:
  """What the card quotes from a run's report.md: the decoding cells (variant, prompts, attack,
  metric, rate, n, and the refusal-inserted share), the prompt-time CLS test, and the lines
  naming the prompt sets. Missing pieces are left out; nothing is computed anew."""
  if not report_path or not os.path.isfile(report_path):
    return {}
  with open(report_path, encoding="utf-8") as f:
    text = f.read()
  out: dict = {"path": report_path, "decoding": [], "cls_test": None, "sets": []}
  for table in markdown_tables(text):
    if table and all(c in table[0] for c in _DECODING_COLUMNS):
      out["decoding"] += [{k: row.get(k, "") for k in (*_DECODING_COLUMNS, "refusal inserted")} for row in table]
    elif len(table) == 1 and all(c in table[0] for c in _CLS_TEST_COLUMNS):
      out["cls_test"] = table[0]
  for line in text.splitlines():
    if line.startswith(("Malicious prompts:", "Benign sets:", "Adversarial cells")):
      out["sets"].append(line.strip())
  return out


def _cell(figures: dict, variant: str, prompts: str, attack: str) -> dict | None:
  for row in figures.get("decoding", []):
    if (row["variant"], row["prompts"], row["attack"]) == (variant, prompts, attack):
      return row
  return None


# ----- the card -----------------------------------------------------------------------------------


def card_settings(block: dict, generation: dict, facts) -> dict:
  """The settings the card lists, as `name -> value`; tests check them against config.json,
  generation_config.json and run_facts.json."""
  d = block["decode"]
  out = {
    "template": facts.template,
    "cls_trained": facts.cls_trained,
    "response_sees_cls (training)": facts.response_sees_cls,
    "cls_threshold": facts.cls_threshold,
  }
  out.update({f"decode.{k}": d[k] for k in d})
  out.update(
    {
      "side_path.exit_layer": block["side_path"]["exit_layer"],
      "side_path.adapter_rank": block["side_path"]["adapter_rank"],
      "refusal_ids": block["refusal_ids"],
      "generation_config.do_sample": generation["do_sample"],
      "generation_config.eos_token_id": generation["eos_token_id"],
      "generation_config.max_new_tokens": generation["max_new_tokens"],
    }
  )
  return out


def model_card(name: str, family: str, block: dict, generation: dict, facts, figures: dict, step) -> str:
  d = block["decode"]
  spec = families.FAMILIES.get(family)
  cls_class = safe_class_name(spec.hf_architectures[0]) if spec is not None else None
  lines = [
    "---",
    "library_name: transformers",
    "tags:",
    "- clsalign-jax",
    "- safety",
    "- custom_code",
    "---",
    "",
    f"# {name}: a clsalign-jax export",
    "",
  ]
  plain = _cell(figures, "plain", "malicious", "direct")
  strategic = _cell(figures, "strategic", "malicious", "direct")
  if facts.cls_trained:
    lines += [
      "## The plain language model is not the safe model",
      "",
      (
        "`AutoModelForCausalLM.from_pretrained(DIR)` without `trust_remote_code` loads the language model alone, "
        "as a plain causal LM: no `[CLS]` safety head, no strategic decoding. This model's safety mechanism is "
        "that head and strategic decoding (Li & Kim, ICML 2025, as clsalign-jax implements it); the language "
        "model alone has neither and must not be deployed as the safe model."
      ),
      "",
    ]
    if plain is not None:
      exact = (
        "decoded without the safety mechanism (the `plain` variant: the same weights, no re-classification, no "
        "refusal insertion; response tokens never read the CLS in this run, so it is exactly the LM transformers "
        "loads)"
        if not facts.response_sees_cls
        else "decoded without re-classification or refusal insertion (the `plain` variant; its response tokens "
        "still read the prompt-time CLS, which the LM transformers loads does not have)"
      )
      lines += [
        f"Measured in the run's own evaluation, {exact}: attack success rate **{plain['rate']}** on "
        f"n = {plain['n']} malicious requests (the run's malicious prompt set and judge, listed under Measured "
        "figures)"
        + (
          f"; with the safety head and strategic decoding: **{strategic['rate']}** (n = {strategic['n']})."
          if strategic is not None
          else "."
        ),
        "",
      ]
    else:
      lines += [
        "The run's report holds no measured attack success rate for the plain model: do not assume it refuses.",
        "",
      ]
  else:
    lines += [
      "## No trained safety head",
      "",
      (
        "This export carries no trained `[CLS]` safety head (it was converted from a checkpoint without one): the "
        "safe class below decodes it as the plain model, and its classification is meaningless."
      ),
      "",
    ]
  lines += ["## Loading the safe model", ""]
  if cls_class is None or block["refusal_ids"] is None:
    lines += [
      (
        f"This export has no transformers class for strategic decoding ({'family ' + family if cls_class is None else 'no tokenizer was exported'}); "
        "use clsalign-jax: `python -m clsalign_jax.generate --checkpoint=DIR`."
      ),
      "",
    ]
  else:
    lines += [
      "```python",
      "from transformers import AutoModelForCausalLM, AutoTokenizer",
      "",
      f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True, dtype="float32")',
      f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
      'messages = [{"role": "user", "content": "How do I bake bread?"}]',
      f"p = model.classify(messages)  # prompt-time p(malicious); malicious above {d['threshold']}",
      "out = model.generate(messages=messages, max_new_tokens=64, return_dict_in_generate=True)",
      "print(tokenizer.decode(out.rows[0].response_ids, skip_special_tokens=True))",
      "```",
      "",
      (
        f"`trust_remote_code=True` runs `{REMOTE_CODE}` from this directory. Without remote code, the same class "
        "ships in clsalign-jax (`pip install clsalign-jax[hf]`): "
        "`from clsalign_jax.interop.hf_strategic import ClsAlignForCausalLM; "
        'ClsAlignForCausalLM.from_pretrained("DIR")`. clsalign-jax itself decodes the export with '
        "`python -m clsalign_jax.generate --checkpoint=DIR`."
      ),
      "",
      (
        "`generate` applies the run's strategic decoding: the prompt-time verdict (Rule 1: the refusal prefix is "
        "forced at once), re-classification while generating (Rules 2–3: a flip confirmed by τ malicious "
        "verdicts rolls the answer back to where it started and forces the refusal prefix), with the settings "
        "below (config.json's `clsalign` block). `input_ids` from `apply_chat_template` work too; the query span is "
        "found from the template's tokens around it. `model(...)` and `generate(..., strategic=False)` are the "
        "plain LM."
      ),
      "",
    ]
  lines += [
    "## Settings",
    "",
    "From `config.json` (`clsalign`), `generation_config.json` and `run_facts.json`"
    + (f"; checkpoint step {step}" if step is not None else "")
    + ".",
    "",
    "| setting | value |",
    "|---|---|",
  ]
  for key, value in card_settings(block, generation, facts).items():
    lines.append(f"| `{key}` | `{json.dumps(value, ensure_ascii=False)}` |")
  lines += ["", "## Measured figures", ""]
  if not figures.get("decoding") and not figures.get("cls_test"):
    lines += ["No evaluation report was found with the checkpoint: nothing here is measured.", ""]
  else:
    lines += [
      (
        f"Copied from the run's report (`{os.path.basename(figures['path'])}`, written by "
        "`python -m clsalign_jax.after_training`); rates as the report gives them, each with its number of prompts."
      ),
      "",
    ]
    if figures.get("cls_test"):
      t = figures["cls_test"]
      n = sum(int(t[k]) for k in ("tp", "fp", "fn", "tn"))
      lines += [
        (
          f"Prompt-time classification of held-out test prompts at threshold {facts.cls_threshold} "
          f"(n = {n}: {int(t['tp']) + int(t['fn'])} malicious, {int(t['fp']) + int(t['tn'])} benign): accuracy "
          f"{t['accuracy']}, precision {t['precision']}, recall {t['recall']}, F1 {t['F1']}."
        ),
        "",
      ]
    if figures.get("decoding"):
      for line in figures.get("sets", []):
        lines += [line, ""]
      lines += [
        "| variant | prompts | attack | metric | rate | n | refusal inserted |",
        "|---|---|---|---|---|---|---|",
      ]
      for row in figures["decoding"]:
        lines.append(
          f"| {row['variant']} | {row['prompts']} | {row['attack']} | {row['metric']} | {row['rate']} | "
          f"{row['n']} | {row['refusal inserted'] or '–'} |"
        )
      lines += [
        "",
        (
          "`strategic`: the safe model (what `generate` above does); `plain`: the same weights without "
          "re-classification or refusal insertion. ASR: share of malicious requests answered without a refusal "
          "keyword; over-refusal: share of benign requests refused."
        ),
        "",
      ]
  lines += [
    "## Files",
    "",
    (
      f"`model.safetensors` (the LM, loadable as a plain {family} model), `{CLS_FILE}` (the `[CLS]` row, head and "
      f"side path), `{CLS_META}` (their layout), `run_facts.json` (what the run was trained and decodes with), "
      f"`{REMOTE_CODE}` (the safe model class)."
    ),
    "",
  ]
  return "\n".join(lines)


def write_safe_export(directory: str, loaded, facts, cfg, tokenizer, template) -> None:
  """Add the remote code, the `clsalign` block, the generation config and the model card to the
  HF export in `directory` (written by hf.save_hf and artifacts.write_facts)."""
  dcfg = loaded.decode_config()
  block = clsalign_block(cfg, facts, dcfg, tokenizer, template)
  config_path = os.path.join(directory, "config.json")
  config = files.read_json(config_path)
  config[CONFIG_KEY] = block
  family = config.get("model_type", cfg.family)
  archs = config.get("architectures") or []
  cls_class = safe_class_name(archs[0]) if len(archs) == 1 else None
  if cls_class is not None:
    config["auto_map"] = {"AutoModelForCausalLM": f"{REMOTE_CODE[:-3]}.{cls_class}"}
    files.atomic_write(os.path.join(directory, REMOTE_CODE), remote_code_source())
  files.atomic_write_json(config_path, config, indent=2)

  generation = {
    "bos_token_id": cfg.bos_id,
    "eos_token_id": block["end_token_id"] if block["end_token_id"] is not None else cfg.eos_id,
    "do_sample": False,
    "max_new_tokens": dcfg.max_new_tokens,
  }
  if tokenizer is not None:
    generation["pad_token_id"] = tokenizer.pad_id
  files.atomic_write_json(os.path.join(directory, "generation_config.json"), generation, indent=2)

  report = os.path.join(loaded.spec.root, "report.md") if loaded.spec.kind == "run" else None
  card = model_card(
    os.path.basename(os.path.normpath(directory)), family, block, generation, facts, report_figures(report), loaded.step
  )
  files.atomic_write(os.path.join(directory, CARD), card)
