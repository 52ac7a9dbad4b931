import json

import pytest

from clsalign_jax.data.builders import (
  PretrainCorpusConfig,
  SafetyMix,
  SafetyPretrainCorpus,
  UserFile,
  pretrain_corpus_config,
  prepare,
  safety_mix_config,
)
from clsalign_jax.data.records import DataError, FieldMap


def _text(value):
  return value.decode("utf-8") if isinstance(value, bytes) else value


def test_shipped_v2_is_the_curated_mixture(tmp_path):
  from clsalign_jax.data import curation

  splits, report = curation.build_mixture_v2()
  sources = prepare(SafetyMix(data_dir=str(tmp_path)))
  assert {n: len(s) for n, s in sources.items()} == {n: len(r) for n, r in splits.items()}
  test = sources["test"]
  stored = {_text(test[i]["id"]): (_text(test[i]["prompt"]), int(test[i]["label"])) for i in range(len(test))}
  assert stored == {r.record.id: (r.record.prompt, r.record.label) for r in splits["test"]}
  assert (tmp_path / "safety_mix" / "shipped" / "2.1.0").is_dir()


def test_v1_mixture_as_array_record(tmp_path, shipped):
  builder = SafetyMix(data_dir=str(tmp_path), config="v1")
  sources = prepare(builder)
  splits, report = shipped
  assert {name: len(src) for name, src in sources.items()} == {n: len(r) for n, r in splits.items()}
  for name, rows in splits.items():
    stored = {
      _text(x["id"]): (_text(x["prompt"]), _text(x["response"]), int(x["label"]), _text(x["source"]))
      for x in (sources[name][i] for i in range(len(sources[name])))
    }
    assert stored == {r.id: (r.prompt, r.response, r.label, r.source) for r in rows}
  assert builder.info.metadata["split_counts"] == report.split_counts
  assert builder.info.metadata["dropped_safety_phrases"] == {"lima": 15, "alpaca_eval": 4}
  files = {p.name for p in (tmp_path / "safety_mix" / "v1" / "2.1.0").iterdir()}
  assert "safety_mix-train.array_record-00000-of-00001" in files
  # A second builder reuses the prepared files, metadata included.
  again = SafetyMix(data_dir=str(tmp_path), config="v1")
  assert len(prepare(again)["test"]) == len(splits["test"])
  assert again.info.metadata["dropped_duplicates"] == 4


def _user_files(tmp_path):
  benign = tmp_path / "benign.csv"
  benign.write_text("question,answer\nHow do plants grow?,With light.\nName a colour.,Blue.\n")
  mixed = tmp_path / "mixed.jsonl"
  rows = [{"prompt": f"Harmful request {i}", "response": "I can't help.", "label": 1} for i in range(6)]
  rows += [{"prompt": f"Benign request {i}", "response": "Sure.", "label": 0} for i in range(6)]
  mixed.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  held_out = tmp_path / "held_out.jsonl"
  held_out.write_text(json.dumps({"prompt": "HARMFUL  request 0", "response": "No.", "label": 1}) + "\n")
  return [
    UserFile(str(benign), FieldMap(prompt="question", response="answer", label=None, source=None), default_label=0),
    UserFile(str(mixed)),
    UserFile(str(held_out), split="test", source="held_out"),
  ]


def test_user_files_with_field_mapping(tmp_path):
  files = _user_files(tmp_path)
  config = safety_mix_config(files, fractions={"train": 0.5, "validation": 0.25, "test": 0.25})
  builder = SafetyMix(data_dir=str(tmp_path / "tfds"), config=config)
  sources = prepare(builder)
  rows = {
    name: [(_text(x["prompt"]), int(x["label"]), _text(x["source"])) for x in (src[i] for i in range(len(src)))]
    for name, src in sources.items()
  }
  assert sum(map(len, rows.values())) == 15 - 1  # "Harmful request 0" stays only in the fixed test split
  assert ("HARMFUL  request 0", 1, "held_out") in rows["test"]
  assert ("How do plants grow?", 0, "benign") in [r for v in rows.values() for r in v]
  assert builder.info.metadata["dropped_duplicates"] == 1
  # The config name fingerprints the files: editing one gives a fresh dataset directory.
  with open(files[1].path, "a") as f:
    f.write(json.dumps({"prompt": "New", "response": "r", "label": 0}) + "\n")
  assert safety_mix_config(files, fractions={"train": 0.5, "validation": 0.25, "test": 0.25}).name != config.name


