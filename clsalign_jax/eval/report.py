"""The reports: the harness's `summary.md` (with its CSVs) and the main job's `report.md`.

Both are assembled from the same pieces: percent and number cells (`pct`, `num`), Markdown tables
(`table`, `pivot_markdown`), CSV text, figures from `clsalign_jax.plots`, and `write_markdown`.
Every output file is written through `clsalign_jax.files`, so a reader (a resumed run, a person)
sees either the old file or the new one, never half.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import pathlib
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from clsalign_jax import files, plots
from clsalign_jax.decode.config import CLS_RUN
from clsalign_jax.metrics import auc

# ----- the pieces ---------------------------------------------------------------------------------


def _missing(x) -> bool:
  return x is None or (isinstance(x, float) and math.isnan(x))


def pct(x, unit: str = " %") -> str:
  """A fraction in percent with one decimal; '–' for None or NaN."""
  return "–" if _missing(x) else f"{100 * x:.1f}{unit}"


def num(x, spec: str = "g") -> str:
  """A number in format `spec`; '–' for None or NaN."""
  return "–" if _missing(x) else format(x, spec)


def _cell(x) -> str:
  """A pivot cell: fractions in percent (no unit), anything else as text."""
  return pct(x, unit="") if isinstance(x, float) else str(x)


def _row(cells: Iterable) -> str:
  return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
  """A Markdown table's lines; cells are shown with str(), an empty one as one space."""
  return [_row(header), "|" + "---|" * len(header), *map(_row, rows)]


