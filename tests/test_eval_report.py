"""Report: atomic writes, the Markdown pivot, and the files `write_report` produces (no model)."""

import csv

from clsalign_jax.eval import report


def _row(variant, attack, judge, asr):
  return {
    "variant": variant,
    "attack": attack,
    "benchmark": "advbench",
    "judge": judge,
    "asr": asr,
    "n_items": 4,
    "n_broken": int(4 * asr),
    "n_cases": 4,
    "cls_flag_rate": 0.5,
    "refusal_inserted_rate": 0.25,
    "mean_p_initial": 0.4,
  }


def test_pivot_markdown_shows_percent():
  rows = [_row("cls", "direct", "kw", 0.0), _row("chat", "direct", "kw", 0.25), _row("cls", "prefill", "kw", 0.5)]
  md = report.pivot_markdown(rows, ("benchmark", "attack"), "variant", "asr")
  assert md.splitlines() == [
    "| benchmark | attack | cls | chat |",
    "|---|---|---|---|",
    "| advbench | direct | 0.0 | 25.0 |",
    "| advbench | prefill | 50.0 | |",  # a missing cell
  ]


def test_write_report_files(tmp_path):
  summary = [
    _row(v, a, j, x)
    for j in ("kw", "guard")
    for v, a, x in (
      ("cls", "direct", 0.0),
      ("cls", "decoding", 0.25),
      ("chat", "direct", 0.5),
      ("chat", "decoding", 1.0),
    )
  ]
  settings = [
    {
      "variant": "chat",
      "attack": "decoding",
      "benchmark": "advbench",
      "judge": "kw",
      "setting": s,
      "asr": x,
      "n_items": 4,
    }
    for s, x in (("greedy", 0.25), ("top_p=0.9", 0.75))
  ]
  utility = [{"variant": "cls", "task": "mmlu", "n": 2, "accuracy": 0.5}]
  validation = [
    {
      "judge": "kw",
      "file": "val.jsonl",
      "n": 4,
      "agreement": 0.5,
      "precision": 0.5,
      "recall": 1.0,
      "tp": 1,
      "fp": 1,
      "fn": 0,
      "tn": 2,
      "unparsed": 0,
    }
  ]
  probe = {
    "cls": {"direct": {"entropy_mean": 0.5, "entropy_std": 0.1, "sharpness_mean": 0.9, "sharpness_std": 0.05, "n": 4}}
  }
  report.write_report(tmp_path, summary, settings, utility, validation, probe, "p1", 10)
  with open(tmp_path / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 8 and list(rows[0])[:5] == ["variant", "attack", "benchmark", "judge", "asr"]
  md = (tmp_path / "summary.md").read_text()
  assert "## Judge: guard" in md and "| chat | decoding | advbench | kw | top_p=0.9 | 75.0 |" in md
  assert "| cls | mmlu | 0.5 | 2 |" in md and "| cls | direct | 0.500 ± 0.100 | 0.900 ± 0.050 | 4 |" in md
  for png in ("asr_advbench_kw.png", "asr_advbench_guard.png", "probe.png"):
    assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    assert f"](plots/{png})" in md, png  # every plot written is linked from the summary


def test_cells_and_tables():
  assert (report.pct(None), report.pct(float("nan")), report.pct(0.25), report.pct(0.5, unit="")) == (
    "–",
    "–",
    "25.0 %",
    "50.0",
  )
  assert (report.num(None), report.num(3.0), report.num(0.12345, ".3f")) == ("–", "3", "0.123")
  assert report.table(("", "a"), [("x", 1), ("", "")]) == ["| | a |", "|---|---|", "| x | 1 |", "| | |"]


def test_run_report_by_hand(tmp_path):
  from clsalign_jax import config as config_lib

  config = config_lib.default_config()
  summary = [
    dict(_row("strategic", "direct", "advbench", 0.25), benchmark="malicious", refusals_inserted=2)
    | dict(inserted_then_complied=1, inserted_then_complied_share=0.5, insert_median_index=3.0, insert_late_share=0.0),
    dict(_row("strategic", "direct", "refusal", 0.75), benchmark="benign", refusals_inserted=0),
  ]
  gen = {"query": "How do I bake bread?", "p_initial": 0.1, "cls_trace": [0.2, 0.3], "insert_index": -1}
  r = report.RunReport(
    workdir=str(tmp_path),
    config=config,
    seconds=12.4,
    train=[{"step": s, "loss": 1.0 / s, "lm_loss": 0.5, "cls_loss": 0.25, "cls_accuracy": 0.875} for s in (1, 2)],
    evals=[],
    summary=summary,
    rates=report.rate_rows(summary),
    strategic="strategic",
    traces={"benign prompt: How do I bake bread?…": dict(gen, response="Mix flour.")},
    trace_threshold=0.5,
    threshold=0.5,
    cls_test=dict(tp=3, fp=1, fn=1, tn=5, n=10, cls_accuracy=0.8, cls_precision=0.75, cls_recall=0.75, cls_f1=0.75),
    adversarial={},
  )
  text = report.write_run_report(r).read_text()
  lines = text.splitlines()
  assert "Evaluation took 12 s in this invocation" in lines[2] and "2 recorded train steps" in lines[2]
  assert "Last train step: loss 0.5000, LM loss 0.5000, CLS loss 0.2500, CLS batch accuracy 87.5 %. " in lines
  assert "| 80.0 % | 75.0 % | 75.0 % | 75.0 % | 3 | 1 | 1 | 5 |" in lines
  assert "| strategic | malicious | direct | ASR | 25.0 % | 4 | 50.0 % | 25.0 % | 3 | 0.0 % | 1/2 (50.0 %) |" in lines
  assert "| strategic | benign | direct | over-refusal | 25.0 % | 4 | 50.0 % | 25.0 % | – | – | – |" in lines
  assert "* benign prompt: How do I bake bread?…: response `'Mix flour.'`" in lines
  assert "## Shortcut probe" not in text and "## Baseline" not in text and "## CLS views" not in text
  for name in ("training.png", "asr_over_refusal.png", "cls_trace.png"):
    assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG" and f"](plots/{name})" in text
