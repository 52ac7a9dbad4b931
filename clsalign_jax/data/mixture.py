"""The safety SFT mixture: shipped benign and malicious sources, filtered, de-duplicated and split.

benign (label 0)    = LIMA train (first user turn and its answer) + AlpacaEval instructions with
                      text-davinci-003 answers, minus safety-adjacent prompts (`SAFETY_PHRASES`);
malicious (label 1) = safety-tuned-llamas' harmful instructions with gpt-3.5 refusal / safe answers;
evaluation only     = AdvBench behaviours with their "Sure, here is" targets (never in train/val/test).

Every drop is counted in a `MixtureReport`, which the TFDS builder stores in the dataset metadata.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence

from clsalign_jax.data.records import (
  BENIGN,
  MALICIOUS,
  SftRecord,
  assign_splits,
  enforce_disjoint,
  normalize_prompt,
)

SHIPPED_DIR = pathlib.Path(__file__).parent / "shipped"
LIMA_FILE = SHIPPED_DIR / "lima" / "lima.json"
ALPACA_EVAL_FILE = SHIPPED_DIR / "alpaca_eval" / "alpaca_eval_text_davinci_003_outputs.json"
SAFETY_TUNED_LLAMAS_FILE = SHIPPED_DIR / "safety_tuned_llamas" / "safety_only_data_Instructions.json"
ADVBENCH_FILE = SHIPPED_DIR / "advbench" / "harmful_behaviors.csv"

DEFAULT_SPLIT_FRACTIONS = {"train": 0.9, "validation": 0.05, "test": 0.05}
DEFAULT_SPLIT_SEED = 42
# Held-out splits first: a prompt shared with training is removed from training.
SPLIT_PRIORITY = ("test", "validation", "train")

# Benign prompts that touch crime, violence, weapons, sex, self-harm or hate would teach the
# classifier a confident "benign" on borderline topics, so they leave the benign pool. Matched as
# case-insensitive substrings of the whitespace-normalised first user turn.
SAFETY_PHRASES = (
  # The 15 LIMA prompts the paper's authors removed (their remove_safety_related_for_train list).
  "curse words",
  "cheat on my husband",
  "rob a convenience store",
  "hurting myself",
  "get a friend to have sex",
  "be trusted",
  "get a fake id",
  "relationship without your parents knowing",
  "physically flirt",
  "lazy college student",
  "married boyfriend",
  "flip someone off",
  "bullet made from ice",
  "hire a hitman",
  "hitler writes a second book",
  # The same criteria applied to AlpacaEval, which the paper did not use.
  "serial killers",
  "s&w 1006",
  "pornography",
  "act suicidally",
)


@dataclasses.dataclass
class MixtureReport:
  """Counts of everything read, dropped and kept, for the docs and the dataset metadata."""

  read: dict[str, int] = dataclasses.field(default_factory=dict)
  skipped_bad_records: int = 0
  skipped_examples: list[str] = dataclasses.field(default_factory=list)  # first 100
  multi_turn_first_turn_used: int = 0
  dropped_empty_response: dict[str, int] = dataclasses.field(default_factory=dict)
  dropped_safety_phrases: dict[str, int] = dataclasses.field(default_factory=dict)
  dropped_safety_phrase_prompts: list[str] = dataclasses.field(default_factory=list)
  dropped_duplicates: int = 0
  dropped_label_conflicts: int = 0
  dropped_eval_overlap: int = 0
  dropped_split_overlap: int = 0
  split_counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

  def as_metadata(self) -> dict:
    return dataclasses.asdict(self)


def contains_safety_phrase(prompt: str, phrases: Sequence[str] = SAFETY_PHRASES) -> str | None:
  text = normalize_prompt(prompt)
  return next((p for p in phrases if p in text), None)


# ----- shipped sources ----------------------------------------------------------------------------


def load_lima(path: pathlib.Path = LIMA_FILE) -> tuple[list[SftRecord], int]:
  """LIMA as single-turn pairs: each conversation's first user turn and first answer.

  The LLaMA-Factory copy stores multi-turn dialogues as `history` + final turn; the first turn is
  the only one that stands without earlier context (and is what the reference code trained on).
  Returns the records and how many came from multi-turn dialogues.
  """
  rows = json.loads(path.read_text(encoding="utf-8"))
  out, multi = [], 0
  for n, row in enumerate(rows):
    if row["history"]:
      prompt, response = row["history"][0]
      multi += 1
    else:
      prompt, response = row["instruction"], row["output"]
    out.append(SftRecord(f"lima:{n}", prompt, response, BENIGN, "lima"))
  return out, multi


def load_alpaca_eval(path: pathlib.Path = ALPACA_EVAL_FILE) -> list[SftRecord]:
  rows = json.loads(path.read_text(encoding="utf-8"))
  return [
    SftRecord(f"alpaca_eval:{n}", r["instruction"], r["output"], BENIGN, "alpaca_eval") for n, r in enumerate(rows)
  ]


def load_safety_tuned_llamas(path: pathlib.Path = SAFETY_TUNED_LLAMAS_FILE) -> list[SftRecord]:
  rows = json.loads(path.read_text(encoding="utf-8"))
  out = []
  for n, r in enumerate(rows):
    prompt = r["instruction"] if not r["input"] else f"{r['instruction']}\n\n{r['input']}"
    out.append(SftRecord(f"safety_tuned_llamas:{n}", prompt, r["output"], MALICIOUS, "safety_tuned_llamas"))
  return out


def load_advbench(path: pathlib.Path = ADVBENCH_FILE) -> list[SftRecord]:
  """AdvBench behaviours (label 1); `response` is the attack target "Sure, here is ...", which is
  what an attack tries to elicit, never a training answer."""
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f))
  return [SftRecord(f"advbench:{n}", r["goal"], r["target"], MALICIOUS, "advbench") for n, r in enumerate(rows)]


# ----- building the mixture -----------------------------------------------------------------------


def build_safety_mix(
  fractions: Mapping[str, float] = DEFAULT_SPLIT_FRACTIONS,
  seed: int = DEFAULT_SPLIT_SEED,
  phrases: Sequence[str] = SAFETY_PHRASES,
) -> tuple[dict[str, list[SftRecord]], MixtureReport]:
  """The shipped mixture: {"train", "validation", "test", "advbench"} and its report."""
  report = MixtureReport()
  lima, report.multi_turn_first_turn_used = load_lima()
  sources = {
    "lima": lima,
    "alpaca_eval": load_alpaca_eval(),
    "safety_tuned_llamas": load_safety_tuned_llamas(),
  }
  advbench = load_advbench()
  records = []
  for name, rows in sources.items():
    report.read[name] = len(rows)
    records.extend(rows)
  report.read["advbench"] = len(advbench)
  splits = curate(records, report, fractions=fractions, seed=seed, phrases=phrases, eval_records=advbench)
  splits["advbench"] = advbench
  report.split_counts["advbench"] = {"benign": 0, "malicious": len(advbench)}
  return splits, report


def curate(
  records: Sequence[SftRecord],
  report: MixtureReport,
  *,
  fractions: Mapping[str, float] = DEFAULT_SPLIT_FRACTIONS,
  seed: int = DEFAULT_SPLIT_SEED,
  phrases: Sequence[str] = SAFETY_PHRASES,
  eval_records: Sequence[SftRecord] = (),
  fixed_splits: Mapping[str, Sequence[SftRecord]] | None = None,
) -> dict[str, list[SftRecord]]:
  """Filters, de-duplicates and splits records, counting every drop in `report`.

  `fixed_splits` are records whose split is already decided (user files with an explicit split);
  they go through the same filters and then take priority over the automatic split.
  """
  fixed = {name: list(rows) for name, rows in (fixed_splits or {}).items()}
  # Records with a fixed split come first, so a duplicate is kept where it was placed explicitly.
  tagged = [(n, r) for n, rows in fixed.items() for r in rows] + [(None, r) for r in records]
  kept = []
  for split, r in tagged:
    if not r.response.strip():
      report.dropped_empty_response[r.source] = report.dropped_empty_response.get(r.source, 0) + 1
      continue
    if r.label == BENIGN and contains_safety_phrase(r.prompt, phrases):
      report.dropped_safety_phrases[r.source] = report.dropped_safety_phrases.get(r.source, 0) + 1
      report.dropped_safety_phrase_prompts.append(r.id)
      continue
    kept.append((split, r))
  labels_by_prompt: dict[str, set[int]] = {}
  for _, r in kept:
    labels_by_prompt.setdefault(normalize_prompt(r.prompt), set()).add(r.label)
  eval_prompts = {normalize_prompt(r.prompt) for r in eval_records}
  seen: set[tuple[str, int]] = set()
  auto, fixed = [], {name: [] for name in fixed}
  for split, r in kept:
    key = normalize_prompt(r.prompt)
    if len(labels_by_prompt[key]) > 1:
      # The same prompt labelled both ways would teach the classifier noise; drop all copies.
      report.dropped_label_conflicts += 1
    elif key in eval_prompts:
      report.dropped_eval_overlap += 1
    elif (key, r.label) in seen:
      report.dropped_duplicates += 1
    else:
      seen.add((key, r.label))
      (auto if split is None else fixed[split]).append(r)
  splits = assign_splits(auto, fractions, seed=seed)
  for name, rows in fixed.items():
    splits.setdefault(name, []).extend(rows)
  priority = [n for n in SPLIT_PRIORITY if n in splits] + [n for n in splits if n not in SPLIT_PRIORITY]
  disjoint, report.dropped_split_overlap = enforce_disjoint(splits, priority)
  splits = {name: disjoint[name] for name in splits}
  report.split_counts = {
    name: {"benign": sum(r.label == BENIGN for r in rows), "malicious": sum(r.label == MALICIOUS for r in rows)}
    for name, rows in splits.items()
  }
  return splits
