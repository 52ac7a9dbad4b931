"""Benchmark loaders: every source becomes a list of `Item`s.

Loaders: AdvBench CSV, HarmBench behaviours CSV, MaliciousInstruct (one prompt per line),
safety-tuned-llamas evaluation JSON, DeepInception's instantiated prompts, JailbreakBench's
harmful behaviours and benign twins (the shortcut probe), AlpacaEval's instructions, and a generic
JSONL / JSON / CSV / TSV loader with a column mapping. Files of ready-made adversarial prompts
(AutoDAN outputs, GCG suffixes, PAP paraphrases) are generic files: map their prompt column to
`query`, or a behaviour plus a `prefix` / `suffix` column.

`load_benchmark(spec)` is what configs use: `spec = dict(kind=..., path=..., limit=..., ...)`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pathlib
from collections.abc import Iterator, Mapping

from clsalign_jax.data.mixture import ADVBENCH_FILE, ALPACA_EVAL_FILE

SHIPPED_DIR = pathlib.Path(__file__).parent / "shipped"
DEEPINCEPTION_FILE = SHIPPED_DIR / "deepinception" / "data_main.json"
SAFETY_TUNED_LLAMAS_SETS = {
  "malicious_instructions": "I-MaliciousInstructions.json",
  "q_harm": "Q-Harm.json",
  "cona": "I-CoNa.json",
  "controversial": "I-Controversial.json",
  "alpaca": "I-Alpaca.json",
}
JAILBREAKBENCH_FILE = SHIPPED_DIR / "jailbreakbench" / "normalized.jsonl"
JAILBREAKBENCH_SIDES = ("harmful", "benign", "both")
HARMBENCH_CATEGORIES = ("standard", "contextual", "copyright")


class BenchmarkError(ValueError):
  """A benchmark file cannot be read as asked; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One evaluation prompt.

  `query` is the user turn as the model receives it (a HarmBench context already placed
  before the behaviour). `behavior` is the bare request that judges compare against.
  `target` is the affirmative start an attack optimises for ("Sure, here is ...").
  `response` is a reference answer, e.g. the harmful response whose first k tokens a prefill
  attack forces.
  """

  id: str
  query: str
  behavior: str = ""
  target: str = ""
  response: str = ""
  category: str = ""
  source: str = ""
  meta: Mapping = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not self.behavior:
      object.__setattr__(self, "behavior", self.query)


def read_text(path) -> str:
  """A UTF-8 text file, with a clear error if it is missing."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise BenchmarkError(f"{path}: no such file")
  # utf-8-sig drops a byte-order mark that spreadsheet exports put before the header.
  return path.read_bytes().decode("utf-8-sig")


