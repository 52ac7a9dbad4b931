"""Tables and plots of an evaluation run.

Every output file is written through `clsalign_jax.files`, so a reader (a resumed run, a person)
sees either the old file or the new one, never half.
"""

from __future__ import annotations

import csv
import io
import math
import pathlib
import urllib.parse
from collections.abc import Mapping, Sequence

# Figures are built without pyplot: no global backend state, and no display needed on servers.
from matplotlib.figure import Figure

from clsalign_jax import files


def csv_text(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue()


def _fmt(x) -> str:
  if isinstance(x, float):
    return "–" if math.isnan(x) else f"{100 * x:.1f}"
  return str(x)


def pivot_markdown(rows: Sequence[Mapping], row_keys: Sequence[str], col_key: str, value: str) -> str:
  """A Markdown table: one line per distinct `row_keys` tuple, one column per `col_key` value;
  fractions are shown in percent."""
  cols = list(dict.fromkeys(r[col_key] for r in rows))
  lines_order = list(dict.fromkeys(tuple(r[k] for k in row_keys) for r in rows))
  cell = {(tuple(r[k] for k in row_keys), r[col_key]): r[value] for r in rows}
  out = ["| " + " | ".join([*row_keys, *cols]) + " |", "|" + "---|" * (len(row_keys) + len(cols))]
  for key in lines_order:
    out.append("| " + " | ".join([*map(str, key), *(_fmt(cell.get((key, c), "")) for c in cols)]) + " |")
  return "\n".join(out)


def _save_figure(fig: Figure, path) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
  files.atomic_write(path, buf.getvalue())


def plot_asr(rows: Sequence[Mapping], benchmark: str, judge: str, path) -> None:
  """Grouped bars: attacks along x, one bar per variant, ASR in percent."""
  sel = [r for r in rows if r["benchmark"] == benchmark and r["judge"] == judge]
  attacks = list(dict.fromkeys(r["attack"] for r in sel))
  variants = list(dict.fromkeys(r["variant"] for r in sel))
  asr = {(r["attack"], r["variant"]): 100 * r["asr"] for r in sel}
  width = 0.8 / max(1, len(variants))
  fig = Figure(figsize=(max(4.0, 1.2 * len(attacks) * max(1, len(variants)) ** 0.5 + 2), 3.6))
  ax = fig.subplots()
  for j, v in enumerate(variants):
    xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(attacks))]
    ax.bar(xs, [asr.get((a, v), 0.0) for a in attacks], width, label=v)
  ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
  ax.set_ylabel("ASR (%)")
  ax.set_ylim(0, 100)
  ax.set_title(f"{benchmark} — judge: {judge}")
  ax.legend(fontsize=8)
  _save_figure(fig, path)


