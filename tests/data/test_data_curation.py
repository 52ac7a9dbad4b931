"""Mixture v2 (`data/curation.py`): sources, form balance, the form-only baseline, splits."""

import collections
import json

import pytest

from clsalign_jax.data import curation
from clsalign_jax.data.records import BENIGN, MALICIOUS, normalize_prompt


@pytest.fixture(scope="module")
def v2():
  return curation.build_mixture_v2()


def _stand_in_answers(path, prompts=None, skip=()):
  """A completions file answering every contrast prompt with "stand-in" (never shipped)."""
  rows = [
    json.loads(line) for line in curation.CONTRAST_PROMPTS.read_text(encoding="utf-8").split("\n") if line.strip()
  ]
  with open(path, "w", encoding="utf-8") as f:
    for r in rows if prompts is None else [{"prompt": p} for p in prompts]:
      if r["prompt"] not in skip:
        f.write(json.dumps({"prompt": r["prompt"], "label": "benign", "kind": "answer", "response": "stand-in"}) + "\n")
  return path


@pytest.fixture(scope="module")
def with_contrast(tmp_path_factory):
  """Mixture v2 with the contrast source, its answers from a stand-in file."""
  return curation.build_mixture_v2(contrast_answers=_stand_in_answers(tmp_path_factory.mktemp("c") / "answers.jsonl"))


@pytest.fixture(scope="module")
def without_contrast():
  return curation.build_mixture_v2(contrast_answers=None)


def _all(splits):
  return [r for rows in splits.values() for r in rows]


def _not_contrast(rows):
  return [r for r in rows if r.record.source != curation.CONTRAST_SOURCE]


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


def test_form_only_baseline_finds_a_planted_shortcut():
  # Benign prompts all open with "Write", malicious with "Research": the baseline must see it.
  train = [(f"Write note {i}", BENIGN) for i in range(30)] + [(f"Research topic {i}", MALICIOUS) for i in range(30)]
  test = [(f"Write item {i}", BENIGN) for i in range(10)] + [(f"Research thing {i}", MALICIOUS) for i in range(10)]
  assert curation.form_only_baseline(train, test)["auc"] == 1.0
  mixed = [(f"{w} x {i}", i % 2) for i in range(40) for w in ("Write", "Research")]
  assert curation.form_only_baseline(mixed, mixed)["auc"] < 0.6


@pytest.mark.parametrize("mix", ["v2", "with_contrast", "without_contrast"])
def test_v2_form_carries_no_label(mix, request):
  splits, report = request.getfixturevalue(mix)
  train = [(r.record.prompt, r.record.label) for r in splits["train"]]
  test = [(r.record.prompt, r.record.label) for r in splits["test"]]
  baseline = curation.form_only_baseline(train, test)
  print(f"{mix}: form-only baseline: test AUC {baseline['auc']:.3f} (n = {baseline['n_test']})")
  assert baseline["auc"] <= 0.65
  # The bounds hold for the balanced part; the contrast rows are added after the balancing, as
  # they are (curation.admit_contrast), and the baseline above is their check.
  lo, hi = curation.RATIO_BOUNDS
  counts = collections.Counter((r.form, r.record.label) for r in _not_contrast(_all(splits)))
  everything = collections.Counter((r.form, r.record.label) for r in _all(splits))
  for form in curation.FORMS:
    ratio = counts[form, BENIGN] / counts[form, MALICIOUS]
    assert lo <= ratio <= hi, (form, ratio)
    assert report.bucket_counts[form] == {"benign": counts[form, BENIGN], "malicious": counts[form, MALICIOUS]}
    assert report.bucket_counts_with_contrast[form] == {
      "benign": everything[form, BENIGN],
      "malicious": everything[form, MALICIOUS],
    }
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
  assert curation.main(["curation", "--docs", str(doc)]) == 0
  text = doc.read_text()
  assert "before" in text and "after" in text and "old" not in text
  assert "Form-only baseline" in text and "| first word | benign | malicious |" in text
  assert "Form-only baseline" in capsys.readouterr().out


# ----- the contrast source -----------------------------------------------------------------------


def test_contrast_rows_join_prompts_with_their_answers(with_contrast):
  splits, report = with_contrast
  shipped = [
    json.loads(line) for line in curation.CONTRAST_PROMPTS.read_text(encoding="utf-8").split("\n") if line.strip()
  ]
  rows = [r for r in _all(splits) if r.record.source == curation.CONTRAST_SOURCE]
  assert report.read[curation.CONTRAST_SOURCE] == len(shipped)
  dropped = sum(n for k, n in report.dropped.items() if k.startswith(f"{curation.CONTRAST_SOURCE}:"))
  assert len(rows) + dropped == len(shipped) and len(rows) >= 0.95 * len(shipped)
  by_prompt = {r["prompt"]: (n, r) for n, r in enumerate(shipped)}
  for r in rows:
    n, src = by_prompt[r.record.prompt]  # as written: never rewritten, so the answer fits the prompt
    assert r.record.id == f"contrast:{n}" and r.category == src["category"] and not r.rewritten_from
    assert r.record.label == BENIGN and r.record.response == "stand-in"
  # 80 / 5 / 15, stratified by form like every other source.
  n = collections.Counter(
    name for name, rs in splits.items() for r in rs if r.record.source == curation.CONTRAST_SOURCE
  )
  assert abs(n["test"] / len(rows) - 0.15) < 0.01 and abs(n["validation"] / len(rows) - 0.05) < 0.01
  assert report.source_counts["train"][curation.CONTRAST_SOURCE] == n["train"]
  assert report.bucket_counts_with_contrast != report.bucket_counts


