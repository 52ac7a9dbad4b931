import collections
import json

import pytest

from clsalign_jax.data.records import (
  DataError,
  FieldMap,
  SftRecord,
  assign_splits,
  enforce_disjoint,
  normalize_prompt,
  parse_label,
  read_sft_records,
  read_text_records,
)


def _jsonl(path, rows):
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
  return path


GOOD = {"prompt": "How do I bake bread?", "response": "Mix flour...", "label": 0}


def test_reads_jsonl_with_defaults(tmp_path):
  path = _jsonl(tmp_path / "mine.jsonl", [GOOD, {**GOOD, "prompt": "Hack a bank", "label": "1"}, ""])
  records = read_sft_records(path).records
  assert [(r.prompt, r.label, r.source) for r in records] == [
    ("How do I bake bread?", 0, "mine"),
    ("Hack a bank", 1, "mine"),
  ]
  assert records[0].id == f"{path}:1"


def test_field_mapping_csv_and_context(tmp_path):
  path = tmp_path / "alpaca.csv"
  path.write_text(
    "instruction,input,output,is_harmful,origin\n"
    '"Summarise this","A long\ntext",Short.,0,web\n'
    "Do harm,,No.,1,redteam\n",
    encoding="utf-8",
  )
  fields = FieldMap(prompt="instruction", response="output", label="is_harmful", source="origin", context="input")
  records = read_sft_records(path, fields).records
  assert records[0].prompt == "Summarise this\n\nA long\ntext"
  assert (records[0].source, records[1].source, records[1].label) == ("web", "redteam", 1)
  # Locations point at the line where a record starts, even after a multi-line field.
  assert records[1].id == f"{path}:4"


def test_default_label_for_files_without_labels(tmp_path):
  path = _jsonl(tmp_path / "benign.jsonl", [{"q": "hi", "a": "hello"}])
  fields = FieldMap(prompt="q", response="a", label=None, source=None)
  assert read_sft_records(path, fields, default_label=0).records[0].label == 0
  with pytest.raises(DataError, match="no default label"):
    read_sft_records(path, FieldMap(prompt="q", response="a", label="label"))


@pytest.mark.parametrize(
  "line,message",
  [
    ('{"prompt": "x", "response": "y", "label": 0', "malformed JSON"),
    ('{"prompt": "x", "response": "y", "label": 2}', r"label outside \{0, 1\}: 2"),
    ('{"prompt": "x", "response": "y", "label": true}', "boolean"),
    ('{"prompt": "x", "response": "y", "label": "unsafe-ish"}', "label outside"),
    ('{"prompt": "   ", "response": "y", "label": 0}', "empty 'prompt'"),
    ('{"prompt": "x", "response": "", "label": 0}', "empty 'response'"),
    ('{"response": "y", "label": 0}', "missing field 'prompt'"),
    ('{"prompt": "x", "label": 0}', "missing field 'response'"),
    ('{"prompt": 3, "response": "y", "label": 0}', "must be a string"),
    ('["a", "list"]', "expected a JSON object"),
  ],
)
def test_bad_jsonl_line_reports_file_and_line(tmp_path, line, message):
  path = _jsonl(tmp_path / "bad.jsonl", [GOOD, line, GOOD])
  with pytest.raises(DataError, match=f"^{path}:2: .*{message}"):
    read_sft_records(path)
  result = read_sft_records(path, skip_bad_records=True)
  assert len(result.records) == 2 and len(result.skipped) == 1
  assert result.skipped[0].startswith(f"{path}:2: ")


def test_non_utf8_jsonl(tmp_path):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9", "response": "y", "label": 0}\n')
  with pytest.raises(DataError, match=f"^{path}:2: not valid UTF-8 \\(byte 0xe9"):
    read_sft_records(path)
  assert len(read_sft_records(path, skip_bad_records=True).records) == 1