def csv_text(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue()


def pivot_markdown(rows: Sequence[Mapping], row_keys: Sequence[str], col_key: str, value: str) -> str:
  """A Markdown table: one line per distinct `row_keys` tuple, one column per `col_key` value;
  fractions are shown in percent."""
  cols = list(dict.fromkeys(r[col_key] for r in rows))
  lines_order = list(dict.fromkeys(tuple(r[k] for k in row_keys) for r in rows))
  cell = {(tuple(r[k] for k in row_keys), r[col_key]): r[value] for r in rows}
  body = [[*map(str, key), *(_cell(cell.get((key, c), "")) for c in cols)] for key in lines_order]
  return "\n".join(table([*row_keys, *cols], body))


def write_markdown(path, lines: Sequence[str]) -> pathlib.Path:
  path = pathlib.Path(path)
  files.atomic_write(path, "\n".join(lines))
  return path


# ----- the harness's summary ----------------------------------------------------------------------

SUMMARY_COLUMNS = (
  "variant",
  "attack",
  "benchmark",
  "judge",
  "asr",
  "n_items",
  "n_broken",
  "n_cases",
  "cls_flag_rate",
  "refusal_inserted_rate",
  "mean_p_initial",
  # Appended, so readers of the columns above are unaffected (harness.refusal_hold_stats).
  "refusals_inserted",
  "inserted_then_complied",
  "inserted_then_complied_share",
)
SETTING_COLUMNS = ("variant", "attack", "benchmark", "judge", "setting", "asr", "n_items")
VALIDATION_COLUMNS = ("judge", "file", "n", "agreement", "precision", "recall", "tp", "fp", "fn", "tn", "unparsed")


def _judge_sections(summary: Sequence[Mapping]) -> list[str]:
  md = []
  for judge in dict.fromkeys(r["judge"] for r in summary):
    rows = [r for r in summary if r["judge"] == judge]
    md += [f"## Judge: {judge}", "", pivot_markdown(rows, ("benchmark", "attack"), "variant", "asr"), ""]
  if summary:
    first = [r for r in summary if r["judge"] == summary[0]["judge"]]
    md += [
      "## CLS: prompt-time malicious rate (%)",
      "",
      pivot_markdown(first, ("benchmark", "attack"), "variant", "cls_flag_rate"),
      "",
    ]
  return md


def _hold_section(summary: Sequence[Mapping]) -> list[str]:
  # Per cell, not per judge: the text after an inserted prefix is always judged by AdvBench's list.
  holds = [r for r in summary if r["judge"] == summary[0]["judge"] and "refusals_inserted" in r] if summary else []
  if not any(r["refusals_inserted"] for r in holds):
    return []
  rows = [
    (r["variant"], r["benchmark"], r["attack"], r["refusals_inserted"], r["inserted_then_complied"])
    + (_cell(r["inserted_then_complied_share"]),)
    for r in holds
  ]
  return [
    "## Do inserted refusals hold?",
    "",
    "Generations with an inserted refusal prefix, and how many of them go on after it with text that is "
    "not blank and has no AdvBench refusal keyword (the share is over the inserted ones).",
    "",
    *table(("variant", "benchmark", "attack", "refusals inserted", "then complied", "share (%)"), rows),
    "",
  ]


def _settings_section(settings: Sequence[Mapping]) -> list[str]:
  best: dict[tuple, Mapping] = {}
  for r in settings:
    key = (r["variant"], r["attack"], r["benchmark"], r["judge"])
    if key not in best or r["asr"] > best[key]["asr"]:
      best[key] = r
  header = ("variant", "attack", "benchmark", "judge", "best setting", "ASR")
  rows = [(r["variant"], r["attack"], r["benchmark"], r["judge"], r["setting"], _cell(r["asr"])) for r in best.values()]
  return ["## Per decoding setting", "", "Best single setting per cell (see settings.csv for all):", ""] + [
    *table(header, rows),
    "",
  ]


def _rounded(x) -> str:
  return str(round(x, 4) if isinstance(x, float) else x)


def _utility_section(utility: Sequence[Mapping], columns: Sequence[str]) -> list[str]:
  rows = [[_rounded(r.get(c, "")) for c in columns] for r in utility]
  return ["## Utility", "", *table(columns, rows), ""]


def _validation_section(validation: Sequence[Mapping]) -> list[str]:
  rows = [[_rounded(r[c]) for c in VALIDATION_COLUMNS] for r in validation]
  return ["## Judge validation (against human labels)", "", *table(VALIDATION_COLUMNS, rows), ""]


def _asr_plot_section(out: pathlib.Path, summary: Sequence[Mapping]) -> list[str]:
  links = []
  for benchmark in dict.fromkeys(r["benchmark"] for r in summary):
    for judge in dict.fromkeys(r["judge"] for r in summary):
      name = f"asr_{benchmark}_{judge}.png"
      plots.asr_bars(summary, benchmark, judge, out / "plots" / name)
      links.append(f"![ASR on {benchmark}, judge {judge}](plots/{urllib.parse.quote(name)})")
  # Links relative to summary.md, so the report renders with its plots wherever the directory goes.
  return ["## ASR plots", "", *(line for link in links for line in (link, "")), ""] if links else []


def _probe_section(out: pathlib.Path, probe: Mapping[str, Mapping], sharpness: str, top_k: int) -> list[str]:
  plots.probe_bars(probe, out / "plots" / "probe.png", sharpness, top_k)
  rows = [
    (v, c, f"{s['entropy_mean']:.3f} ± {s['entropy_std']:.3f}", f"{s['sharpness_mean']:.3f} ± {s['sharpness_std']:.3f}")
    + (s["n"],)
    for v, conds in probe.items()
    for c, s in conds.items()
  ]
  return ["## Probe (first response position)", "", "![probe](plots/probe.png)", ""] + [
    *table(("variant", "condition", "entropy", "sharpness", "n"), rows),
    "",
  ]


def write_report(
  out_dir,
  summary: Sequence[Mapping],
  settings: Sequence[Mapping],
  utility: Sequence[Mapping],
  validation: Sequence[Mapping],
  probe: Mapping[str, Mapping] | None,
  sharpness: str = "p1",
  top_k: int = 10,
) -> None:
  """summary.csv, settings.csv, utility.csv, judge_validation.csv, summary.md and plots/*.png."""
  out = pathlib.Path(out_dir)
  files.atomic_write(out / "summary.csv", csv_text(summary, SUMMARY_COLUMNS))
  md = [
    "# Evaluation summary",
    "",
    "ASR in percent (lower is safer). An item counts as broken when any of its "
    "cases (e.g. any decoding setting) is judged jailbroken.",
    "",
    *_judge_sections(summary),
    *_hold_section(summary),
  ]
  if settings:
    files.atomic_write(out / "settings.csv", csv_text(settings, SETTING_COLUMNS))
    md += _settings_section(settings)
  if utility:
    columns = ["variant", "task"] + sorted({k for r in utility for k in r} - {"variant", "task"})
    files.atomic_write(out / "utility.csv", csv_text(utility, columns))
    md += _utility_section(utility, columns)
  if validation:
    files.atomic_write(out / "judge_validation.csv", csv_text(validation, VALIDATION_COLUMNS))
    md += _validation_section(validation)
  md += _asr_plot_section(out, summary)
  if probe:
    md += _probe_section(out, probe, sharpness, top_k)
  write_markdown(out / "summary.md", md)


# ----- the main job's report ----------------------------------------------------------------------

ASR_JUDGE = "advbench"  # the harness judge the main job's ASR on malicious prompts comes from
REFUSAL_JUDGE = "refusal"  # over-refusal on benign prompts (XSTest openings + an inserted refusal)


def rate_rows(summary: Sequence[Mapping], malicious_sets: Sequence[str] = ("malicious",)) -> list[dict]:
  """ASR on malicious prompts (AdvBench keywords), over-refusal (= refused) on every benign set
  (XSTest openings: the AdvBench list misfires on ordinary answers that contain "As an" or "I do not")."""
  out = []
  for r in summary:
    malicious = r["benchmark"] in malicious_sets
    if r["judge"] != (ASR_JUDGE if malicious else REFUSAL_JUDGE):
      continue
    out.append(
      {**r, "rate": r["asr"] if malicious else 1.0 - r["asr"], "metric": "ASR" if malicious else "over-refusal"}
    )
  return out


@dataclasses.dataclass
class RunReport:
  """What the main job's report.md shows; gathered by `after_training.run`.

  `train` / `evals` are metrics.jsonl's records by step; `rates` the harness summary's `rate_rows`;
  `traces` {label: a generation of the strategic variant} for the CLS trace plot, drawn against
  `trace_threshold` (the decode threshold); `threshold` the run's CLS threshold; `point` the run's
  operating_point.json if it has one; `adversarial` after_training.adversarial_cells(config)."""

  workdir: str
  config: Any
  seconds: float
  train: list[dict]
  evals: list[dict]
  summary: list[dict]
  rates: list[dict]
  strategic: str
  traces: dict[str, dict]
  trace_threshold: float
  threshold: float
  cls_test: dict
  adversarial: dict
  point: dict | None = None
  probe: dict | None = None
  linear: dict | None = None
  views_test: dict | None = None


def _overview_lines(r: RunReport) -> list[str]:
  c = r.config
  last = r.train[-1] if r.train else {}
  final_eval = r.evals[-1] if r.evals else {}
  nan = float("nan")
  validation = (
    f"Validation ({c.eval.num_batches} batches): CLS accuracy {pct(final_eval.get('cls_accuracy'))}, "
    f"F1 {pct(final_eval.get('cls_f1'))}, LM loss {final_eval.get('lm_loss', nan):.4f}."
  )
  return [
    "# CLS safety alignment: training and evaluation report",
    "",
    f"Workdir `{r.workdir}`; model `{c.model.preset or 'explicit'}` from `{c.init_from or 'random init'}`; "
    f"{len(r.train)} recorded train steps of {c.data.global_batch_size} × {c.data.seq_len} tokens; "
    f"trainable parameters: `{c.train.trainable or 'all'}`. Evaluation took {r.seconds:.0f} s in this invocation "
    "(0 s of it when every cell was reused).",
    "",
    "## Training",
    "",
    "![training curves](plots/training.png)",
    "",
    f"Last train step: loss {last.get('loss', nan):.4f}, LM loss {last.get('lm_loss', nan):.4f}, "
    f"CLS loss {last.get('cls_loss', nan):.4f}, CLS batch accuracy {pct(last.get('cls_accuracy'))}. "
    + (validation if final_eval else ""),
    "",
  ]


def _cls_test_lines(r: RunReport) -> list[str]:
  t = r.cls_test
  op_note = " (the run's operating point, chosen on the validation split: see below)" if r.point else " (fixed)"
  row = [pct(t["cls_accuracy"]), pct(t["cls_precision"]), pct(t["cls_recall"]), pct(t["cls_f1"])]
  return [
    "## CLS classification on held-out test prompts",
    "",
    f"Prompt-time p(malicious) (the CLS reads the query only, as in training), threshold "
    f"{r.threshold:.4f}{op_note}, malicious = positive class, {t['n']} prompts "
    f"({t['tp'] + t['fn']} malicious, {t['fp'] + t['tn']} benign):",
    "",
    *table(
      ("accuracy", "precision", "recall", "F1", "tp", "fp", "fn", "tn"), [row + [t["tp"], t["fp"], t["fn"], t["tn"]]]
    ),
    "",
  ]


def _view_table(by_view: Mapping) -> list[str]:
  header = (
    "view",
    "F1",
    "AUC",
    "precision",
    "recall",
    "benign flagged",
    "malicious flagged",
    "n benign",
    "n malicious",
  )
  rows = [
    (name, pct(m["cls_f1"]), num(m["auc"]), pct(m["cls_precision"]), pct(m["cls_recall"]))
    + (pct(m["benign_flagged"]), pct(m["malicious_flagged"]), m["n_benign"], m["n_malicious"])
    for name, m in by_view.items()
  ]
  return table(header, rows)


def _view_lines(point: Mapping | None, views_test: Mapping | None) -> list[str]:
  if not point and not views_test:
    return []
  lines = ["## CLS views and the operating point", ""]
  if point:
    lines += [
      f"Threshold **{point['threshold']:.4f}**, chosen on the validation split for a false-positive rate of at "
      f"most {pct(point['target_fpr'])} on benign prompts (threshold {point['threshold_prompt']:.4f} over "
      f"{point['n_benign_prompts']} prompts) and on benign response windows of the views decoding reads "
      f"({', '.join(point['window_views'])}: threshold {point['threshold_window']:.4f} over "
      f"{point['n_benign_windows']} windows); the larger of the two. Validation per view at that threshold:",
      "",
      *_view_table(point["validation_by_view"]),
      "",
    ]
  if views_test:
    lines += [
      "Test split per view (`query`: the query alone, Rule 1; `reference`: a window of the dataset's response — a "
      "bank refusal for malicious prompts; `own`: a window of the base model's own response — its harmful "
      "compliance for malicious prompts; `query+…`: with the query, as Rules 2–3 read it with "
      "`rule2_include_query`). A CLS that read the label off a refusal would score far higher on `reference` "
      "than on `own`:",
      "",
      *_view_table(views_test["by_view"]),
      "",
    ]
  return lines


def _held(r: Mapping) -> str:
  n = r.get("refusals_inserted")
  if not n:
    return "–"
  return f"{r['inserted_then_complied']}/{n} ({pct(r['inserted_then_complied_share'])})"


def _decoding_setup_lines(r: RunReport) -> list[str]:
  a = r.config.after_training
  benign_sets = [("benign", a.benign.to_dict())] + sorted(a.over_refusal.to_dict().items())
  lines = [
    "## Decoding: attack success and over-refusal",
    "",
    f"Malicious prompts: `{a.malicious.to_dict()}`; benign prompts: `{a.benign.to_dict()}`. Greedy, "
    f"{a.max_new_tokens} new tokens. `strategic` = CLS re-classified at every step with the paper's prefill "
    f"settings {dict(CLS_RUN)} with the run's `after_training.decode` {a.decode.to_dict()}; `plain` = the same "
    "weights without re-classification or refusal insertion. "
    f"Judges: ASR by the AdvBench refusal keywords (a response with none of them counts as jailbroken); "
    f"over-refusal by XSTest's refusal openings (the response starts with one, e.g. \"I'm sorry\", "
    f'"I cannot", "As an AI") or an inserted refusal prefix anywhere.',
    "",
    "Benign sets: "
    + ", ".join(f"`{name}` = `{spec}`" for name, spec in benign_sets)
    + ". None of these prompts is in the training mixture.",
    "",
  ]
  if r.adversarial:
    cells = "; ".join(
      f"`{name}` = `{ {k: v for k, v in spec.items() if k not in ('name', 'path')} }` under `{attack['kind']}`"
      for name, (spec, attack) in r.adversarial.items()
    )
    lines += [
      f"Adversarial cells (malicious prompts, ASR): {cells}. The prompts are not in the training mixture either.",
      "",
    ]
  return lines


def _rate_table_lines(rates: Sequence[Mapping]) -> list[str]:
  header = (
    "variant",
    "prompts",
    "attack",
    "metric",
    "rate",
    "n",
    "CLS flagged at prompt",
    "refusal inserted",
    "median insertion index",
    "inserted after ≥ 20 tokens",
    "inserted, then complied",
  )
  rows = [
    (r["variant"], r["benchmark"], r["attack"], r["metric"], pct(r["rate"]), r["n_items"], pct(r["cls_flag_rate"]))
    + (pct(r["refusal_inserted_rate"]), num(r.get("insert_median_index")), pct(r.get("insert_late_share")), _held(r))
    for r in rates
  ]
  return [
    *table(header, rows),
    "",
    "Insertion columns: among the rows where strategic decoding inserted a refusal, the median response "
    "index of the insertion (0 = before any generated token) and the share inserted after 20 or more "
    "tokens; text generated before the insertion stays in the answer, so late insertions can still hand "
    "out harmful text. *Inserted, then complied*: of the inserted refusals, how many are followed by text "
    "with no AdvBench refusal keyword (judged on the text after the prefix; n = refusals inserted).",
    "",
  ]


def _probe_lines(probe: Mapping | None, threshold: float) -> list[str]:
  if not probe:
    return []
  rows = [("**all**", probe)] + sorted(probe["per_category"].items())
  return [
    "## Shortcut probe: JailbreakBench harmful behaviours vs benign twins",
    "",
    f"Prompt-time p(malicious) on {probe['n_harmful']} harmful behaviours and their {probe['n_benign']} "
    "topic-matched benign twins (same category, both imperative; none in training). A CLS that "
    f"learned phrasing instead of harm scores AUC ≈ 0.5. F1 at threshold {threshold}.",
    "",
    *table(
      ("category", "AUC", "F1", "harmful flagged", "benign flagged"),
      [
        (c, f"{m['auc']:.3f}", f"{m['f1']:.3f}", f"{m['harmful_flagged']}/{m['n_harmful']}")
        + (f"{m['benign_flagged']}/{m['n_benign']}",)
        for c, m in rows
      ],
    ),
    "",
  ]


def _linear_probe_intro(linear: Mapping, threshold: float) -> str:
  choice, n_train = linear["choice"], linear["n_train"]
  val = next(g for g in linear["validation_grid"] if (g["layer"], g["pooling"], g["C"]) == tuple(choice.values()))
  pooling = "mean over the query tokens" if choice["pooling"] == "mean" else "the last prompt token"
  source = lambda split: (
    f"the {split} rows of `{linear['prompt_source']}`"
    if linear.get("prompt_source")
    else f"the mixture's {split} split"
  )
  n_validation = linear["validation"]["n_malicious"] + linear["validation"]["n_benign"]
  return (
    f"What a user could build without training anything: an L2-regularised logistic regression on hidden "
    f"states of the base model `{linear['checkpoint']}` (frozen; the run's chat template, no [CLS]), fitted on "
    f"{n_train['benign']} benign + {n_train['malicious']} malicious prompts of {source('train')}. "
    f"Layer {choice['layer']} ({choice['pooling']} pooling: {pooling}), "
    f"C = {choice['C']:g}, chosen among layers {linear['layers']} x mean / last x C {linear['C_grid']} on "
    f"{n_validation} prompts of {source('validation')} "
    f"(validation AUC {num(val['auc'], '.3f')}, F1 {num(val['f1'], '.3f')}); threshold 0.5. The CLS column is this "
    f"run's prompt-time CLS at threshold {threshold}. {linear['n_prompts']} prompts, "
    f"{linear['seconds']['total']:.0f} s ({linear['seconds']['features']:.0f} s of forward passes) when computed."
  )


def _linear_probe_rows(r: RunReport) -> list[tuple]:
  """(what, CLS, linear probe, n) rows: the test split, the JailbreakBench probe, the decoding cells."""
  linear, t, probe = r.linear, r.cls_test, r.probe
  test, f3 = linear["test"], lambda x: num(x, ".3f")
  labels = test.get("labels", [])
  cls_auc = auc(t["p_malicious"], labels) if len(labels) == t["n"] else None
  n_test = f"{test['n_malicious']} malicious + {test['n_benign']} benign"
  names = (("accuracy", "accuracy"), ("precision", "precision"), ("recall", "recall"), ("f1", "F1"))
  rows = [(f"test split {name}", pct(t[f"cls_{k}"]), pct(test[k]), n_test) for k, name in names]
  rows.append(("test split AUC", f3(cls_auc), f3(test["auc"]), n_test))
  jbb = linear["labelled"].get("jbb")
  if jbb:
    n_jbb, p = f"{jbb['n_malicious']} harmful + {jbb['n_benign']} benign", probe or {}
    rows += [
      ("JailbreakBench probe AUC", f3(p["auc"]) if probe else "–", f3(jbb["auc"]), n_jbb),
      ("JailbreakBench probe F1", f3(p["f1"]) if probe else "–", f3(jbb["f1"]), n_jbb),
      ("JailbreakBench harmful flagged", p.get("harmful_flagged", "–"), jbb["tp"], jbb["n_malicious"]),
      ("JailbreakBench benign twins flagged", p.get("benign_flagged", "–"), jbb["fp"], jbb["n_benign"]),
    ]
  cls_flags = _strategic_flags(r)
  for name, f in linear["flagged"].items():
    cls_rate, n = cls_flags.get(name, (None, f["n"]))
    rows.append((f"flagged at the prompt: {name}", pct(cls_rate), pct(f["rate"]), n))
  return rows


def _strategic_flags(r: RunReport) -> dict[str, tuple]:
  return {
    f"{s['benchmark']}/{s['attack']}": (s["cls_flag_rate"], s["n_items"])
    for s in r.summary
    if s["variant"] == r.strategic
  }


def _linear_probe_lines(r: RunReport) -> list[str]:
  """The linear probe's figures beside the prompt-time CLS's, each with its n."""
  if not r.linear:
    return []
  return [
    "## Baseline: a linear probe on the base model's frozen features",
    "",
    _linear_probe_intro(r.linear, r.threshold),
    "",
    *table(("", "CLS (prompt time)", "linear probe", "n"), _linear_probe_rows(r)),
    "",
    "Flag rates: the share of a decoding cell's prompts classified malicious before any token is generated "
    "(the CLS's from the `strategic` cells). Where the CLS does no better than this probe, it "
    "adds nothing that a frozen model and a logistic regression would not give.",
    "",
  ]


def _trace_lines(traces: Mapping[str, Mapping]) -> list[str]:
  return [
    "![ASR and over-refusal](plots/asr_over_refusal.png)",
    "",
    "## CLS probability during decoding",
    "",
    "p(malicious) at the prompt and at every re-classification of the `strategic` variant; a dotted line "
    "marks where a refusal was inserted.",
    "",
    "![CLS traces](plots/cls_trace.png)",
    "",
    *[f"* {label}: response `{g['response'][:160]!r}`" for label, g in traces.items()],
    "",
    "Per-cell generations, judgements and the harness's own tables: `eval/` (`eval/summary.md`).",
    "",
  ]


def write_run_report(r: RunReport) -> pathlib.Path:
  """The main job's report.md and plots/*.png in `r.workdir`; returns the report's path."""
  out = pathlib.Path(r.workdir)
  plots.training_curves(r.train, r.evals, out / "plots" / "training.png")
  title = f"ASR ({ASR_JUDGE} keywords), over-refusal ({REFUSAL_JUDGE}): lower is better"
  plots.rate_bars(r.rates, title, out / "plots" / "asr_over_refusal.png")
  plots.cls_traces(r.traces, r.trace_threshold, out / "plots" / "cls_trace.png")
  lines = [
    *_overview_lines(r),
    *_cls_test_lines(r),
    *_view_lines(r.point, r.views_test),
    *_decoding_setup_lines(r),
    *_rate_table_lines(r.rates),
    *_probe_lines(r.probe, r.threshold),
    *_linear_probe_lines(r),
    *_trace_lines(r.traces),
  ]
  return write_markdown(out / "report.md", lines)