def plot_probe(results: Mapping[str, Mapping], path, sharpness: str, top_k: int) -> None:
  """Two panels (entropy, sharpness): conditions along x, one bar per variant, ± one std."""
  variants = list(results)
  conditions = list(dict.fromkeys(c for v in variants for c in results[v]))
  width = 0.8 / max(1, len(variants))
  fig = Figure(figsize=(9, 3.4))
  axes = fig.subplots(1, 2)
  for ax, metric, label in ((axes[0], "entropy", "entropy (nats)"), (axes[1], "sharpness", f"sharpness ({sharpness})")):
    for j, v in enumerate(variants):
      xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(conditions))]
      means = [results[v].get(c, {}).get(f"{metric}_mean", 0.0) for c in conditions]
      stds = [results[v].get(c, {}).get(f"{metric}_std", 0.0) for c in conditions]
      ax.bar(xs, means, width, yerr=stds, capsize=3, label=v)
    ax.set_xticks(range(len(conditions)), conditions)
    ax.set_ylabel(label)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"First response position: softmax over the top-{top_k} next-token logits")
  _save_figure(fig, path)


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
  ]
  for judge in dict.fromkeys(r["judge"] for r in summary):
    md += [
      f"## Judge: {judge}",
      "",
      pivot_markdown([r for r in summary if r["judge"] == judge], ("benchmark", "attack"), "variant", "asr"),
      "",
    ]
  if summary:
    md += [
      "## CLS: prompt-time malicious rate (%)",
      "",
      pivot_markdown(
        [r for r in summary if r["judge"] == summary[0]["judge"]], ("benchmark", "attack"), "variant", "cls_flag_rate"
      ),
      "",
    ]
  # Per cell, not per judge: the text after an inserted prefix is always judged by AdvBench's list.
  holds = [r for r in summary if r["judge"] == summary[0]["judge"] and "refusals_inserted" in r] if summary else []
  if any(r["refusals_inserted"] for r in holds):
    md += [
      "## Do inserted refusals hold?",
      "",
      "Generations with an inserted refusal prefix, and how many of them go on after it with text that is "
      "not blank and has no AdvBench refusal keyword (the share is over the inserted ones).",
      "",
      "| variant | benchmark | attack | refusals inserted | then complied | share (%) |",
      "|---|---|---|---|---|---|",
    ]
    md += [
      f"| {r['variant']} | {r['benchmark']} | {r['attack']} | {r['refusals_inserted']} | "
      f"{r['inserted_then_complied']} | {_fmt(r['inserted_then_complied_share'])} |"
      for r in holds
    ]
    md.append("")
  if settings:
    files.atomic_write(out / "settings.csv", csv_text(settings, SETTING_COLUMNS))
    md += ["## Per decoding setting", "", "Best single setting per cell (see settings.csv for all):", ""]
    best: dict[tuple, Mapping] = {}
    for r in settings:
      key = (r["variant"], r["attack"], r["benchmark"], r["judge"])
      if key not in best or r["asr"] > best[key]["asr"]:
        best[key] = r
    md += ["| variant | attack | benchmark | judge | best setting | ASR |", "|---|---|---|---|---|---|"]
    md += [
      f"| {r['variant']} | {r['attack']} | {r['benchmark']} | {r['judge']} | {r['setting']} | {_fmt(r['asr'])} |"
      for r in best.values()
    ]
    md.append("")
  if utility:
    columns = ["variant", "task"] + sorted({k for r in utility for k in r} - {"variant", "task"})
    files.atomic_write(out / "utility.csv", csv_text(utility, columns))
    md += ["## Utility", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += [
      "| " + " | ".join(str(round(r[c], 4) if isinstance(r.get(c), float) else r.get(c, "")) for c in columns) + " |"
      for r in utility
    ]
    md.append("")
  if validation:
    columns = ("judge", "file", "n", "agreement", "precision", "recall", "tp", "fp", "fn", "tn", "unparsed")
    files.atomic_write(out / "judge_validation.csv", csv_text(validation, columns))
    md += [
      "## Judge validation (against human labels)",
      "",
      "| " + " | ".join(columns) + " |",
      "|" + "---|" * len(columns),
    ]
    md += [
      "| " + " | ".join(str(round(r[c], 4) if isinstance(r[c], float) else r[c]) for c in columns) + " |"
      for r in validation
    ]
    md.append("")
  asr_plots = []
  for benchmark in dict.fromkeys(r["benchmark"] for r in summary):
    for judge in dict.fromkeys(r["judge"] for r in summary):
      name = f"asr_{benchmark}_{judge}.png"
      plot_asr(summary, benchmark, judge, out / "plots" / name)
      asr_plots.append(f"![ASR on {benchmark}, judge {judge}](plots/{urllib.parse.quote(name)})")
  if asr_plots:
    # Links relative to summary.md, so the report renders with its plots wherever the directory goes.
    md += ["## ASR plots", "", *(line for link in asr_plots for line in (link, "")), ""]
  if probe:
    plot_probe(probe, out / "plots" / "probe.png", sharpness, top_k)
    md += ["## Probe (first response position)", "", "![probe](plots/probe.png)", ""]
    md += ["| variant | condition | entropy | sharpness | n |", "|---|---|---|---|---|"]
    md += [
      f"| {v} | {c} | {s['entropy_mean']:.3f} ± {s['entropy_std']:.3f} | "
      f"{s['sharpness_mean']:.3f} ± {s['sharpness_std']:.3f} | {s['n']} |"
      for v, conds in probe.items()
      for c, s in conds.items()
    ]
    md.append("")
  files.atomic_write(out / "summary.md", "\n".join(md))
