"""Prompt-time classifier metrics of a trained run, for the main job's report (after_training.py).

Each is cached in the run's `eval/` on a fingerprint of what determines it (`harness.cached`):

  eval/cls_test.json         the CLS on the test split: accuracy / precision / recall / F1 at the
                             run's threshold (`cls_test_metrics`)
  eval/probe.json            the shortcut probe: the CLS on JailbreakBench's harmful behaviours vs
                             their benign twins, AUC / F1 per category (`probe_metrics`)
  eval/cls_views_test.json   per-view CLS metrics on the test split, for runs trained on views
                             (`view_metrics`)
  eval/linear_probe.json     the cheapest baseline: a logistic regression on the base model's
                             frozen hidden states (eval/linear_probe.py) on the same prompts
                             (`linear_probe_metrics`)

Each function takes the training config, the workdir and the main job's harness (its strategic
variant pins the weights' step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import numpy as np

from clsalign_jax import artifacts, losses, operating_point
from clsalign_jax.data import builders
from clsalign_jax.data.templates import get_template
from clsalign_jax.errors import CheckpointError, ConfigError
from clsalign_jax.eval import harness as harness_lib
from clsalign_jax.eval import linear_probe as linear_probe_lib
from clsalign_jax.eval.attacks import DeepInception, Direct
from clsalign_jax.eval.benchmarks import load_benchmark
from clsalign_jax.eval.lm import TargetModel
from clsalign_jax.metrics import auc


def log(msg: str) -> None:
  print(f"[after training] {msg}", flush=True)


def _cache_path(workdir: str, name: str) -> pathlib.Path:
  return pathlib.Path(workdir, "eval", name)


def _mixture_records(config, split: str):
  data_dir = os.path.expanduser(config.data.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
  return builders.prepare(builders.SafetyMix(data_dir=data_dir))[split]


def cls_test_prompts(config) -> list[tuple[str, int]]:
  """(prompt, label) of the data source's test split, the first `cls_test_examples` of each label
  in split order (the split is ordered by a hash, so this is a fixed pseudo-random sample)."""
  a = config.after_training
  if a.cls_test_prompts:
    rows = [json.loads(line) for line in pathlib.Path(a.cls_test_prompts).read_text().splitlines() if line]
    return [(r["prompt"], int(r["label"])) for r in rows]
  records = _mixture_records(config, "test")
  per_label = {0: [], 1: []}
  for n in range(len(records)):
    rec = records[n]
    label = int(rec["label"])
    if a.cls_test_examples < 0 or len(per_label[label]) < a.cls_test_examples:
      per_label[label].append((rec["prompt"].decode("utf-8"), label))
  return per_label[0] + per_label[1]


def _scoring_model(config, variant, identity: dict) -> TargetModel:
  """The run's weights at the step the fingerprint pinned, for prompt-time CLS scores."""
  step = identity["weights"].get("step")
  return TargetModel.load(
    "cls",
    f"{variant.checkpoint}@{step}",
    variant.tokenizer,
    variant.template,
    {},
    dict(variant.model),
    batch_size=config.after_training.batch_size,
  )


def _counts(pred: np.ndarray, y: np.ndarray) -> dict:
  return dict(
    tp=int(np.sum(pred & (y == 1))),
    fp=int(np.sum(pred & (y == 0))),
    fn=int(np.sum(~pred & (y == 1))),
    tn=int(np.sum(~pred & (y == 0))),
  )


def cls_test_metrics(config, workdir: str, h: harness_lib.Harness) -> dict:
  """Accuracy / precision / recall / F1 of the prompt-time CLS (it reads the query only, as in
  training) on held-out test prompts, cached per checkpoint step."""
  variant = h.variants[0]
  identity = h.variant_identity(variant)
  prompts = cls_test_prompts(config)
  threshold = artifacts.run_threshold(config, workdir)
  fp = harness_lib.fingerprint({"weights": identity["weights"], "prompts": prompts, "threshold": threshold})

  def compute():
    log(f"CLS metrics on {len(prompts)} test prompts")
    model = _scoring_model(config, variant, identity)
    p = model.score([model.encode(q) for q, _ in prompts]).p_malicious
    counts = _counts(p > threshold, np.array([label for _, label in prompts]))  # as decoding compares
    return {
      **counts,
      **{k: float(v) for k, v in losses.classification_metrics(*counts.values()).items()},
      "n": len(prompts),
      "p_malicious": [round(float(x), 4) for x in p],
    }

  return harness_lib.cached(_cache_path(workdir, "cls_test.json"), fp, compute)