def test_adding_the_contrast_source_moves_no_existing_row(with_contrast, without_contrast, v2):
  """The base model's completions and earlier results are keyed to the existing rows' splits and
  texts: the contrast source must leave every one of them where it was, as it was."""

  def rows_by_id(splits):
    return {
      r.record.id: (name, r.record.prompt, r.record.response, r.record.label, r.form)
      for name, rs in splits.items()
      for r in _not_contrast(rs)
    }

  before, after = rows_by_id(without_contrast[0]), rows_by_id(with_contrast[0])
  assert len(before) > 7000
  assert after == before
  by_prompt = {p: name for name, p, *_ in before.values()}
  assert {p: name for name, p, *_ in after.values()} == by_prompt
  # The orders within each split are the same too (ids in order).
  for name in without_contrast[0]:
    assert [r.record.id for r in _not_contrast(with_contrast[0][name])] == [
      r.record.id for r in without_contrast[0][name]
    ]
  # Prompts disjoint across splits with the contrast rows in.
  keys = {n: {normalize_prompt(r.record.prompt) for r in rows} for n, rows in with_contrast[0].items()}
  assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
  assert not keys["validation"] & keys["test"]
  # Without the answers file (today's shipped state) the mixture is the one without the source.
  if not curation.CONTRAST_ANSWERS.exists():
    assert rows_by_id(v2[0]) == before
    assert not [r for r in _all(v2[0]) if r.record.source == curation.CONTRAST_SOURCE]


def test_contrast_without_answers_file_contributes_nothing_and_says_so(tmp_path):
  report = curation.CurationReport()
  assert curation.read_contrast(report, tmp_path / "absent.jsonl") == []
  n = report.read[curation.CONTRAST_SOURCE]
  assert n > 700 and report.dropped == {"contrast: no answers file yet": n}
  assert "does not exist yet" in report.notes[0] and "absent.jsonl" in report.notes[0]


def test_contrast_checks_bypass_only_the_safety_topic_filter(tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  safety = "Why were serial killers such a popular subject of 1990s crime novels?"  # a safety phrase
  assert curation.mixture.contains_safety_phrase(safety)
  evaluation = next(iter(curation.mixture.load_advbench())).prompt
  texts = [
    safety,
    "What is the history of the crossbow?",
    "Not answered yet?",
    evaluation,
    "How can I pick a lock?",  # also a malicious prompt below
    "what is the history of the  crossbow?",  # duplicate up to case and spacing
    "Already in the mixture.",
    "Answered by a malicious row?",
  ]
  prompts.write_text("".join(json.dumps({"prompt": t, "label": "benign", "category": "x"}) + "\n" for t in texts))
  answers = _stand_in_answers(tmp_path / "answers.jsonl", texts, skip={"Not answered yet?"})
  lines = answers.read_text().split("\n")
  lines[-2] = json.dumps({"prompt": texts[-1], "label": "malicious", "kind": "compliance", "response": "Sure"})
  answers.write_text("\n".join(lines))
  report = curation.CurationReport()
  rows = curation.read_contrast(report, answers, prompts)
  assert report.dropped == {"contrast: no answer yet": 1, "contrast: answer row is not a benign answer": 1}
  assert [r.record.id for r in rows] == [
    "contrast:0",
    "contrast:1",
    "contrast:3",
    "contrast:4",
    "contrast:5",
    "contrast:6",
  ]

  def row(prompt, label):
    return curation.Row(curation.SftRecord("m", prompt, "r", label, "s"), "", curation.prompt_form(prompt))

  read = [row("How can I pick a lock?", MALICIOUS)]
  mixture_rows = [row("Already in the mixture.", BENIGN)]
  kept = curation.admit_contrast(rows, mixture_rows, read, curation.evaluation_prompts(), report)
  assert [r.record.prompt for r in kept] == [safety, "What is the history of the crossbow?"]
  assert report.dropped == {
    "contrast: no answer yet": 1,
    "contrast: answer row is not a benign answer": 1,
    "contrast: prompt of an evaluation set": 1,
    "contrast: prompt carries both labels": 1,
    "contrast: duplicate prompt": 2,
  }


def test_curation_command_counts_the_contrast_rows_with_given_answers(tmp_path, capsys):
  answers = _stand_in_answers(tmp_path / "answers.jsonl")
  assert curation.main(["curation", f"--contrast_answers={answers}"]) == 0
  out = capsys.readouterr().out
  assert "| contrast | benign |" in out and "Contrast rows joined with their answers" in out
