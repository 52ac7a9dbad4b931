"""Reading labelled text records from JSONL / JSON / CSV, with validation and deterministic splits.

Every problem with a record is reported as `path:line: reason` (`path:record N` for JSON arrays).
With `skip_bad_records=True` the record is skipped instead and counted in `ReadResult.skipped`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

BENIGN, MALICIOUS = 0, 1
LABEL_NAMES = ("benign", "malicious")
_LABEL_WORDS = {"0": 0, "1": 1, "benign": 0, "malicious": 1}


class DataError(ValueError):
  """A bad input record; the message starts with `path:line`."""


@dataclasses.dataclass(frozen=True)
class FieldMap:
  """Which column / key holds what. `None` means the file has no such field.

  `context` is an optional Alpaca-style `input` appended to the prompt after a blank line.
  """

  prompt: str = "prompt"
  response: str | None = "response"
  label: str | None = "label"
  source: str | None = "source"
  id: str | None = None
  context: str | None = None


@dataclasses.dataclass(frozen=True)
class SftRecord:
  id: str
  prompt: str
  response: str
  label: int  # 1 = malicious
  source: str


@dataclasses.dataclass(frozen=True)
class TextRecord:
  """A pretraining document with a per-document safety label."""

  id: str
  text: str
  label: int
  source: str


@dataclasses.dataclass
class ReadResult:
  records: list
  skipped: list[str] = dataclasses.field(default_factory=list)  # "path:line: reason"


def _require_some(path, result: ReadResult) -> None:
  # An empty file would otherwise surface much later, inside TFDS, without its name.
  if not result.records and not result.skipped:
    raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")


def normalize_prompt(text: str) -> str:
  """The key under which prompts count as the same: whitespace collapsed, case folded."""
  return " ".join(text.split()).casefold()


def parse_label(value, where: str) -> int:
  """0 / 1 as int, integral float or string, or the words "benign" / "malicious"."""
  if isinstance(value, bool):
    raise DataError(f"{where}: label must be 0 or 1, got a boolean {value!r}")
  if isinstance(value, int) and value in (0, 1):
    return value
  if isinstance(value, float) and value in (0.0, 1.0):
    return int(value)
  if isinstance(value, str) and value.strip().lower() in _LABEL_WORDS:
    return _LABEL_WORDS[value.strip().lower()]
  raise DataError(f"{where}: label outside {{0, 1}}: {value!r}")


def read_sft_records(
  path: str | os.PathLike,
  fields: FieldMap = FieldMap(),
  *,
  default_label: int | None = None,
  default_source: str | None = None,
  require_response: bool = True,
  skip_bad_records: bool = False,
) -> ReadResult:
  """Prompt / response / label records from one file (.jsonl, .json list, or .csv)."""
  path = pathlib.Path(path)
  source_default = default_source or path.stem
  result = ReadResult(records=[])
  for where, row, error in _rows(path):
    try:
      if error:
        raise DataError(f"{where}: {error}")
      result.records.append(_sft_record(row, where, fields, default_label, source_default, require_response))
    except DataError as e:
      if not skip_bad_records:
        raise
      result.skipped.append(str(e))
  _require_some(path, result)
  return result


def read_text_records(
  path: str | os.PathLike,
  *,
  text_field: str = "text",
  label_field: str | None = "label",
  source_field: str | None = None,
  id_field: str | None = None,
  default_label: int | None = None,
  skip_bad_records: bool = False,
) -> ReadResult:
  """Labelled documents (for the pretraining corpus) from one .jsonl / .json / .csv file."""
  result = ReadResult(records=[])
  result.records.extend(
    iter_text_records(
      path,
      text_field=text_field,
      label_field=label_field,
      source_field=source_field,
      id_field=id_field,
      default_label=default_label,
      skip_bad_records=skip_bad_records,
      skipped=result.skipped,
    )
  )
  return result


def iter_text_records(
  path: str | os.PathLike,
  *,
  text_field: str = "text",
  label_field: str | None = "label",
  source_field: str | None = None,
  id_field: str | None = None,
  default_label: int | None = None,
  skip_bad_records: bool = False,
  skipped: list[str] | None = None,
) -> Iterator[TextRecord]:
  """`read_text_records` one record at a time (a corpus need not fit in memory); skipped records'
  reasons are appended to `skipped`."""
  path = pathlib.Path(path)
  skipped = [] if skipped is None else skipped
  seen = 0
  for where, row, error in _rows(path):
    try:
      if error:
        raise DataError(f"{where}: {error}")
      text = _text_field(row, text_field, where, required=True)
      label = _label(row, label_field, default_label, where)
      source = _text_field(row, source_field, where) if source_field else None
      rid = _text_field(row, id_field, where) if id_field else None
      record = TextRecord(id=rid or where, text=text, label=label, source=source or path.stem)
    except DataError as e:
      if not skip_bad_records:
        raise
      skipped.append(str(e))
      seen += 1
      continue
    seen += 1
    yield record
  if not seen:
    _require_some(path, ReadResult(records=[]))


def _sft_record(row, where, fields, default_label, default_source, require_response):
  prompt = _text_field(row, fields.prompt, where, required=True)
  if fields.context:
    context = _text_field(row, fields.context, where)
    if context and context.strip():
      prompt = f"{prompt}\n\n{context}"
  response = ""
  if fields.response:
    response = _text_field(row, fields.response, where, required=require_response) or ""
  if require_response and not response.strip():
    raise DataError(f"{where}: empty response")
  label = _label(row, fields.label, default_label, where)
  source = (_text_field(row, fields.source, where) if fields.source else None) or default_source
  rid = _text_field(row, fields.id, where) if fields.id else None
  return SftRecord(id=rid or where, prompt=prompt, response=response, label=label, source=source)


def _label(row, field, default, where) -> int:
  if field is not None and row.get(field) not in (None, ""):
    return parse_label(row[field], where)
  if default is not None:
    return parse_label(default, where)
  raise DataError(f"{where}: missing field {field!r} (label) and no default label configured")


def _text_field(row: Mapping, field: str, where: str, required: bool = False) -> str | None:
  value = row.get(field)
  if value is None:
    if required:
      raise DataError(f"{where}: missing field {field!r}")
    return None
  if not isinstance(value, str):
    raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
  if any("\udc80" <= ch <= "\udcff" for ch in value):
    raise DataError(f"{where}: field {field!r} is not valid UTF-8")
  if required and not value.strip():
    raise DataError(f"{where}: empty {field!r}")
  return value


def _rows(path: pathlib.Path) -> Iterator[tuple[str, Mapping, str | None]]:
  """(location, row, error) per record; `error` is set instead of raising so callers can skip."""
  suffix = path.suffix.lower()
  if suffix == ".jsonl":
    yield from _jsonl_rows(path)
  elif suffix == ".json":
    yield from _json_rows(path)
  elif suffix in (".csv", ".tsv"):
    yield from _csv_rows(path, delimiter="\t" if suffix == ".tsv" else ",")
  else:
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .csv)")


def jsonl_objects(path) -> Iterator[tuple[str, dict]]:
  """(`file:line`, object) per non-blank line of a JSONL file; the first bad line raises a DataError
  naming it."""
  for where, row, error in _jsonl_rows(path):
    if error:
      raise DataError(f"{where}: {error}")
    yield where, row


def _jsonl_rows(path):
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield where, {}, f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
        continue
      if not line.strip():
        continue
      try:
        row = json.loads(line, object_pairs_hook=_unique_keys)
      except json.JSONDecodeError as e:
        yield where, {}, f"malformed JSON: {e.msg} (column {e.colno})"
        continue
      except _DuplicateKey as e:
        yield where, {}, f"duplicate key {e.args[0]!r} in one object (JSON readers keep one of them silently)"
        continue
      if not isinstance(row, dict):
        yield where, {}, f"expected a JSON object, got {type(row).__name__}"
        continue
      yield where, row, None


class _DuplicateKey(ValueError):
  pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
  """`object_pairs_hook` that refuses a key given twice in one object."""
  out = {}
  for key, value in pairs:
    if key in out:
      raise _DuplicateKey(key)
    out[key] = value
  return out


def _json_rows(path):
  # Undecodable bytes survive as surrogates and are reported per record by the field checks.
  text = path.read_bytes().decode("utf-8", errors="surrogateescape")
  try:
    rows = json.loads(text, object_pairs_hook=_unique_keys)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
  except _DuplicateKey as e:
    raise DataError(
      f"{path}: duplicate key {e.args[0]!r} in one object (JSON readers keep one of them silently)"
    ) from None
  if not isinstance(rows, list):
    raise DataError(f"{path}: expected a JSON list of objects")
  for n, row in enumerate(rows):
    where = f"{path}:record {n}"
    if not isinstance(row, dict):
      yield where, {}, f"expected a JSON object, got {type(row).__name__}"
    else:
      yield where, row, None


def _csv_rows(path, delimiter):
  # surrogateescape keeps undecodable bytes visible per field, so the bad record (not the whole
  # file) is reported, with the line it starts on.
  text = path.read_bytes().decode("utf-8", errors="surrogateescape")
  reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
  start = reader.line_num + 1
  try:
    for row in reader:
      where = f"{path}:{start}"
      start = reader.line_num + 1
      if None in row:
        yield where, {}, "more fields than the header"
      elif any(v is None for v in row.values()):
        yield where, {}, "fewer fields than the header"
      else:
        yield where, row, None
  except csv.Error as e:
    raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None


# ----- splits -------------------------------------------------------------------------------------


def assign_splits(
  records: Sequence,
  fractions: Mapping[str, float],
  *,
  seed: int = 0,
  key=lambda r: r.prompt,
  stratum=lambda r: r.label,
) -> dict[str, list]:
  """Deterministic split, stratified by `stratum` (the label by default), with every prompt in
  exactly one split.

  Records sharing a normalised prompt form a group and stay together. Within each stratum the groups
  are ordered by a salted SHA-256 of their key (independent of input order) and cut by `fractions`
  (largest remainder, so the counts sum up). A group whose records disagree on the stratum is
  stratified under the largest one, so the result never depends on input order.
  """
  if abs(sum(fractions.values()) - 1.0) > 1e-9:
    raise ValueError(f"split fractions must sum to 1, got {dict(fractions)}")
  groups: dict[str, list] = {}
  for r in records:
    groups.setdefault(normalize_prompt(key(r)), []).append(r)
  out: dict[str, list] = {name: [] for name in fractions}
  group_stratum = {k: max(stratum(r) for r in g) for k, g in groups.items()}
  for s in sorted(set(group_stratum.values())):
    keys = [k for k in groups if group_stratum[k] == s]
    keys.sort(key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest())
    start = 0
    for name, count in zip(fractions, _apportion(len(keys), list(fractions.values()))):
      for k in keys[start : start + count]:
        out[name].extend(groups[k])
      start += count
  return out


def _apportion(n: int, fractions: Sequence[float]) -> list[int]:
  exact = [n * f for f in fractions]
  counts = [int(x) for x in exact]
  by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
  for i in by_remainder[: n - sum(counts)]:
    counts[i] += 1
  return counts


def enforce_disjoint(
  splits: Mapping[str, list], priority: Iterable[str], key=lambda r: r.prompt
) -> tuple[dict[str, list], int]:
  """Removes records whose normalised prompt also occurs in a split earlier in `priority`.

  Returns the new splits and how many records were removed; held-out splits go first in
  `priority` so that a shared prompt is kept out of training rather than out of evaluation.
  """
  seen: set[str] = set()
  out, removed = {}, 0
  for name in priority:
    keys_here = {normalize_prompt(key(r)) for r in splits.get(name, [])}
    kept = [r for r in splits.get(name, []) if normalize_prompt(key(r)) not in seen]
    removed += len(splits.get(name, [])) - len(kept)
    out[name] = kept
    seen |= keys_here
  for name, rows in splits.items():
    out.setdefault(name, rows)
  return out, removed


COMPLETION_KINDS = ("answer", "compliance", "refusal")  # of a completions row (data/completions.py)


def read_completions(path: str) -> dict[str, dict]:
  """prompt -> row of a completions file, with its file:line named on a bad line."""
  out = {}
  for where, row in jsonl_objects(path):
    try:
      kind, prompt, response = row["kind"], row["prompt"], row["response"]
    except KeyError as e:
      raise DataError(f"{where}: not a completions row (no {e})") from None
    if kind not in COMPLETION_KINDS:
      raise DataError(f"{where}: kind {kind!r}; expected one of {COMPLETION_KINDS}")
    if not isinstance(response, str):
      raise DataError(f"{where}: response must be a string")
    out[prompt] = row
  return out