def test_user_file_errors_surface_with_location(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "response": "b", "label": 0}\n{"prompt": "a", "response": "b", "label": 3}\n')
  builder = SafetyMix(data_dir=str(tmp_path / "tfds"), config=safety_mix_config([UserFile(str(bad))]))
  with pytest.raises(DataError, match=f"{bad}:2: label outside"):
    prepare(builder)
  config = safety_mix_config([UserFile(str(bad))], skip_bad_records=True, fractions={"train": 1.0})
  builder = SafetyMix(data_dir=str(tmp_path / "tfds2"), config=config)
  assert len(prepare(builder)["train"]) == 1
  assert builder.info.metadata["skipped_bad_records"] == 1


def test_pretrain_corpus(tmp_path):
  docs = tmp_path / "wiki.jsonl"
  rows = [{"text": f"Article {i} about gardening.", "safety": i % 3 == 0} for i in range(40)]
  for r in rows:
    r["safety"] = int(r["safety"])
  docs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  config = pretrain_corpus_config([docs], label_field="safety", validation_fraction=0.25)
  builder = SafetyPretrainCorpus(data_dir=str(tmp_path / "tfds"), config=config)
  sources = prepare(builder)
  assert len(sources["train"]) + len(sources["validation"]) == 40
  # Stratified: a quarter of the 14 malicious and of the 26 benign documents, rounded per label.
  assert len(sources["validation"]) == 3 + 6
  texts = {_text(sources["train"][i]["text"]) for i in range(len(sources["train"]))}
  assert not texts & {_text(sources["validation"][i]["text"]) for i in range(9)}
  assert builder.info.metadata["split_counts"]["validation"]["malicious"] > 0
  with pytest.raises(ValueError, match="needs files"):
    prepare(SafetyPretrainCorpus(data_dir=str(tmp_path / "none"), config=PretrainCorpusConfig(name="empty")))


def test_pretrain_corpus_splits_like_assign_splits_without_holding_the_corpus(tmp_path):
  """The builder reads documents as a stream; its splits must be exactly `assign_splits`' over the
  whole list (the reference), duplicates (up to case and spacing) and conflicting labels included."""
  from clsalign_jax.data.records import assign_splits, read_text_records

  rows = [{"text": f"Document {i} on topic {i % 7}.", "label": int(i % 5 == 0)} for i in range(300)]
  rows += [{"text": "document 3 ON topic 3.", "label": 1}, {"text": "Document  10 on topic 3.", "label": 0}]
  rows += [{"text": "", "label": 0}, {"text": "x", "label": 9}]  # skipped
  files = []
  for k in range(2):
    path = tmp_path / f"part{k}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[k::2]))
    files.append(str(path))
  config = pretrain_corpus_config(files, validation_fraction=0.1, skip_bad_records=True, split_seed=5)
  builder = SafetyPretrainCorpus(data_dir=str(tmp_path / "tfds"), config=config)
  sources = prepare(builder)
  records = [r for f in files for r in read_text_records(f, skip_bad_records=True).records]
  expected = assign_splits(records, {"train": 0.9, "validation": 0.1}, seed=5, key=lambda r: r.text)
  for name, src in sources.items():
    stored = sorted((_text(x["id"]), _text(x["text"]), int(x["label"])) for x in (src[i] for i in range(len(src))))
    assert stored == sorted((r.id, r.text, r.label) for r in expected[name])
  assert 0 < len(sources["validation"]) < len(sources["train"])
  assert builder.info.metadata["read"] == 304 and builder.info.metadata["skipped_bad_records"] == 2
  assert builder.info.metadata["split_counts"] == {
    name: {"benign": sum(r.label == 0 for r in rs), "malicious": sum(r.label == 1 for r in rs)}
    for name, rs in expected.items()
  }


def test_pretrain_corpus_too_small_for_a_validation_split_is_refused_by_name(tmp_path):
  # 20 documents at the default 1 % leave the validation split empty (rounding per label): one
  # DataError naming the file, not TFDS's assertion on an empty split.
  docs = tmp_path / "tiny.jsonl"
  docs.write_text("".join(json.dumps({"text": f"Note {i} on bread.", "label": i % 2}) + "\n" for i in range(20)))
  builder = SafetyPretrainCorpus(data_dir=str(tmp_path / "tfds"), config=pretrain_corpus_config([docs]))
  with pytest.raises(DataError, match=r"tiny\.jsonl: 20 documents leave the 'validation' split empty"):
    prepare(builder)
