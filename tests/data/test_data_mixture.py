import hashlib

import pytest

from clsalign_jax.data import mixture
from clsalign_jax.data.records import BENIGN, MALICIOUS, SftRecord, normalize_prompt

# Upstream git blob ids, as recorded in each SOURCE.md.
BLOB_SHA1 = {
  mixture.LIMA_FILE: "f7c72481a69a374aa3d9e1013390c6b1fcde0873",
  mixture.ALPACA_EVAL_FILE: "9b42638dd9c74a21adaaff9fed3de9f3f0f43ed2",
  mixture.SAFETY_TUNED_LLAMAS_FILE: "d88a92ea00f189f635fdb893de94d45e444d9c71",
  mixture.ADVBENCH_FILE: "cdc99eb96cb32cb3483a7f39940b3bddf44790c3",
}


def test_shipped_files_are_the_upstream_blobs():
  for path, sha1 in BLOB_SHA1.items():
    data = path.read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert blob == sha1, path
    assert (path.parent / "SOURCE.md").is_file() and (path.parent / "LICENSE.md").is_file()


def test_counts(shipped):
  splits, report = shipped
  assert report.read == {"lima": 1029, "alpaca_eval": 805, "safety_tuned_llamas": 2483, "advbench": 520}
  assert report.multi_turn_first_turn_used == 29
  assert report.dropped_empty_response == {"alpaca_eval": 2}
  assert report.dropped_safety_phrases == {"lima": 15, "alpaca_eval": 4}
  assert report.dropped_duplicates == 4
  assert report.dropped_label_conflicts == report.dropped_eval_overlap == report.dropped_split_overlap == 0
  assert report.split_counts == {
    "train": {"benign": 1632, "malicious": 2231},
    "validation": {"benign": 91, "malicious": 124},
    "test": {"benign": 90, "malicious": 124},
    "advbench": {"benign": 0, "malicious": 520},
  }
  for name, counts in report.split_counts.items():
    rows = splits[name]
    assert counts == {
      "benign": sum(r.label == BENIGN for r in rows),
      "malicious": sum(r.label == MALICIOUS for r in rows),
    }


def test_keyword_filter_removes_the_papers_lima_prompts(shipped):
  splits, report = shipped
  removed = set(report.dropped_safety_phrase_prompts)
  lima, _ = mixture.load_lima()
  by_id = {r.id: r for r in lima}
  removed_lima = [by_id[i].prompt for i in removed if i in by_id]
  assert len(removed_lima) == 15
  assert any("hitman" in p for p in removed_lima) and any("fake ID" in p for p in removed_lima)
  kept = [r for rows in splits.values() for r in rows if r.label == BENIGN]
  assert not any(mixture.contains_safety_phrase(r.prompt) for r in kept)


def test_no_prompt_shared_between_splits_and_advbench_held_out(shipped):
  splits, _ = shipped
  keys = {name: {normalize_prompt(r.prompt) for r in rows} for name, rows in splits.items()}
  names = list(keys)
  for i, a in enumerate(names):
    for b in names[i + 1 :]:
      assert not keys[a] & keys[b], (a, b)
  assert all(r.source == "advbench" for r in splits["advbench"])
  assert not any(r.source == "advbench" for n in ("train", "validation", "test") for r in splits[n])


def test_split_is_stratified_and_deterministic(shipped):
  splits, _ = shipped
  again, _ = mixture.build_safety_mix()
  assert {n: [r.id for r in rows] for n, rows in again.items()} == {
    n: [r.id for r in rows] for n, rows in splits.items()
  }
  share = {n: sum(r.label for r in splits[n]) / len(splits[n]) for n in ("train", "validation", "test")}
  assert max(share.values()) - min(share.values()) < 0.02


def test_first_turn_of_multi_turn_lima(shipped):
  lima, multi = mixture.load_lima()
  assert multi == 29 and len(lima) == 1029
  assert all(r.prompt.strip() and r.response.strip() for r in lima)


def test_curate_counts_conflicts_and_fixed_splits():
  report = mixture.MixtureReport()
  records = [
    SftRecord("a", "Same question", "x", BENIGN, "u"),
    SftRecord("b", "same  QUESTION", "y", MALICIOUS, "u"),
    SftRecord("c", "Write a script to hack", "no", MALICIOUS, "u"),
    SftRecord("d", "Tell me about curse words", "x", BENIGN, "u"),
    SftRecord("e", "Plain", "p", BENIGN, "u"),
  ]
  fixed = {"test": [SftRecord("f", "plain", "p", BENIGN, "u")]}
  eval_records = [SftRecord("g", "write a script to HACK", "Sure", MALICIOUS, "advbench")]
  splits = mixture.curate(records, report, fractions={"train": 1.0}, eval_records=eval_records, fixed_splits=fixed)
  assert report.dropped_label_conflicts == 2
  assert report.dropped_eval_overlap == 1
  assert report.dropped_safety_phrases == {"u": 1}
  # "Plain" and the fixed test record "plain" collide: the held-out copy wins.
  assert report.dropped_duplicates == 1
  assert [r.id for r in splits["test"]] == ["f"] and splits["train"] == []


@pytest.mark.parametrize("prompt", ["How do I get a FAKE id?", "hire  a\nhitman"])
def test_phrase_match_ignores_case_and_whitespace(prompt):
  assert mixture.contains_safety_phrase(prompt)
