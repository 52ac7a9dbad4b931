"""Utility next to safety: over-refusal on benign prompts, GSM8K-format exact match, and
MMLU-format multiple choice by log-likelihood, on user-supplied files.

File formats:
  over_refusal  any benchmark spec (eval/benchmarks.py), e.g. the shipped benign I-Alpaca set
  gsm8k         JSONL {question, answer}; the gold number follows "####" in `answer`
  mmlu          headerless CSV rows (question, A, B, C, D, answer letter), as in the MMLU release,
                or JSONL {question, choices: [...], answer: index or letter}
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np

from clsalign_jax.eval.benchmarks import csv_rows, load_benchmark, read_text
from clsalign_jax.eval.judges import KeywordJudge
from clsalign_jax.eval.lm import Sampling, TargetModel

LETTERS = "ABCDEFGHIJ"


def over_refusal(model: TargetModel, queries: Sequence[str], judge: KeywordJudge, dcfg=None) -> tuple[dict, list]:
  """Share of benign prompts refused: by the refusal keywords (this includes an inserted refusal
  prefix, which contains them), and separately how often the CLS flagged or intervened."""
  gens = model.generate([model.encode(q) for q in queries], [Sampling()] * len(queries), dcfg=dcfg)
  records = [
    {
      "query": q,
      "response": g.response,
      "refused": judge.refused(g.response, q),
      "initial_malicious": g.initial_malicious,
      "refusal_inserted": g.refusal_inserted,
      "p_initial": g.p_initial,
    }
    for q, g in zip(queries, gens)
  ]
  n = len(records)
  mean = lambda key: sum(bool(r[key]) for r in records) / n if n else float("nan")
  return {
    "n": n,
    "over_refusal_rate": mean("refused"),
    "cls_flag_rate": mean("initial_malicious"),
    "refusal_inserted_rate": mean("refusal_inserted"),
    "judge": judge.name,
  }, records


# ----- GSM8K --------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
  text = text.replace(",", "").replace("$", "").strip().rstrip(".")
  try:
    value = float(text)
  except ValueError:
    return text
  return str(int(value)) if value == int(value) else str(value)


def extract_answer(text: str) -> str | None:
  """The number after the last "####", else the last number in the text."""
  if "####" in text:
    found = _NUMBER.findall(text.rsplit("####", 1)[1])
    if found:
      return normalize_number(found[0])
  found = _NUMBER.findall(text)
  return normalize_number(found[-1]) if found else None


@dataclasses.dataclass(frozen=True)
class MathItem:
  question: str
  answer: str  # the full solution; the gold number follows "####"

  @property
  def gold(self) -> str:
    return normalize_number(self.answer.rsplit("####", 1)[-1])


def load_gsm8k(path) -> list[MathItem]:
  items = []
  for n, line in enumerate(read_text(path).splitlines(), start=1):
    if line.strip():
      row = json.loads(line)
      if "####" not in row.get("answer", ""):
        raise ValueError(f"{path}:{n}: the answer has no '#### <number>' line")
      items.append(MathItem(row["question"], row["answer"]))
  return items


def gsm8k(
  model: TargetModel, items: Sequence[MathItem], fewshot: Sequence[MathItem] = (), dcfg=None
) -> tuple[dict, list]:
  """Greedy generation, exact match of the extracted final number. Few-shot examples go in the
  user turn as "Question: ... / Answer: ..." blocks."""
  shots = "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in fewshot)
  queries = [f"{shots}Question: {it.question}\nAnswer:" if shots else it.question for it in items]
  gens = model.generate([model.encode(q) for q in queries], [Sampling()] * len(queries), dcfg=dcfg)
  records = [
    {"question": it.question, "gold": it.gold, "response": g.response, "predicted": extract_answer(g.response)}
    for it, g in zip(items, gens)
  ]
  correct = sum(r["predicted"] == r["gold"] for r in records)
  return {"n": len(records), "exact_match": correct / len(records) if records else float("nan")}, records


# ----- MMLU ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
  question: str
  choices: tuple[str, ...]
  answer: int


def load_mmlu(path) -> list[ChoiceItem]:
  path = pathlib.Path(path)
  items = []
  if path.suffix.lower() == ".jsonl":
    for line in read_text(path).splitlines():
      if line.strip():
        row = json.loads(line)
        ans = row["answer"]
        items.append(
          ChoiceItem(row["question"], tuple(row["choices"]), LETTERS.index(ans) if isinstance(ans, str) else int(ans))
        )
    return items
  for line, row in csv_rows(path, header=False):
    if len(row) < 4 or row[-1].strip() not in LETTERS[: len(row) - 2]:
      raise ValueError(f"{path}:{line}: expected question, choices..., answer letter")
    items.append(ChoiceItem(row[0], tuple(row[1:-1]), LETTERS.index(row[-1].strip())))
  return items


def mmlu_prompt(item: ChoiceItem) -> str:
  options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
  return f"{item.question}{options}\nAnswer:"


def mmlu(model: TargetModel, items: Sequence[ChoiceItem], use_template: bool = False) -> tuple[dict, list]:
  """The choice whose letter continuation (" A", ...) is most likely. Without the template the
  prompt is fed raw, as lm-evaluation-harness does."""
  tok = model.tokenizer
  rows, conts = [], []
  for it in items:
    row = model.encode(mmlu_prompt(it), raw=not use_template)
    for i in range(len(it.choices)):
      rows.append(row)
      letter = f"{model.template.response_prefix}{LETTERS[i]}" if use_template else f" {LETTERS[i]}"
      conts.append(tok.encode_continuation(letter))
  logps = model.score(rows, conts).continuation_logprobs
  records, k = [], 0
  for it in items:
    scores = [float(np.sum(logps[k + i])) for i in range(len(it.choices))]
    k += len(it.choices)
    records.append(
      {"question": it.question, "answer": it.answer, "predicted": int(np.argmax(scores)), "logprobs": scores}
    )
  correct = sum(r["predicted"] == r["answer"] for r in records)
  return {"n": len(records), "accuracy": correct / len(records) if records else float("nan")}, records


# ----- specs --------------------------------------------------------------------------------------


def run_utility(model: TargetModel, spec: Mapping, dcfg) -> tuple[dict, list]:
  """`spec`: kind (over_refusal | gsm8k | mmlu), its file (`benchmark` spec for over_refusal,
  `path` otherwise), optional `limit`; gsm8k: `fewshot_path`, `num_fewshot`, `max_new_tokens`;
  over_refusal: `keywords` (a judges.KEYWORD_LISTS name); mmlu: `use_template`."""
  kind, limit = spec["kind"], spec.get("limit")
  if spec.get("max_new_tokens"):
    dcfg = dcfg.replace(max_new_tokens=spec["max_new_tokens"])
  if kind == "over_refusal":
    queries = [it.query for it in load_benchmark(spec["benchmark"])][:limit]
    return over_refusal(model, queries, KeywordJudge(spec.get("keywords", "advbench")), dcfg)
  if kind == "gsm8k":
    shots = load_gsm8k(spec["fewshot_path"])[: spec.get("num_fewshot", 5)] if spec.get("fewshot_path") else ()
    return gsm8k(model, load_gsm8k(spec["path"])[:limit], shots, dcfg)
  if kind == "mmlu":
    return mmlu(model, load_mmlu(spec["path"])[:limit], spec.get("use_template", False))
  raise ValueError(f"unknown utility kind {kind!r}; expected over_refusal, gsm8k or mmlu")