def test_non_utf8_csv_and_ragged_rows(tmp_path):
  path = tmp_path / "bad.csv"
  path.write_bytes(b"prompt,response,label\nok,fine,0\ncaf\xe9,y,0\ntoo,many,0,fields\ntoo few\n")
  with pytest.raises(DataError, match=f"^{path}:3: field 'prompt' is not valid UTF-8"):
    read_sft_records(path)
  result = read_sft_records(path, skip_bad_records=True)
  assert [r.prompt for r in result.records] == ["ok"]
  assert [s.split(": ", 1)[0] for s in result.skipped] == [f"{path}:3", f"{path}:4", f"{path}:5"]


def test_json_array_and_unknown_suffix(tmp_path):
  path = tmp_path / "rows.json"
  path.write_text(json.dumps([GOOD, {**GOOD, "label": 5}]))
  with pytest.raises(DataError, match=f"^{path}:record 1: label outside"):
    read_sft_records(path)
  (tmp_path / "rows.parquet").write_bytes(b"")
  with pytest.raises(DataError, match="unsupported file type"):
    read_sft_records(tmp_path / "rows.parquet")


def test_text_records_for_pretraining(tmp_path):
  path = _jsonl(
    tmp_path / "wiki.jsonl",
    [{"text": "Paris is the capital of France.", "label": 0}, {"text": "", "label": 1}, {"text": "x", "label": 7}],
  )
  with pytest.raises(DataError, match=f"{path}:2: empty 'text'"):
    read_text_records(path)
  result = read_text_records(path, skip_bad_records=True)
  assert [r.text for r in result.records] == ["Paris is the capital of France."]
  assert len(result.skipped) == 2


def test_parse_label():
  assert [parse_label(v, "w") for v in (0, 1, 0.0, "1", " benign ", "MALICIOUS")] == [0, 1, 0, 1, 0, 1]
  for bad in (2, -1, 0.5, "yes", None, [0]):
    with pytest.raises(DataError):
      parse_label(bad, "w")


def _records(n_benign, n_malicious, dup_every=7):
  out = []
  for i in range(n_benign + n_malicious):
    label = int(i >= n_benign)
    # Some prompts repeat with different case / whitespace: they must land in the same split.
    text = f"Prompt number {i // 2 if i % dup_every == 0 else i}"
    text = text.upper() if i % 2 else f"  {text}\n"
    out.append(SftRecord(f"r{i}", text, "resp", label, "t"))
  return out


def test_assign_splits_is_stratified_disjoint_and_order_free():
  records = _records(300, 500)
  fractions = {"train": 0.8, "validation": 0.1, "test": 0.1}
  splits = assign_splits(records, fractions, seed=1)
  assert sum(map(len, splits.values())) == len(records)
  keys = {n: {normalize_prompt(r.prompt) for r in rows} for n, rows in splits.items()}
  assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
  assert not keys["validation"] & keys["test"]
  for name, rows in splits.items():
    share = collections.Counter(r.label for r in rows)[1] / len(rows)
    assert abs(share - 500 / 800) < 0.05, name
  shuffled = assign_splits(list(reversed(records)), fractions, seed=1)
  assert {n: sorted(r.id for r in rows) for n, rows in shuffled.items()} == {
    n: sorted(r.id for r in rows) for n, rows in splits.items()
  }
  other = assign_splits(records, fractions, seed=2)
  assert other["test"] != splits["test"]
  with pytest.raises(ValueError, match="sum to 1"):
    assign_splits(records, {"train": 0.5})


def test_enforce_disjoint_keeps_held_out_copies():
  a = SftRecord("a", "Same prompt", "x", 0, "s")
  b = SftRecord("b", "  same   PROMPT ", "y", 0, "s")
  c = SftRecord("c", "Other", "z", 0, "s")
  out, removed = enforce_disjoint({"train": [a, c], "test": [b]}, ["test", "validation", "train"])
  assert removed == 1 and out["train"] == [c] and out["test"] == [b] and out["validation"] == []
