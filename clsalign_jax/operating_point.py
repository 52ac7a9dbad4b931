"""The CLS operating point and per-view metrics (docs/method.md, "The operating point").

A fixed 0.5 says nothing about how often a user's benign request is refused. After training, the
threshold is chosen on the **validation** split for a stated false-positive rate on benign prompts,
both at the prompt (view `query`, Rule 1) and in the response windows the run decodes with
(`query+reference` / `query+own` with `rule2_include_query`, else `reference` / `own`):

    threshold = max(t_prompt, t_window),  t_x = the smallest t with  #{benign p_x > t} <= fpr · n_x

Windows are drawn several times per response (`passes`), so each benign answer contributes several
readings, as it does at decode time. The choice goes to `operating_point.json` in the workdir and
into the run facts (`cls_threshold` and the decode threshold), so `generate`, `evaluate`, the report
and exports use it. `view_metrics` gives F1 / AUC / flag rates per view on any split: a CLS that
reads the label off a reference refusal shows at once as a gap between `reference` and `own`.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from clsalign_jax import artifacts, files, losses, train
from clsalign_jax import model as model_lib
from clsalign_jax.data import sources, views
from clsalign_jax.data.tokenizer import load_tokenizer
from clsalign_jax.metrics import auc


@dataclasses.dataclass(frozen=True)
class ViewScores:
  view: np.ndarray  # [N] view index (views.VIEWS)
  label: np.ndarray  # [N] 0 benign / 1 malicious
  p: np.ndarray  # [N] p(malicious)


def score_views(config, params, cfg: model_lib.ModelConfig, split: str, passes: int = 1) -> ViewScores:
  """p(malicious) of every view of every example of `split`, windows drawn `passes` times."""
  tokenizer = load_tokenizer(config.data.tokenizer or artifacts.tokenizer_spec_of(config.init_from))
  model = model_lib.Transformer(cfg.replace(scan_layers=False, remat_policy="none"))
  fn = jax.jit(lambda p, b: jax.nn.sigmoid(train.view_logits(model, p, b)))
  out_v, out_l, out_p = [], [], []
  for k in range(passes):
    cfg_k = config.copy_and_resolve_references()
    with cfg_k.unlocked():
      cfg_k.seed = int(config.seed) + 1000 * (k + 1)  # new windows per pass, never the training draws
      cfg_k.data.tokenizer = cfg_k.data.tokenizer or artifacts.tokenizer_spec_of(config.init_from) or ""
    pipe = sources.views_pipeline(cfg_k, split, tokenizer, cfg_k.data.tokenizer, 0, 1)
    for step in range(pipe.num_batches):
      batch = pipe.batch(step)
      p_BK = np.asarray(fn(params, {k2: jnp.asarray(v) for k2, v in batch.items()}))
      label_BK = batch["cls_label"]
      keep = label_BK >= 0
      out_v.append(np.broadcast_to(np.arange(views.K), label_BK.shape)[keep])
      out_l.append(label_BK[keep])
      out_p.append(p_BK[keep])
  return ViewScores(np.concatenate(out_v), np.concatenate(out_l), np.concatenate(out_p))


def threshold_for_fpr(p_benign: np.ndarray, fpr: float) -> float:
  """The smallest t (among the scores and 0) with #{p > t} <= fpr · n."""
  if len(p_benign) == 0:
    raise ValueError("no benign scores to set a threshold on")
  allowed = int(np.floor(fpr * len(p_benign)))
  ordered = np.sort(p_benign)[::-1]
  return float(ordered[allowed]) if allowed < len(ordered) else 0.0


def decode_window_views(rule2_include_query: bool) -> tuple[str, ...]:
  return ("query+reference", "query+own") if rule2_include_query else ("reference", "own")


def choose(scores: ViewScores, fpr: float, window_views: tuple[str, ...]) -> dict:
  """The threshold meeting `fpr` on benign prompts and on benign windows of `window_views`."""
  idx = {name: i for i, name in enumerate(views.VIEWS)}
  benign = scores.label == 0
  prompt = benign & (scores.view == idx["query"])
  window = benign & np.isin(scores.view, [idx[v] for v in window_views])
  t_prompt = threshold_for_fpr(scores.p[prompt], fpr)
  t_window = threshold_for_fpr(scores.p[window], fpr)
  return {
    "threshold": max(t_prompt, t_window),
    "target_fpr": fpr,
    "threshold_prompt": t_prompt,
    "threshold_window": t_window,
    "window_views": list(window_views),
    "n_benign_prompts": int(prompt.sum()),
    "n_benign_windows": int(window.sum()),
  }


def metrics_by_view(scores: ViewScores, threshold: float) -> dict:
  """Per view: n per class, accuracy / precision / recall / F1 at `threshold`, AUC, flag rates."""
  out = {}
  for v, name in enumerate(views.VIEWS):
    sel = scores.view == v
    y, p = scores.label[sel], scores.p[sel]
    if len(y) == 0:
      continue
    pred = p > threshold
    counts = {
      "tp": float(np.sum(pred & (y == 1))),
      "fp": float(np.sum(pred & (y == 0))),
      "fn": float(np.sum(~pred & (y == 1))),
      "tn": float(np.sum(~pred & (y == 0))),
    }
    m = losses.classification_metrics(**counts)
    out[name] = {
      **{k: round(float(v_), 4) for k, v_ in m.items()},
      "auc": round(float(auc(p, y)), 4) if 0 < y.sum() < len(y) else float("nan"),
      "n_benign": int(np.sum(y == 0)),
      "n_malicious": int(np.sum(y == 1)),
      "benign_flagged": round(float(np.mean(pred[y == 0])), 4) if np.any(y == 0) else float("nan"),
      "malicious_flagged": round(float(np.mean(pred[y == 1])), 4) if np.any(y == 1) else float("nan"),
    }
  return out


def ensure(config, workdir: str) -> dict:
  """Choose (or reuse) the run's operating point and record it in its run facts."""
  path = os.path.join(workdir, artifacts.OPERATING_POINT)
  loaded = artifacts.load(workdir, tokenizer="none")
  op = config.views.operating_point
  rule2_query = bool(config.after_training.decode.get("rule2_include_query", False))
  key = {"step": loaded.step, "fpr": float(op.target_fpr), "passes": int(op.passes), "rule2_query": rule2_query}
  if os.path.exists(path):
    old = files.read_json(path)
    if old.get("key") == key:
      return old
  scores = score_views(config, loaded.params, loaded.cfg, "validation", passes=int(op.passes))
  chosen = choose(scores, float(op.target_fpr), decode_window_views(rule2_query))
  result = {
    "key": key,
    "split": "validation",
    **chosen,
    "validation_by_view": metrics_by_view(scores, chosen["threshold"]),
  }
  files.atomic_write_json(path, result)
  artifacts.write_run_facts(config, workdir)  # picks up operating_point.json
  return result
