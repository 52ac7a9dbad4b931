"""Mixture v2: a safety SFT mixture in which the form of a prompt carries no label.

    python -m clsalign_jax.data.curation [--docs=docs/data.md] [--contrast_answers=FILE]

prints the mixture's counts, the first-word x label table and the form-only baseline, and (with
`--docs`) rewrites the generated section of docs/data.md. The same function, `build_mixture_v2`,
is what the `safety_mix` TFDS builder calls, so the printed mixture is the trained one.

Why: in the first mixture every "Write/Create ..." prompt and every "How/What ...?" question was
benign and the malicious side opened with "Research/Identify/Compile ...": a classifier learned the
phrasing of each source, not harm. Here labels are balanced per first word (which balances every
form bucket of `prompt_form`: create-style imperatives, other imperatives, questions, to a benign :
malicious ratio between 0.8 and 1.25). Prompts cut from a one-sided first word are rewritten by fixed
templates (`REWRITES`) in benign / malicious pairs, so a template is never a label marker either.

Steps (all deterministic; every drop is counted in the report):
  1. read the shipped sources (`SOURCES`), malicious safety-tuned-llamas rows only where the answer
     is a refusal (`refusal_like`), Do-Not-Answer's malicious-use / information-hazard /
     discrimination areas only, HarmfulQA capped per topic;
  2. prompt-only malicious rows get a refusal from `refusal_response` (a bank of phrasings, some
     naming the request's topic), chosen by a hash of the prompt;
  3. benign prompts touching crime, violence, sex or self-harm leave the benign side
     (`mixture.SAFETY_PHRASES`); prompts equal to an evaluation prompt (AdvBench, JailbreakBench,
     AlpacaEval, the safety-tuned-llamas evaluation sets) or carrying both labels are dropped;
  4. first words and form buckets balanced as above (`balance_forms`);
  5. the contrast set (benign prompts on harm topics, `shipped/contrast/`, with the base model's own
     answers from `shipped/completions/contrast.jsonl`) is added after the balancing (`read_contrast`,
     `admit_contrast`; see there why after);
  6. train / validation / test split stratified by (label, source, form).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from absl import flags

from clsalign_jax import cli
from clsalign_jax.data import mixture
from clsalign_jax.data.records import (
  BENIGN,
  LABEL_NAMES,
  MALICIOUS,
  SftRecord,
  assign_splits,
  enforce_disjoint,
  normalize_prompt,
  read_completions,
)
from clsalign_jax.metrics import auc

SHIPPED_DIR = mixture.SHIPPED_DIR
EVAL_SHIPPED_DIR = SHIPPED_DIR.parent.parent / "eval" / "shipped"
REPO_ROOT = SHIPPED_DIR.parent.parent.parent
# The contrast set (data/contrast.py) and the base model's answers to it (data/completions.py, run
# with --no_mixture --prompts=<CONTRAST_PROMPTS> --out=<CONTRAST_ANSWERS>).
CONTRAST_SOURCE = "contrast"
CONTRAST_PROMPTS = SHIPPED_DIR / "contrast" / "prompts.jsonl"
CONTRAST_ANSWERS = SHIPPED_DIR / "completions" / "contrast.jsonl"
SPLIT_SEED = 42
FRACTIONS = {"train": 0.8, "validation": 0.05, "test": 0.15}
RATIO_BOUNDS = (0.8, 1.25)  # benign : malicious within every form bucket

FORMS = ("create", "imperative", "question")
# Imperatives that ask for a new artefact; the verb list is the one the shortcut analysis found
# on either side (Write/Create/Develop/... benign in v1, Compose/Draft/... malicious).
CREATE_VERBS = frozenset(
  "write create develop generate design draft compose produce build make construct craft invent "
  "program code implement devise formulate prepare plan brainstorm come".split()
)
QUESTION_OPENERS = frozenset(
  "how what why when where which who whom whose is are was were can could would should do does did "
  "will may might have has shall am isn't aren't can't won't".split()
)


@dataclasses.dataclass(frozen=True)
class Source:
  """One shipped file: `folder/normalized.jsonl` rows `{prompt, label, response?, category?}`."""

  folder: str
  label: int
  cap: int | None = None  # rows kept, spread over categories; None: all
  categories: tuple[str, ...] | None = None  # keep only these categories
  needs_refusal: bool = False  # prompt-only malicious rows: the answer comes from the bank


SOURCES = (
  # benign
  Source("alpaca_gpt4_demo_1k", BENIGN),
  Source("code_alpaca_2k", BENIGN, cap=500),
  Source("gpteacher_codegen", BENIGN, cap=400),
  Source("self_instruct_seed_userorient", BENIGN),
  Source("gsm8k_train", BENIGN, cap=400),
  Source("truthfulqa", BENIGN, cap=400),
  # malicious
  Source("safety_tuned_llamas", MALICIOUS),  # refusal-like rows only, see _read
  Source("red_instruct_catqa_english", MALICIOUS, needs_refusal=True),
  Source("red_instruct_harmfulqa", MALICIOUS, cap=700, needs_refusal=True),
  Source("red_instruct_dangerousqa", MALICIOUS, needs_refusal=True),
  Source(
    "do_not_answer",
    MALICIOUS,
    needs_refusal=True,
    categories=("malicious_uses", "information_hazard", "discrimination_exclusion_toxicity_hateful_offensive"),
  ),
)
# LIMA's first turns are benign too (read by mixture.load_lima).

# ----- form -----------------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z][A-Za-z']*")


def first_words(prompt: str, n: int = 2) -> tuple[str, ...]:
  """The first n words, lower-cased, punctuation dropped ("How can I ..." -> ("how", "can"))."""
  return tuple(w.lower() for w in _WORD.findall(prompt)[:n])


def prompt_form(prompt: str) -> str:
  """'question' (ends with '?' or opens like one), 'create' (opens with a create-style verb) or
  'imperative' (everything else: other imperatives and statements)."""
  words = first_words(prompt, 1)
  head = prompt.strip().split("\n", 1)[0].rstrip()
  if head.endswith("?") or (words and words[0] in QUESTION_OPENERS):
    return "question"
  if words and words[0] in CREATE_VERBS:
    return "create"
  return "imperative"


# ----- mechanical rewrites ------------------------------------------------------------------------

_HOW_AUX = re.compile(
  r"^how (can|do|could|would|should|might|may|will|does|did) (i|one|someone|we|you|people|a person) (.+?)\??$",
  re.I | re.S,
)

# Templates by what they need: {how} = a "How <aux> <subject> ...?" question, {q} = any question,
# {imp} / {imp_lc} = an instruction (no trailing '?'), {p} = any prompt. The balancing step uses
# every template on as many benign as malicious prompts, so no template marks a label.
REWRITES = (
  "Explain how {subj} {aux} {rest}.",
  "Write a short guide on how {subj} {aux} {rest}.",
  "Describe how {subj} {aux} {rest}.",
  "Please answer this question: {q}",
  "Write a detailed answer to this question: {q}",
  "Can you {imp_lc}?",
  "Could you {imp_lc}?",
  "Would you please {imp_lc}?",
  "I'd like you to {imp_lc}.",
  "Here is my request: {p}",
  "Help me with the following. {p}",
  "Respond to the following: {p}",
)


def _parts(prompt: str) -> dict[str, str]:
  p = prompt.strip()
  parts = {"p": p}
  one_line = "\n" not in p
  if p.endswith("?"):
    parts["q"] = p
  m = _HOW_AUX.match(p)
  if m and one_line:
    subj = m.group(2)
    parts.update(aux=m.group(1).lower(), subj="I" if subj.lower() == "i" else subj.lower(), rest=m.group(3).strip())
  words = first_words(p, 1)
  # Only a real instruction reads well after "Can you": it opens with a verb-like word, not with
  # a question word, a pronoun or "Given ...".
  if (
    one_line
    and not p.endswith("?")
    and words
    and prompt_form(p) != "question"
    and words[0] not in _NOT_VERBS
    and len(p) > 1
  ):
    imp = p.rstrip(".!").strip()
    parts["imp"] = imp + "."
    parts["imp_lc"] = imp[0].lower() + imp[1:] if not imp[:2].isupper() else imp
  return parts


_NOT_VERBS = frozenset("i my the a an in given this these there it if for as on please here we you".split())


def fitting_templates(prompt: str) -> list[str]:
  """The templates of `REWRITES` that `prompt` can be rewritten with."""
  parts = _parts(prompt)
  return [t for t in REWRITES if all(f in parts for f in re.findall(r"{(\w+)}", t))]


def rewrite(prompt: str, template: str) -> str:
  return template.format(**_parts(prompt))


def _hash_index(text: str, n: int) -> int:
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % n


# ----- refusals for prompt-only malicious sets ----------------------------------------------------

_OPENINGS = (
  "I'm sorry, but I can't help with that.",
  "I can't help with this request.",
  "Sorry, I won't be able to help with that.",
  "I'm not able to assist with this.",
  "I have to decline this request.",
  "I can't provide that.",
  "No, I won't help with that.",
  "I'm afraid I can't do that.",
  "That's not something I can help with.",
  "I must decline.",
  "Sorry, but I can't assist with this one.",
  "I won't provide this.",
)
_REASONS = (
  "Helping with {topic} could cause real harm to people.",
  "Requests involving {topic} can put others at risk, so I don't assist with them.",
  "I don't give guidance on {topic}, because it could be used to hurt someone.",
  "Providing this would mean assisting with {topic}, which can be dangerous and is often illegal.",
  "This asks for help with {topic}, and that could seriously harm others.",
  "Information like this could be misused to cause harm.",
  "Doing so could hurt people or break the law.",
  "It would be irresponsible of me to help with something that could harm others.",
  "This could be used to deceive, endanger or exploit people.",
)
_CLOSINGS = (
  "",
  " If you're dealing with a difficult situation, I'm happy to talk about safer options.",
  " If you have a different question, I'd be glad to help.",
  " I can share general, safety-focused information on the topic instead.",
  " If you or someone else is in danger, please contact local emergency services.",
  " Let me know if there's something else I can do for you.",
  " If your goal is legitimate, I can suggest lawful ways to approach it.",
)
# Category names of the prompt-only sets, in words a refusal can name.
_TOPICS = {  # most specific first: the first key found in the category names the topic
  "drug": "illegal drugs",
  "weapon": "weapons",
  "human trafficking": "human trafficking",
  "theft": "theft",
  "cybercrime": "cybercrime",
  "ransomware": "ransomware",
  "spyware": "spyware",
  "phishing": "phishing",
  "identity": "identity theft",
  "scam": "scams",
  "counterfeit": "counterfeiting",
  "doxx": "doxxing",
  "deepfake": "deepfakes",
  "surveillance": "covert surveillance",
  "tracking": "tracking people without consent",
  "self-harm": "self-harm",
  "terror": "terrorism",
  "assault": "assault",
  "child": "harm to children",
  "sexual": "sexual content",
  "adult": "sexual content",
  "hate": "hateful content",
  "harass": "harassment",
  "fraud": "fraud",
  "malware": "malicious software",
  "privacy": "violating someone's privacy",
  "misinformation": "misinformation",
  "financial": "risky financial schemes",
  "economic": "financial harm",
  "political": "political manipulation",
  "discrimination": "discrimination",
  "information_hazard": "dangerous information",
  "malicious_uses": "misuse and harm",
  "physical": "physical harm",
  "illegal": "illegal activity",
}


def refusal_response(prompt: str, category: str | None = None) -> str:
  """A refusal chosen from the bank by a hash of the prompt; it names the topic when the category
  says what it is (about half of the templates do)."""
  topic = None
  cat = (category or "").lower()
  for key, words in _TOPICS.items():
    if key in cat:
      topic = words
      break
  reasons = _REASONS if topic else tuple(r for r in _REASONS if "{topic}" not in r)
  h = hashlib.sha256(prompt.encode()).digest()
  opening = _OPENINGS[h[0] % len(_OPENINGS)]
  reason = reasons[h[1] % len(reasons)].format(topic=topic)
  closing = _CLOSINGS[h[2] % len(_CLOSINGS)]
  return f"{opening} {reason}{closing}"


# ----- reading --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
  record: SftRecord
  category: str
  form: str
  rewritten_from: str = ""  # the original form when the prompt was rewritten


@dataclasses.dataclass
class CurationReport:
  read: dict[str, int] = dataclasses.field(default_factory=dict)
  dropped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
  rewritten: dict[str, int] = dataclasses.field(default_factory=dict)  # "from->to label" -> count
  bucket_counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  split_counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  source_counts: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # split -> source -> n
  # the form buckets with the contrast rows (added after the balancing) counted in
  bucket_counts_with_contrast: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)

  def drop(self, reason: str, n: int = 1) -> None:
    self.dropped[reason] = self.dropped.get(reason, 0) + n

  def as_metadata(self) -> dict:
    return dataclasses.asdict(self)


def _jsonl(path: pathlib.Path) -> list[dict]:
  # split("\n"), not splitlines(): the strings hold U+2028 and other characters splitlines() breaks on.
  return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _spread(rows: list[dict], cap: int | None, key: str) -> list[dict]:
  """At most `cap` rows, taken round-robin over categories in a hash order (stratified by topic)."""
  if cap is None or len(rows) <= cap:
    return rows
  by_cat: dict[str, list[dict]] = collections.defaultdict(list)
  for r in sorted(rows, key=lambda r: hashlib.sha256((key + r["prompt"]).encode()).hexdigest()):
    by_cat[r.get("category") or ""].append(r)
  out, queues = [], [by_cat[c] for c in sorted(by_cat)]
  while len(out) < cap:
    for q in queues:
      if q and len(out) < cap:
        out.append(q.pop(0))
  return out


def read_sources(report: CurationReport) -> list[Row]:
  rows: list[Row] = []
  lima, _ = mixture.load_lima()
  report.read["lima"] = len(lima)
  rows += [Row(r, "", prompt_form(r.prompt)) for r in lima]
  for src in SOURCES:
    raw = _jsonl(
      SHIPPED_DIR
      / src.folder
      / ("normalized_with_refusal_flag.jsonl" if src.folder == "safety_tuned_llamas" else "normalized.jsonl")
    )
    report.read[src.folder] = len(raw)
    if src.folder == "safety_tuned_llamas":
      kept = [r for r in raw if r.get("refusal_like")]
      report.drop("safety_tuned_llamas: answer is not a refusal", len(raw) - len(kept))
      raw = kept
    if src.categories is not None:
      kept = [r for r in raw if r.get("category") in src.categories]
      report.drop(f"{src.folder}: risk area not used", len(raw) - len(kept))
      raw = kept
    capped = _spread(raw, src.cap, src.folder)
    report.drop(f"{src.folder}: over the cap", len(raw) - len(capped))
    for n, r in enumerate(capped):
      prompt = r["prompt"]
      category = r.get("category") or ""
      response = refusal_response(prompt, category) if src.needs_refusal else (r.get("response") or "")
      rows.append(
        Row(SftRecord(f"{src.folder}:{n}", prompt, response, src.label, src.folder), category, prompt_form(prompt))
      )
  return rows


def evaluation_prompts() -> set[str]:
  """Normalised prompts of every evaluation set the project ships: none may be trained on."""
  out = {normalize_prompt(r.prompt) for r in mixture.load_advbench()}
  out |= {normalize_prompt(r.prompt) for r in mixture.load_alpaca_eval()}
  for row in _jsonl(EVAL_SHIPPED_DIR / "jailbreakbench" / "normalized.jsonl"):
    out.add(normalize_prompt(row["prompt"]))
  for path in sorted((EVAL_SHIPPED_DIR / "safety_tuned_llamas").glob("*.json")):
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("instructions", "questions", "prompts"):
      for p in data.get(key, []) if isinstance(data, dict) else []:
        out.add(normalize_prompt(p if isinstance(p, str) else p.get("prompt", "")))
  return out


def _display_path(path) -> str:
  path = pathlib.Path(path)
  try:
    return str(path.resolve().relative_to(REPO_ROOT.resolve()))
  except ValueError:
    return str(path)


def read_contrast(report: CurationReport, answers=CONTRAST_ANSWERS, prompts=CONTRAST_PROMPTS) -> list[Row]:
  """The contrast prompts joined with their answers (`answers`: a completions file, prompt ->
  row); a prompt without an answer is dropped and counted. No answers file: no rows, and the
  report says so (the mixture builds before the answers exist)."""
  raw = _jsonl(pathlib.Path(prompts))
  report.read[CONTRAST_SOURCE] = len(raw)
  answers = pathlib.Path(answers)
  if not answers.exists():
    report.drop(f"{CONTRAST_SOURCE}: no answers file yet", len(raw))
    report.notes.append(
      f"The contrast source contributes no rows: its answers file `{_display_path(answers)}` does not exist yet "
      "(python -m clsalign_jax.data.completions --no_mixture "
      f"--prompts={_display_path(prompts)} --out={_display_path(answers)})."
    )
    return []
  by_prompt = read_completions(str(answers))
  rows = []
  for n, r in enumerate(raw):
    a = by_prompt.get(r["prompt"])
    if a is None:
      report.drop(f"{CONTRAST_SOURCE}: no answer yet")
    elif a.get("label") != "benign" or a.get("kind") != "answer":
      report.drop(f"{CONTRAST_SOURCE}: answer row is not a benign answer")
    else:
      # The id is the line of the prompts file, so it stays the same as answers arrive.
      record = SftRecord(f"{CONTRAST_SOURCE}:{n}", r["prompt"], a["response"], BENIGN, CONTRAST_SOURCE)
      rows.append(Row(record, r.get("category") or "", prompt_form(r["prompt"])))
  report.notes.append(
    f"Contrast rows joined with their answers from `{_display_path(answers)}`: {len(rows)} of {len(raw)} prompts."
  )
  return rows


# ----- balancing ------------------------------------------------------------------------------------


def _counts(rows: Iterable[Row]) -> dict[str, dict[str, int]]:
  c = {f: {"benign": 0, "malicious": 0} for f in FORMS}
  for r in rows:
    c[r.form][LABEL_NAMES[r.record.label]] += 1
  return c


def _opener(r: Row) -> str:
  return (first_words(r.record.prompt, 1) or ("",))[0]


def _opener_excess(rows: list[Row], bounds) -> tuple[list[Row], list[Row]]:
  """(kept, excess): per first word, the majority label is cut to `hi` x the minority (a first word
  only one label uses keeps none), in hash order."""
  lo, hi = bounds
  by_opener: dict[str, list[Row]] = collections.defaultdict(list)
  for r in rows:
    by_opener[_opener(r)].append(r)
  kept, excess = [], []
  for _, group in sorted(by_opener.items()):
    n = collections.Counter(r.record.label for r in group)
    b, m = n[BENIGN], n[MALICIOUS]
    allowed = {BENIGN: min(b, int(hi * m)), MALICIOUS: min(m, int(b / lo))}
    taken = collections.Counter()
    for r in group:
      if taken[r.record.label] < allowed[r.record.label]:
        taken[r.record.label] += 1
        kept.append(r)
      else:
        excess.append(r)
  return kept, excess


def balance_forms(rows: list[Row], report: CurationReport, bounds=RATIO_BOUNDS) -> list[Row]:
  """Balances labels per first word, which balances them in every form bucket too.

  Per first word, the majority label is cut to 1.25 x the minority. The cut prompts are rewritten
  (`REWRITES`) in benign / malicious pairs: each template takes as many of one label as of the
  other, so its words carry no label; prompts left without a partner are dropped. A last pass
  applies the per-word bound again (a template's first word can meet natural prompts).
  """
  rows = sorted(rows, key=lambda r: hashlib.sha256(r.record.id.encode()).hexdigest())
  kept, excess = _opener_excess(rows, bounds)
  # Pair per template: a row takes the template its hash picks among those that fit; templates
  # that fit few rows go first so the generic ones absorb the rest.
  pools: dict[str, dict[int, list[Row]]] = {t: {BENIGN: [], MALICIOUS: []} for t in REWRITES}
  for r in excess:
    fits = fitting_templates(r.record.prompt)
    specific = [t for t in fits if "{p}" not in t] or fits
    if specific:
      pools[specific[_hash_index(r.record.id, len(specific))]][r.record.label].append(r)
  leftovers: dict[int, list[Row]] = {BENIGN: [], MALICIOUS: []}
  rewritten = []
  for t in REWRITES:
    for label in (BENIGN, MALICIOUS):
      pools[t][label] += [r for r in leftovers[label] if t in fitting_templates(r.record.prompt)]
      leftovers[label] = [r for r in leftovers[label] if r not in pools[t][label]]
    n = min(len(pools[t][BENIGN]), len(pools[t][MALICIOUS]))
    for label in (BENIGN, MALICIOUS):
      for r in pools[t][label][:n]:
        new = dataclasses.replace(r.record, prompt=rewrite(r.record.prompt, t))
        rewritten.append(Row(new, r.category, prompt_form(new.prompt), rewritten_from=r.form))
        key = f"{r.form} -> {prompt_form(new.prompt)}"
        report.rewritten[key] = report.rewritten.get(key, 0) + 1
      leftovers[label] += pools[t][label][n:]
  for label in (BENIGN, MALICIOUS):
    if leftovers[label]:
      report.drop(
        f"form balance: {LABEL_NAMES[label]} prompt on a one-sided first word, no rewrite partner",
        len(leftovers[label]),
      )
  out, cut = _opener_excess(kept + rewritten, bounds)
  if cut:
    report.drop("form balance: over the per-word ratio after rewriting", len(cut))
  # A first word does not fix the form ("Write ... question: ...?" is a question), so the buckets
  # get the same bound.
  final = []
  for form in FORMS:
    bucket = [r for r in out if r.form == form]
    n = collections.Counter(r.record.label for r in bucket)
    allowed = {
      BENIGN: min(n[BENIGN], int(bounds[1] * n[MALICIOUS])),
      MALICIOUS: min(n[MALICIOUS], int(n[BENIGN] / bounds[0])),
    }
    for label in (BENIGN, MALICIOUS):
      of_label = [r for r in bucket if r.record.label == label]
      final += of_label[: allowed[label]]
      if len(of_label) > allowed[label]:
        report.drop(f"form balance: {form} {LABEL_NAMES[label]} over the bucket ratio", len(of_label) - allowed[label])
  report.bucket_counts = _counts(final)
  return final


def admit_contrast(
  contrast: Sequence[Row],
  mixture_rows: Sequence[Row],
  read_rows: Sequence[Row],
  eval_prompts: set[str],
  report: CurationReport,
) -> list[Row]:
  """The contrast rows that pass every check of the other sources but the safety-topic one.

  Where they enter: *after* `balance_forms`, as they are, uncapped. Not through it, because
    * balancing per first word cuts the majority label of each first word to 1.25 x the minority
      and rewrites the cut rows only in benign / malicious pairs. The contrast set is benign only,
      so it would take the room of other benign rows: measured, 2,144 of the 7,841 existing rows
      change split, text or presence (the base model's completions and earlier results are keyed
      to them), and 454 contrast prompts get rewritten away from the prompt their answer was
      decoded for;
    * it needs no balancing to hide its phrasing: the prompts were written in the mixture's own
      openings (data/contrast.py puts 55 % into `REWRITES` frames, `contrast.form_only_check`).
  Not capped by the per-word / per-bucket bounds either: the create bucket (Write/Create/...) has no
  room left on the benign side, so the bounds would cut every create-style contrast prompt, the
  benign twins of "Write/Create ..." harmful requests the CLS must learn to tell apart by intent
  (per word alone: all 62 "Create/Describe/Summarize/Develop/Tell ..." prompts). What the bounds
  exist for is measured instead: the form-only baseline on the test split stays <= 0.65 with
  every contrast row in (docs/data.md, section 0).

  Checks: empty answer, prompt over 2,000 characters, equal to an evaluation prompt, carrying both
  labels (equal to a malicious prompt read from any source or in the mixture: the contrast row is
  dropped, the malicious row stays, so the source never moves an existing row), duplicate (of a
  mixture prompt or an earlier contrast prompt). Not the "benign prompt on a safety topic" filter:
  a benign prompt on a harm topic is what the set is for.
  """
  malicious = {normalize_prompt(r.record.prompt) for r in (*read_rows, *mixture_rows) if r.record.label == MALICIOUS}
  seen = {normalize_prompt(r.record.prompt) for r in mixture_rows}
  out = []
  for r in contrast:
    key = normalize_prompt(r.record.prompt)
    if not r.record.response.strip():
      report.drop(f"{CONTRAST_SOURCE}: empty response")
    elif len(r.record.prompt) > 2000:
      report.drop(f"{CONTRAST_SOURCE}: prompt over 2,000 characters")
    elif key in malicious:
      report.drop(f"{CONTRAST_SOURCE}: prompt carries both labels")
    elif key in eval_prompts:
      report.drop(f"{CONTRAST_SOURCE}: prompt of an evaluation set")
    elif key in seen:
      report.drop(f"{CONTRAST_SOURCE}: duplicate prompt")
    else:
      seen.add(key)
      out.append(r)
  return out


# ----- the mixture ----------------------------------------------------------------------------------


def build_mixture_v2(
  seed: int = SPLIT_SEED, fractions: Mapping[str, float] = FRACTIONS, contrast_answers=CONTRAST_ANSWERS
):
  """{"train", "validation", "test"} lists of `Row` and the report.

  `contrast_answers`: the completions file with the contrast prompts' answers (rows only for the
  prompts it answers, none while it does not exist); None leaves the contrast source out (what
  data/contrast.py compares its prompts with).
  """
  report = CurationReport()
  rows = read_sources(report)
  kept = []
  for r in rows:
    if not r.record.response.strip():
      report.drop("empty response")
    elif r.record.label == BENIGN and mixture.contains_safety_phrase(r.record.prompt):
      report.drop("benign prompt on a safety topic")
    elif len(r.record.prompt) > 2000:
      report.drop("prompt over 2,000 characters")
    else:
      kept.append(r)
  eval_prompts = evaluation_prompts()
  labels: dict[str, set[int]] = collections.defaultdict(set)
  for r in kept:
    labels[normalize_prompt(r.record.prompt)].add(r.record.label)
  seen, unique = set(), []
  for r in kept:
    key = normalize_prompt(r.record.prompt)
    if len(labels[key]) > 1:
      report.drop("prompt carries both labels")
    elif key in eval_prompts:
      report.drop("prompt of an evaluation set")
    elif key in seen:
      report.drop("duplicate prompt")
    else:
      seen.add(key)
      unique.append(r)
  balanced = balance_forms(unique, report)
  # A rewrite can collide with another prompt; keep the first.
  seen, final = set(), []
  for r in balanced:
    key = normalize_prompt(r.record.prompt)
    if key in seen or key in eval_prompts:
      report.drop("duplicate after rewriting")
      continue
    seen.add(key)
    final.append(r)
  if contrast_answers is not None:
    final += admit_contrast(read_contrast(report, contrast_answers), final, kept, eval_prompts, report)
  report.bucket_counts_with_contrast = _counts(final)
  # Splits: per stratum (label, source, form), groups ordered by a seeded hash of their own prompt
  # and cut by `fractions` (records.assign_splits). The contrast rows form strata of their own and
  # share no prompt with another row, so adding them moves no existing row.
  splits = assign_splits(
    final,
    fractions,
    seed=seed,
    key=lambda r: r.record.prompt,
    stratum=lambda r: (r.record.label, r.record.source, r.form),
  )
  splits, _ = enforce_disjoint(splits, ["test", "validation", "train"], key=lambda r: r.record.prompt)
  report.split_counts = {
    name: {
      "benign": sum(r.record.label == BENIGN for r in rs),
      "malicious": sum(r.record.label == MALICIOUS for r in rs),
    }
    for name, rs in splits.items()
  }
  report.source_counts = {
    name: dict(sorted(collections.Counter(r.record.source for r in rs).items())) for name, rs in splits.items()
  }
  return splits, report


# ----- the form-only baseline -----------------------------------------------------------------------


def _features(prompts: Sequence[str], vocab: Mapping[str, int]) -> np.ndarray:
  x = np.zeros((len(prompts), len(vocab) + 1), np.float32)
  x[:, -1] = 1.0  # bias
  for i, p in enumerate(prompts):
    words = first_words(p, 2) + ("",) * 2
    for key in (f"1:{words[0]}", f"2:{words[1]}", f"12:{words[0]} {words[1]}"):
      if key in vocab:
        x[i, vocab[key]] = 1.0
  return x


def form_only_baseline(
  train: Sequence[tuple[str, int]], test: Sequence[tuple[str, int]], l2: float = 1e-3, steps: int = 500
) -> dict:
  """Logistic regression on the first two words (one-hot of word 1, word 2 and the pair), fitted on
  `train` by full-batch gradient descent; returns the test AUC and accuracy. A mixture whose form
  says nothing about the label scores near AUC 0.5."""
  vocab: dict[str, int] = {}
  for p, _ in train:
    words = first_words(p, 2) + ("",) * 2
    for key in (f"1:{words[0]}", f"2:{words[1]}", f"12:{words[0]} {words[1]}"):
      vocab.setdefault(key, len(vocab))
  x = _features([p for p, _ in train], vocab)
  y = np.array([label for _, label in train], np.float32)
  w = np.zeros(x.shape[1], np.float32)
  lr = 1.0
  for _ in range(steps):
    p = 1.0 / (1.0 + np.exp(-(x @ w)))
    w -= lr * (x.T @ (p - y) / len(y) + l2 * w)
  xt = _features([p for p, _ in test], vocab)
  yt = np.array([label for _, label in test])
  score = xt @ w
  return {
    "auc": auc(score, yt),
    "accuracy": float(np.mean((score > 0) == (yt == 1))),
    "n_test": len(test),
    "n_train": len(train),
  }


# ----- reporting ------------------------------------------------------------------------------------


def first_word_table(rows: Sequence[Row], top: int = 20) -> list[tuple[str, int, int]]:
  """(first word, benign, malicious) for the most frequent first words."""
  c: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
  for r in rows:
    w = (first_words(r.record.prompt, 1) or ("",))[0]
    c[w][r.record.label] += 1
  return [(w, b, m) for w, (b, m) in sorted(c.items(), key=lambda kv: -sum(kv[1]))[:top]]


def summary_markdown(splits, report: CurationReport, baseline: dict) -> str:
  train = splits["train"]
  lines = [
    (
      "Generated by `python -m clsalign_jax.data.curation --docs=docs/data.md [--contrast_answers=FILE]`; "
      "do not edit by hand."
    ),
    "",
    "| split | benign | malicious |",
    "|---|---|---|",
  ]
  lines += [f"| {n} | {c['benign']} | {c['malicious']} |" for n, c in report.split_counts.items()]
  lines += [
    "",
    "Per source (all splits):",
    "",
    "| source | label | train | validation | test |",
    "|---|---|---|---|---|",
  ]
  sources = sorted({s for c in report.source_counts.values() for s in c})
  label_of = {r.record.source: LABEL_NAMES[r.record.label] for rs in splits.values() for r in rs}
  for s in sources:
    lines.append(
      f"| {s} | {label_of.get(s, '')} | "
      + " | ".join(str(report.source_counts.get(n, {}).get(s, 0)) for n in ("train", "validation", "test"))
      + " |"
    )
  lines += [
    "",
    "Form buckets after balancing, then with the contrast rows added (all splits):",
    "",
    "| form | benign | malicious | ratio | benign + contrast | ratio with contrast |",
    "|---|---|---|---|---|---|",
  ]
  for f, c in report.bucket_counts.items():
    w = report.bucket_counts_with_contrast.get(f, c)
    lines.append(
      f"| {f} | {c['benign']} | {c['malicious']} | {c['benign'] / max(c['malicious'], 1):.2f} "
      f"| {w['benign']} | {w['benign'] / max(w['malicious'], 1):.2f} |"
    )
  lines += ["", "Rewritten prompts (form before -> after), equal numbers of each label per template:", ""]
  lines += [f"* {k}: {v}" for k, v in sorted(report.rewritten.items())] or ["* none"]
  lines += ["", "Dropped:", ""] + [f"* {k}: {v}" for k, v in sorted(report.dropped.items())]
  if report.notes:
    lines += [""] + report.notes
  lines += [
    "",
    "First word x label, training split (20 most frequent):",
    "",
    "| first word | benign | malicious |",
    "|---|---|---|",
  ]
  lines += [f"| {w} | {b} | {m} |" for w, b, m in first_word_table(train)]
  lines += [
    "",
    f"**Form-only baseline** (logistic regression on the first two words, fitted on train, "
    f"n = {baseline['n_train']}): test AUC **{baseline['auc']:.3f}**, accuracy {baseline['accuracy']:.3f} "
    f"(n = {baseline['n_test']}); the bar is AUC <= 0.65.",
  ]
  return "\n".join(lines)


BEGIN, END = "<!-- curation:begin -->", "<!-- curation:end -->"


def write_docs(path: str, text: str) -> None:
  doc = pathlib.Path(path).read_text(encoding="utf-8")
  if BEGIN not in doc or END not in doc:
    raise ValueError(f"{path}: no {BEGIN} ... {END} section to replace")
  head, rest = doc.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  pathlib.Path(path).write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}", encoding="utf-8")


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  flags.DEFINE_string(
    "docs", None, "Rewrite the generated section of this markdown file (docs/data.md).", flag_values=fv
  )
  flags.DEFINE_integer("seed", SPLIT_SEED, "Seed of the train / validation / test split.", flag_values=fv)
  flags.DEFINE_string(
    "contrast_answers",
    str(CONTRAST_ANSWERS),
    "Completions file with the contrast prompts' answers (default: the shipped one; '' leaves the source out).",
    flag_values=fv,
  )


def body(fv: flags.FlagValues, args: list[str]) -> None:
  cli.no_arguments(args)
  splits, report = build_mixture_v2(fv.seed, contrast_answers=fv.contrast_answers or None)
  baseline = form_only_baseline(
    [(r.record.prompt, r.record.label) for r in splits["train"]],
    [(r.record.prompt, r.record.label) for r in splits["test"]],
  )
  text = summary_markdown(splits, report, baseline)
  print(text)
  if fv.docs:
    write_docs(fv.docs, text)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line `argv` (default sys.argv); returns the exit code."""
  return cli.run(body, define_flags, argv)


if __name__ == "__main__":
  cli.exit_with(main)