def _probe_figures(p: np.ndarray, y: np.ndarray, threshold: float) -> dict:
  c = _counts(p > threshold, y)  # as decoding compares
  tp, fp, fn = c["tp"], c["fp"], c["fn"]
  return {
    "auc": auc(p, y),
    "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
    "harmful_flagged": tp,
    "benign_flagged": fp,
    "n_harmful": int(np.sum(y == 1)),
    "n_benign": int(np.sum(y == 0)),
  }


def _spec(node) -> dict:
  return node.to_dict() if hasattr(node, "to_dict") else dict(node)


def probe_metrics(config, workdir: str, h: harness_lib.Harness) -> dict | None:
  """The shortcut probe: prompt-time CLS on JailbreakBench's harmful behaviours vs their
  topic-matched benign twins (both imperative): AUC, F1 at the run's threshold, per category.
  A classifier that learned phrasing instead of harm scores near AUC 0.5 here. Cached per step."""
  spec = config.after_training.probe
  if not spec or not spec.kind:
    return None
  items = load_benchmark(_spec(spec))
  variant = h.variants[0]
  identity = h.variant_identity(variant)
  threshold = artifacts.run_threshold(config, workdir)
  fp = harness_lib.fingerprint(
    {"weights": identity["weights"], "items": [(i.id, i.query) for i in items], "threshold": threshold}
  )

  def compute():
    log(f"shortcut probe: CLS on {len(items)} JailbreakBench prompts")
    model = _scoring_model(config, variant, identity)
    p = model.score([model.encode(i.query) for i in items]).p_malicious.astype(np.float64)
    y = np.array([int(i.meta["label"]) for i in items])
    cats = np.array([i.category for i in items])
    return {
      **_probe_figures(p, y, threshold),
      "per_category": {c: _probe_figures(p[cats == c], y[cats == c], threshold) for c in sorted(set(cats))},
      "p_malicious": {i.id: round(float(x), 4) for i, x in zip(items, p)},
    }

  return harness_lib.cached(_cache_path(workdir, "probe.json"), fp, compute)


def view_metrics(config, workdir: str, h: harness_lib.Harness) -> dict | None:
  """Per-view CLS metrics on the test split (data/views.py) at the run's threshold, for a run
  trained on views; cached per checkpoint like cls_test.json."""
  if not config.views.enabled:
    return None
  identity = h.variant_identity(h.variants[0])
  threshold = artifacts.run_threshold(config, workdir)
  fp = harness_lib.fingerprint(
    {"weights": identity["weights"], "threshold": threshold, "views": config.views.to_dict()}
  )

  def compute():
    loaded = artifacts.load(workdir, tokenizer="none")
    scores = operating_point.score_views(config, loaded.params, loaded.cfg, "test")
    return {"threshold": threshold, "by_view": operating_point.metrics_by_view(scores, threshold)}

  return harness_lib.cached(_cache_path(workdir, "cls_views_test.json"), fp, compute)


# ----- the linear probe: the cheapest baseline, beside the CLS ---------------------------------------

# Part of the cached result's fingerprint: bump when the probe's method changes.
LINEAR_PROBE_VERSION = 1


def _read_split_rows(path: str, split: str, add) -> None:
  for n, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines(), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if row["split"] == split:
        add(str(row["prompt"]), {0: 0, 1: 1}[int(row["label"])])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      raise ConfigError(
        f"config.after_training.linear_probe.prompts: {path}:{n}: expected a JSON object with prompt, "
        f"label 0/1 and split ({type(e).__name__}: {e})"
      ) from None