def csv_rows(path, delimiter: str = ",", header: bool = True) -> Iterator[tuple[int, dict | list]]:
  """(line, row) pairs; newline='' lets the csv module handle CRLF and quoted multi-line cells."""
  reader_cls = csv.DictReader if header else csv.reader
  reader = reader_cls(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
  start = reader.line_num + 1
  try:
    for row in reader:
      yield start, row
      start = reader.line_num + 1
  except csv.Error as e:
    raise BenchmarkError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None


def _require_columns(path, row: Mapping, columns) -> None:
  missing = [c for c in columns if c not in row]
  if missing:
    raise BenchmarkError(f"{path}: missing column(s) {missing}; found {sorted(row)}")


# ----- named benchmarks ---------------------------------------------------------------------------


def load_advbench(path=ADVBENCH_FILE) -> list[Item]:
  """AdvBench `goal`, `target` (the affirmative "Sure, here is ..." prefix)."""
  items = []
  for n, (_, row) in enumerate(csv_rows(path)):
    _require_columns(path, row, ("goal", "target"))
    items.append(Item(f"advbench:{n}", row["goal"], target=row["target"], source="advbench"))
  return items


def harmbench_query(behavior: str, context: str) -> str:
  """HarmBench renders a contextual behaviour as the context, a rule, then the request."""
  return f"{context}\n\n---\n\n{behavior}" if context else behavior


def load_harmbench(path, categories=("standard", "contextual"), targets_path=None) -> list[Item]:
  """HarmBench behaviours CSV (Behavior, FunctionalCategory, SemanticCategory, Tags,
  ContextString, BehaviorID). Copyright behaviours are judged by hash matching, not by a
  classifier, so they are left out unless `categories` names them. `targets_path`: HarmBench's
  JSON {BehaviorID: target string} for GCG/AutoDAN/prefill targets."""
  unknown = set(categories) - set(HARMBENCH_CATEGORIES)
  if unknown:
    raise BenchmarkError(f"unknown HarmBench categories {sorted(unknown)}; known: {HARMBENCH_CATEGORIES}")
  targets = json.loads(read_text(targets_path)) if targets_path else {}
  items = []
  for line, row in csv_rows(path):
    _require_columns(path, row, ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID"))
    if row["FunctionalCategory"] not in categories:
      continue
    behavior, context = row["Behavior"], row["ContextString"] or ""
    bid = row["BehaviorID"] or f"line{line}"
    items.append(
      Item(
        f"harmbench:{bid}",
        harmbench_query(behavior, context),
        behavior=behavior,
        target=targets.get(bid, ""),
        category=row["SemanticCategory"],
        source="harmbench",
        meta={"functional_category": row["FunctionalCategory"], "tags": row.get("Tags") or "", "context": context},
      )
    )
  return items


def load_malicious_instruct(path) -> list[Item]:
  """Huang et al.'s MaliciousInstruct: one prompt per line (blank lines skipped)."""
  lines = [ln.strip() for ln in read_text(path).splitlines()]
  return [Item(f"malicious_instruct:{n}", q, source="malicious_instruct") for n, q in enumerate(l for l in lines if l)]


def load_safety_tuned_llamas(path=None, subset: str = "malicious_instructions") -> list[Item]:
  """An evaluation set of safety-tuned-llamas: {"instructions": [...], "inputs": [...], "tags": [...]}.
  Without `path`, the shipped file of `subset` (see SAFETY_TUNED_LLAMAS_SETS)."""
  if path is None:
    if subset not in SAFETY_TUNED_LLAMAS_SETS:
      raise BenchmarkError(f"unknown safety-tuned-llamas subset {subset!r}; known: {sorted(SAFETY_TUNED_LLAMAS_SETS)}")
    path = SHIPPED_DIR / "safety_tuned_llamas" / SAFETY_TUNED_LLAMAS_SETS[subset]
  data = json.loads(read_text(path))
  if not isinstance(data, dict) or "instructions" not in data:
    raise BenchmarkError(f"{path}: expected an object with an 'instructions' list")
  inputs, tags = data.get("inputs") or [], data.get("tags") or []
  name = pathlib.Path(path).stem
  items = []
  for n, instruction in enumerate(data["instructions"]):
    extra = inputs[n] if n < len(inputs) else ""
    query = f"{instruction}\n\n{extra}" if extra else instruction
    items.append(Item(f"{name}:{n}", query, category=tags[n] if n < len(tags) else "", source=name))
  return items


def load_jailbreakbench(path=JAILBREAKBENCH_FILE, side: str = "both") -> list[Item]:
  """JailbreakBench's 100 harmful behaviours and their 100 topic-matched benign twins (same
  category, same imperative form): the shortcut probe. `meta["label"]` is 1 for harmful, 0 for
  benign; `category` is JailbreakBench's (10 categories x 10 pairs); ids are `jbb:{side}:{index}`."""
  if side not in JAILBREAKBENCH_SIDES:
    raise BenchmarkError(f"jailbreakbench side {side!r}; known: {JAILBREAKBENCH_SIDES}")
  items = []
  for n, line in enumerate(read_text(path).split("\n"), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      label = {"harmful": 1, "benign": 0}[row["label"]]
      item = Item(
        f"jbb:{row['label']}:{row['index']}",
        row["prompt"],
        category=row.get("category", ""),
        source="jailbreakbench",
        meta={"label": label, "behavior_name": row.get("behavior", "")},
      )
    except (json.JSONDecodeError, KeyError) as e:
      raise BenchmarkError(f"{path}:{n}: not a JailbreakBench row ({type(e).__name__}: {e})") from None
    if side == "both" or side == row["label"]:
      items.append(item)
  return items


def load_alpaca_eval(path=ALPACA_EVAL_FILE) -> list[Item]:
  """AlpacaEval's 805 benign instructions (text-davinci-003 answers as `response`): an
  over-refusal set since it left the training mixture (mixture v2)."""
  rows = json.loads(read_text(path))
  return [
    Item(
      f"alpaca_eval:{n}",
      r["instruction"],
      response=r.get("output", ""),
      category=r.get("dataset", ""),
      source="alpaca_eval",
    )
    for n, r in enumerate(rows)
  ]


def load_deepinception(path=DEEPINCEPTION_FILE) -> list[Item]:
  """DeepInception's 50 behaviours: `query` is the plain behaviour; the paper's instantiated
  nested prompt rides along in meta['inception_attack'] for the DeepInception attack."""
  rows = json.loads(read_text(path))
  return [
    Item(
      f"deepinception:{n}",
      r["plain_attack"],
      category=r.get("topic", ""),
      source="deepinception",
      meta={"inception_attack": r["inception_attack"]},
    )
    for n, r in enumerate(rows)
  ]


# ----- generic files ------------------------------------------------------------------------------

# Item field -> default column name. `prefix` / `suffix` columns wrap the query (an AutoDAN
# prefix, a GCG suffix); `label` is kept in meta (judge validation, utility files).
DEFAULT_FIELDS = {
  "query": "prompt",
  "id": None,
  "behavior": None,
  "target": None,
  "response": None,
  "category": None,
  "prefix": None,
  "suffix": None,
  "label": None,
}


def read_rows(path, fmt: str | None = None) -> Iterator[tuple[str, Mapping]]:
  """(location, row) pairs of a CSV / TSV / JSONL / JSON file; `fmt` defaults to the suffix."""
  path = pathlib.Path(path)
  fmt = fmt or path.suffix.lower().lstrip(".")
  if fmt in ("csv", "tsv"):
    for line, row in csv_rows(path, delimiter="\t" if fmt == "tsv" else ","):
      yield f"{path}:{line}", row
  elif fmt == "jsonl":
    for n, line in enumerate(read_text(path).splitlines(), start=1):
      if line.strip():
        try:
          yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
          raise BenchmarkError(f"{path}:{n}: malformed JSON: {e.msg}") from None
  elif fmt == "json":
    data = json.loads(read_text(path))
    if isinstance(data, dict):
      # {group: [rows]} (e.g. HarmBench's per-behaviour files): the key becomes `group`.
      for key, rows in data.items():
        for n, row in enumerate(rows if isinstance(rows, list) else [rows]):
          yield f"{path}:{key}[{n}]", {"group": key, **row}
    else:
      for n, row in enumerate(data):
        yield f"{path}:record {n}", row
  else:
    raise BenchmarkError(f"{path}: unsupported format {fmt!r} (csv, tsv, jsonl, json)")


def _chat_pair(row: Mapping) -> tuple[str, str]:
  """First user and assistant contents of a `messages` list (Harmful HEx-PHI's layout)."""
  msgs = row.get("messages") or []
  user = next((m["content"] for m in msgs if m.get("role") == "user"), "")
  assistant = next((m["content"] for m in msgs if m.get("role") == "assistant"), "")
  return user, assistant


def load_generic(path, fields: Mapping | None = None, fmt: str | None = None, name: str | None = None) -> list[Item]:
  """Any JSONL / JSON / CSV / TSV file. `fields` maps Item fields (DEFAULT_FIELDS) to columns;
  a row without the query column but with `messages` reads the first user / assistant turns."""
  unknown = set(fields or {}) - set(DEFAULT_FIELDS)
  if unknown:
    raise BenchmarkError(f"unknown field names {sorted(unknown)}; known: {sorted(DEFAULT_FIELDS)}")
  cols = {**DEFAULT_FIELDS, **(fields or {})}
  name = name or pathlib.Path(path).stem
  get = lambda row, f: "" if cols[f] is None or row.get(cols[f]) is None else str(row[cols[f]])
  items = []
  for n, (where, row) in enumerate(read_rows(path, fmt)):
    if not isinstance(row, Mapping):
      raise BenchmarkError(f"{where}: expected an object, got {type(row).__name__}")
    query, response = get(row, "query"), get(row, "response")
    if cols["query"] not in row and "messages" in row:
      query, chat_response = _chat_pair(row)
      response = response or chat_response
    if not query:
      raise BenchmarkError(f"{where}: no {cols['query']!r} value (set fields['query'] to the prompt column)")
    behavior = get(row, "behavior") or query
    prefix, suffix = get(row, "prefix"), get(row, "suffix")
    full = f"{prefix}{query}" + (f" {suffix}" if suffix else "")
    meta = {"label": row[cols["label"]]} if cols["label"] and cols["label"] in row else {}
    items.append(
      Item(
        f"{name}:{get(row, 'id') or n}",
        full,
        behavior=behavior,
        target=get(row, "target"),
        response=response,
        category=get(row, "category"),
        source=name,
        meta=meta,
      )
    )
  return items


# ----- specs --------------------------------------------------------------------------------------

LOADERS = {
  "advbench": load_advbench,
  "harmbench": load_harmbench,
  "malicious_instruct": load_malicious_instruct,
  "safety_tuned_llamas": load_safety_tuned_llamas,
  "deepinception": load_deepinception,
  "jailbreakbench": load_jailbreakbench,
  "alpaca_eval": load_alpaca_eval,
  "generic": load_generic,
}


def load_benchmark(spec: Mapping) -> list[Item]:
  """`spec`: kind (a LOADERS name), its arguments (path, fields, subset, ...), optional `stride`
  (every k-th item, before the limit), `limit` (the first N items) and `name` (not passed to the
  loader)."""
  spec = {k: v for k, v in dict(spec).items() if v is not None}
  kind = spec.pop("kind")
  spec.pop("name", None)
  limit = spec.pop("limit", None)
  stride = spec.pop("stride", None)
  if kind not in LOADERS:
    raise BenchmarkError(f"unknown benchmark kind {kind!r}; known: {sorted(LOADERS)}")
  items = LOADERS[kind](**spec)
  if stride:
    items = items[:: int(stride)]
  ids = [it.id for it in items]
  if len(set(ids)) != len(ids):
    raise BenchmarkError(f"benchmark {kind}: duplicate item ids (map an id column, or drop it to number rows)")
  return items[:limit] if limit else items
