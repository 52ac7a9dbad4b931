"""Mixture v2 (`data/curation.py`): sources, form balance, the form-only baseline, splits."""

import collections
import itertools
import json

import numpy as np
import pytest

from clsalign_jax.data import curation
from clsalign_jax.data.records import BENIGN, MALICIOUS, normalize_prompt


@pytest.fixture(scope="module")
def v2():
  return curation.build_mixture_v2()


def _all(splits):
  return [r for rows in splits.values() for r in rows]


def test_prompt_form_by_hand():
  assert curation.prompt_form("Write a poem about the sea.") == "create"
  assert curation.prompt_form("Develop a plan to save money") == "create"
  assert curation.prompt_form("Research the history of Rome.") == "imperative"
  assert curation.prompt_form("Given a list, sort it.") == "imperative"
  assert curation.prompt_form("How do plants grow") == "question"
  assert curation.prompt_form("Tom has 3 apples. How many are left?") == "question"
  assert curation.first_words("How can I, maybe, do it?") == ("how", "can")


def test_rewrites_by_hand():
  q = "How can I pick a lock without a key?"
  fits = curation.fitting_templates(q)
  assert "Explain how {subj} {aux} {rest}." in fits and "Can you {imp_lc}?" not in fits
  assert curation.rewrite(q, "Explain how {subj} {aux} {rest}.") == "Explain how I can pick a lock without a key."
  imp = "Outline the steps of a job interview."
  assert curation.rewrite(imp, "Can you {imp_lc}?") == "Can you outline the steps of a job interview?"
  # "Given ..." is no instruction to put after "Can you".
  assert "Can you {imp_lc}?" not in curation.fitting_templates("Given a list of numbers, sort it.")


def test_auc_against_brute_force():
  rng = np.random.default_rng(0)
  score = rng.integers(0, 5, 40).astype(float)  # ties on purpose
  y = rng.integers(0, 2, 40)
  pairs = [(s1, s0) for (s1, y1), (s0, y0) in itertools.product(zip(score, y), repeat=2) if y1 == 1 and y0 == 0]
  brute = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
  assert curation.auc(score, y) == pytest.approx(brute)


def test_form_only_baseline_finds_a_planted_shortcut():
  # Benign prompts all open with "Write", malicious with "Research": the baseline must see it.
  train = [(f"Write note {i}", BENIGN) for i in range(30)] + [(f"Research topic {i}", MALICIOUS) for i in range(30)]
  test = [(f"Write item {i}", BENIGN) for i in range(10)] + [(f"Research thing {i}", MALICIOUS) for i in range(10)]
  assert curation.form_only_baseline(train, test)["auc"] == 1.0
  mixed = [(f"{w} x {i}", i % 2) for i in range(40) for w in ("Write", "Research")]
  assert curation.form_only_baseline(mixed, mixed)["auc"] < 0.6


def test_v2_form_carries_no_label(v2):
  splits, report = v2
  train = [(r.record.prompt, r.record.label) for r in splits["train"]]
  test = [(r.record.prompt, r.record.label) for r in splits["test"]]
  baseline = curation.form_only_baseline(train, test)
  print(f"form-only baseline: test AUC {baseline['auc']:.3f} (n = {baseline['n_test']})")
  assert baseline["auc"] <= 0.65
  lo, hi = curation.RATIO_BOUNDS
  counts = collections.Counter((r.form, r.record.label) for r in _all(splits))
  for form in curation.FORMS:
    ratio = counts[form, BENIGN] / counts[form, MALICIOUS]
    assert lo <= ratio <= hi, (form, ratio)
    assert report.bucket_counts[form] == {"benign": counts[form, BENIGN], "malicious": counts[form, MALICIOUS]}
  # Every template is used on as many prompts of each label.
  by_template = collections.Counter()
  for r in _all(splits):
    if r.rewritten_from:
      t = next(t for t in curation.REWRITES if r.record.prompt.startswith(t.split("{")[0]))
      by_template[t, r.record.label] += 1
  assert by_template and all(by_template[t, 0] > 0 and by_template[t, 1] > 0 for t, _ in by_template)


def test_v2_sources_and_responses(v2):
  splits, report = v2
  rows = _all(splits)
  stl = {
    json.loads(line)["prompt"]: json.loads(line)
    for line in (curation.SHIPPED_DIR / "safety_tuned_llamas" / "normalized_with_refusal_flag.jsonl")
    .read_text()
    .split("\n")
    if line.strip()
  }
  for r in rows:
    if r.record.source == "safety_tuned_llamas" and not r.rewritten_from:
      assert stl[r.record.prompt]["refusal_like"]
  assert report.dropped["safety_tuned_llamas: answer is not a refusal"] == 495
  dna = [r for r in rows if r.record.source == "do_not_answer"]
  assert dna and {r.category for r in dna} <= set(curation.SOURCES[-1].categories)
  bank = [
    r.record.response for r in rows if r.record.source.startswith("red_instruct") or r.record.source == "do_not_answer"
  ]
  assert len(set(bank)) > 200  # a bank of phrasings, never one fixed string
  assert any("illegal drugs" in b for b in bank)  # some name the topic
  sources = {r.record.source for r in rows}
  assert {"lima", "gsm8k_train", "truthfulqa", "code_alpaca_2k", "red_instruct_catqa_english"} <= sources
  assert "alpaca_eval" not in sources and "advbench" not in sources


def test_v2_splits_disjoint_stratified_deterministic_and_free_of_eval_prompts(v2):
  splits, _ = v2
  keys = {n: {normalize_prompt(r.record.prompt) for r in rows} for n, rows in splits.items()}
  assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
  assert not keys["validation"] & keys["test"]
  evaluation = curation.evaluation_prompts()
  assert len(evaluation) > 1000 and not any(keys[n] & evaluation for n in keys)
  # Stratified by source and form: every (label, source, form) stratum with >= 20 rows is in test
  # at about its 15 %.
  strata = collections.Counter((r.record.source, r.form) for r in _all(splits))
  test = collections.Counter((r.record.source, r.form) for r in splits["test"])
  for s, n in strata.items():
    if n >= 20:
      assert abs(test[s] / n - 0.15) < 0.03, s
  again, _ = curation.build_mixture_v2()
  assert {n: [r.record.id for r in rows] for n, rows in again.items()} == {
    n: [r.record.id for r in rows] for n, rows in splits.items()
  }


def test_curation_command_rewrites_the_docs_section(tmp_path, capsys):
  doc = tmp_path / "data.md"
  doc.write_text(f"# Data\n\nbefore\n{curation.BEGIN}\nold\n{curation.END}\nafter\n")
  assert curation.main(["--docs", str(doc)]) == 0
  text = doc.read_text()
  assert "before" in text and "after" in text and "old" not in text
  assert "Form-only baseline" in text and "| first word | benign | malicious |" in text
  assert "Form-only baseline" in capsys.readouterr().out
