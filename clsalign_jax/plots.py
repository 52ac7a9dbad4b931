"""The figures of the reports: the harness's ASR and probe bars (eval/summary.md) and the main job's
training curves, CLS traces and rate bars (report.md).

Figures are built without pyplot: no global backend switch, so importing this module leaves a
notebook's inline backend alone, and no GUI window is ever opened headless. Every PNG is written
through `clsalign_jax.files`, so a reader sees the old figure or the new one, never half.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from clsalign_jax import files


def save(fig: Figure, path, **savefig) -> None:
  """`fig` as a PNG at `path` (parents created), written atomically."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **savefig)
  files.atomic_write(path, buf.getvalue())


def _offsets(n_groups: int, n_bars: int, width: float, j: int) -> list[float]:
  return [i + (j - (n_bars - 1) / 2) * width for i in range(n_groups)]


# ----- the harness's summary ----------------------------------------------------------------------


def asr_bars(rows: Sequence[Mapping], benchmark: str, judge: str, path) -> None:
  """Grouped bars: attacks along x, one bar per variant, ASR in percent."""
  sel = [r for r in rows if r["benchmark"] == benchmark and r["judge"] == judge]
  attacks = list(dict.fromkeys(r["attack"] for r in sel))
  variants = list(dict.fromkeys(r["variant"] for r in sel))
  asr = {(r["attack"], r["variant"]): 100 * r["asr"] for r in sel}
  width = 0.8 / max(1, len(variants))
  fig = Figure(figsize=(max(4.0, 1.2 * len(attacks) * max(1, len(variants)) ** 0.5 + 2), 3.6))
  ax = fig.subplots()
  for j, v in enumerate(variants):
    ax.bar(_offsets(len(attacks), len(variants), width, j), [asr.get((a, v), 0.0) for a in attacks], width, label=v)
  ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
  ax.set_ylabel("ASR (%)")
  ax.set_ylim(0, 100)
  ax.set_title(f"{benchmark} — judge: {judge}")
  ax.legend(fontsize=8)
  save(fig, path, dpi=120, bbox_inches="tight")


def probe_bars(results: Mapping[str, Mapping], path, sharpness: str, top_k: int) -> None:
  """Two panels (entropy, sharpness): conditions along x, one bar per variant, ± one std."""
  variants = list(results)
  conditions = list(dict.fromkeys(c for v in variants for c in results[v]))
  width = 0.8 / max(1, len(variants))
  fig = Figure(figsize=(9, 3.4))
  axes = fig.subplots(1, 2)
  for ax, metric, label in ((axes[0], "entropy", "entropy (nats)"), (axes[1], "sharpness", f"sharpness ({sharpness})")):
    for j, v in enumerate(variants):
      means = [results[v].get(c, {}).get(f"{metric}_mean", 0.0) for c in conditions]
      stds = [results[v].get(c, {}).get(f"{metric}_std", 0.0) for c in conditions]
      xs = _offsets(len(conditions), len(variants), width, j)
      ax.bar(xs, means, width, yerr=stds, capsize=3, label=v)
    ax.set_xticks(range(len(conditions)), conditions)
    ax.set_ylabel(label)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"First response position: softmax over the top-{top_k} next-token logits")
  save(fig, path, dpi=120, bbox_inches="tight")


# ----- the main job's report ----------------------------------------------------------------------


def training_curves(train: Sequence[Mapping], evals: Sequence[Mapping], path) -> None:
  """LM loss, CLS loss and CLS accuracy against the step: train batches as lines, validation as dots."""
  fig = Figure(figsize=(13, 3.6))
  axes = fig.subplots(1, 3)
  for ax, key, title in zip(
    axes, ("lm_loss", "cls_loss", "cls_accuracy"), ("LM loss (SFT targets)", "CLS BCE loss", "CLS accuracy")
  ):
    ax.plot([r["step"] for r in train], [r[key] for r in train], label="train (batch)", lw=1)
    if evals:
      ax.plot([r["step"] for r in evals], [r[key] for r in evals], "o", label="validation")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  save(fig, path, dpi=110)


def cls_traces(traces: Mapping[str, Mapping], threshold: float, path) -> None:
  """p(malicious) at the prompt and at every re-classification of some generations; a dotted line
  where a refusal was inserted."""
  fig = Figure(figsize=(7, 3.6))
  ax = fig.subplots()
  for label, g in traces.items():
    ys = [g["p_initial"]] + list(g["cls_trace"])
    ax.plot(range(len(ys)), ys, marker=".", label=label)
    if g["insert_index"] >= 0:
      ax.axvline(g["insert_index"], ls=":", color="gray")
  ax.axhline(threshold, ls="--", color="red", lw=1, label="threshold")
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("re-classification (0 = prompt)")
  ax.set_ylabel("p(malicious)")
  ax.set_title("CLS probability during strategic decoding")
  ax.legend(fontsize=8)
  fig.tight_layout()
  save(fig, path, dpi=110)


def rate_bars(rows: Sequence[Mapping], title: str, path) -> None:
  """One group per (benchmark, attack) cell, one bar per variant: its `rate` in percent, labelled
  with the cell's `metric` (ASR or over-refusal)."""
  cells = sorted({(r["benchmark"], r["attack"]) for r in rows})
  variants = list(dict.fromkeys(r["variant"] for r in rows))
  fig = Figure(figsize=(max(7.0, 1.7 * len(cells)), 3.6))
  ax = fig.subplots()
  width = 0.8 / len(variants)
  for i, v in enumerate(variants):
    vals = [next(r["rate"] for r in rows if r["variant"] == v and (r["benchmark"], r["attack"]) == c) for c in cells]
    bars = ax.bar(np.arange(len(cells)) + i * width, [100 * x for x in vals], width, label=v)
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
  ax.set_xticks(np.arange(len(cells)) + width * (len(variants) - 1) / 2)
  metric = {(r["benchmark"], r["attack"]): r["metric"] for r in rows}
  ax.set_xticklabels([f"{metric[b, a]}\n{b} / {a}" for b, a in cells], fontsize=8)
  ax.set_ylabel("%")
  ax.set_ylim(0, 105)
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  save(fig, path, dpi=110)