def mixture_prompts(config, split: str, examples: int) -> list[tuple[str, int]]:
  """(prompt, label) of a split (`linear_probe.prompts` rows, else the mixture's TFDS split): the
  first examples // 2 of each label in split order (-1: all), benign first. The TFDS splits are
  ordered by a hash, so this is a fixed pseudo-random, class-balanced sample."""
  lp = config.after_training.linear_probe
  per_label = {0: [], 1: []}
  cap = examples // 2 if examples >= 0 else -1

  def add(prompt: str, label: int) -> None:
    if cap < 0 or len(per_label[label]) < cap:
      per_label[label].append((prompt, label))

  if lp.prompts:
    _read_split_rows(lp.prompts, split, add)
  else:
    records = _mixture_records(config, split)
    for n in range(len(records)):
      if cap >= 0 and min(map(len, per_label.values())) >= cap:
        break
      rec = records[n]
      add(rec["prompt"].decode("utf-8"), int(rec["label"]))
  return per_label[0] + per_label[1]


def decode_cell_prompts(h: harness_lib.Harness) -> dict[str, list[str]]:
  """{"benchmark/attack": the user turns that cell decodes} for the cells whose prompt goes through
  the chat template as is (direct, DeepInception): the prompt-time view both classifiers get. Prefill
  cells read the same prompts as their direct cell and are left out."""
  out = {}
  for bench in h.bench_specs:
    for attack, only in h.attacks:
      if not isinstance(attack, (Direct, DeepInception)) or (only is not None and bench not in only):
        continue
      cases = [c for it in h.items(bench) for c in attack.cases(it, None)]
      out[f"{bench}/{attack.name}"] = list(dict.fromkeys(c.query for c in cases))
  return out


@dataclasses.dataclass
class _ProbeSets:
  """The linear probe's base model and every prompt list it is fitted, chosen and reported on."""

  spec: str  # the base model's checkpoint spec
  layers: tuple[int, ...]
  train: list[tuple[str, int]]
  validation: list[tuple[str, int]]
  test: list[tuple[str, int]]
  jbb: list  # benchmark Items with meta["label"]
  cells: dict[str, list[str]]

  def queries(self) -> list[str]:
    labelled = [q for q, _ in self.train + self.validation + self.test]
    return list(dict.fromkeys(labelled + [i.query for i in self.jbb] + [q for qs in self.cells.values() for q in qs]))


def _probe_sets(config, h: harness_lib.Harness, spec: str) -> _ProbeSets:
  a = config.after_training
  lp = a.linear_probe
  sets = _ProbeSets(
    spec=spec,
    layers=tuple(int(k) for k in lp.layers),
    train=mixture_prompts(config, "train", lp.train_examples),
    validation=mixture_prompts(config, "validation", lp.validation_examples),
    test=cls_test_prompts(config),
    jbb=load_benchmark(_spec(a.probe)) if a.probe and a.probe.kind else [],
    cells=decode_cell_prompts(h),
  )
  for split, rows in (("train", sets.train), ("validation", sets.validation)):
    if {y for _, y in rows} != {0, 1}:
      source = lp.prompts or "the safety_mix TFDS split"
      raise ConfigError(f"config.after_training.linear_probe: {source}: the {split} prompts need both labels")
  return sets


def _probe_fingerprint(config, sets: _ProbeSets, facts) -> str:
  a = config.after_training
  return harness_lib.fingerprint(
    {
      "version": LINEAR_PROBE_VERSION,
      "weights": artifacts.checkpoint_identity(sets.spec),
      "tokenizer": [a.tokenizer, facts.tokenizer],
      "template": [a.template, facts.template, facts.template_kwargs],
      "layers": sets.layers,
      "C": linear_probe_lib.DEFAULT_C,
      "train": sets.train,
      "validation": sets.validation,
      "test": sets.test,
      "jbb": [(i.id, i.query, i.meta["label"]) for i in sets.jbb],
      "cells": sets.cells,
    }
  )


