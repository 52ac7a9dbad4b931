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
    "| advbench | prefill | 50.0 |  |",
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