def _probe_base(config, workdir: str, sets: _ProbeSets, facts):
  """(base model, tokenizer, template name, template) of the linear probe; refuses layers the
  model lacks and a base model whose vocabulary is not the run's tokenizer's."""
  a = config.after_training
  base = artifacts.load(sets.spec, tokenizer="none")
  bad = [k for k in sets.layers if not 1 <= k <= base.cfg.n_layers]
  if not sets.layers or bad:
    raise ConfigError(
      f"config.after_training.linear_probe.layers={sets.layers}: each must be in 1..{base.cfg.n_layers} "
      f"(the layers of {sets.spec})"
    )
  tokenizer = artifacts.resolve_tokenizer(artifacts.parse_spec(f"orbax:{workdir}"), facts, a.tokenizer)
  if tokenizer is None or tokenizer.vocab_size != base.cfg.vocab_size:
    raise CheckpointError(
      f"{sets.spec}: the linear probe's base model has {base.cfg.vocab_size} tokens, the run's tokenizer "
      f"{'none' if tokenizer is None else f'{tokenizer.name} {tokenizer.vocab_size}'} (set "
      "after_training.linear_probe.checkpoint to the model the run started from)"
    )
  template_name, kwargs = artifacts.resolve_template(base.cfg, tokenizer, facts, a.template, None)
  return base, tokenizer, template_name, get_template(template_name, **kwargs)


def _fit_linear_probe(config, workdir: str, sets: _ProbeSets, facts) -> dict:
  t0 = time.time()
  lp = config.after_training.linear_probe
  base, tokenizer, template_name, template = _probe_base(config, workdir, sets, facts)
  queries = sets.queries()
  log(f"linear probe: {len(queries)} prompts through layers 1..{max(sets.layers)} of {sets.spec}")
  rows = [linear_probe_lib.encode(tokenizer, template, q) for q in queries]
  t_load = time.time()
  feats = linear_probe_lib.features(base.cfg, base.params, rows, sets.layers, batch_size=int(lp.batch_size))
  t_features = time.time()
  index = {q: n for n, q in enumerate(queries)}
  X = lambda qs: feats[[index[q] for q in qs]]
  labelled = lambda pairs: (X([q for q, _ in pairs]), np.array([y for _, y in pairs]))
  jbb = [(i.query, int(i.meta["label"])) for i in sets.jbb]
  value = linear_probe_lib.fit_and_evaluate(
    labelled(sets.train),
    labelled(sets.validation),
    labelled(sets.test),
    sets.layers,
    labelled={"jbb": labelled(jbb)} if jbb else {},
    unlabelled={name: X(qs) for name, qs in sets.cells.items()},
  )
  value["test"]["labels"] = [y for _, y in sets.test]
  seconds = {"load_and_encode": t_load - t0, "features": t_features - t_load, "fit": time.time() - t_features}
  seconds["total"] = time.time() - t0
  return {
    **value,
    "checkpoint": sets.spec,
    "prompt_source": lp.prompts or "",
    "template": template_name,
    "layers": list(sets.layers),
    "C_grid": list(linear_probe_lib.DEFAULT_C),
    "n_prompts": len(queries),
    "seconds": {k: round(v, 1) for k, v in seconds.items()},
  }


def linear_probe_metrics(config, workdir: str, h: harness_lib.Harness) -> dict | None:
  """The cheapest baseline (eval/linear_probe.py): a logistic regression on frozen hidden states of
  the base model, fitted on the mixture's train split, layer x pooling x C chosen on its validation
  split, reported on the CLS's test prompts, the shortcut probe's JailbreakBench prompts and the
  decoding cells' prompts. The prompts are the run's (its tokenizer and chat template). Cached in
  eval/linear_probe.json, keyed on the base weights and every prompt list."""
  lp = config.after_training.linear_probe
  if not lp.enabled:
    return None
  spec = lp.checkpoint or config.init_from
  if not spec:
    log("linear probe skipped: no base model (after_training.linear_probe.checkpoint and init_from are empty)")
    return None
  facts = artifacts.read_facts(artifacts.parse_spec(f"orbax:{workdir}"))
  sets = _probe_sets(config, h, spec)
  fp = _probe_fingerprint(config, sets, facts)
  return harness_lib.cached(
    _cache_path(workdir, "linear_probe.json"), fp, lambda: _fit_linear_probe(config, workdir, sets, facts)
  )
