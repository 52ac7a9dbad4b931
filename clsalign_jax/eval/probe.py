"""The logit probe of the paper's Fig. 4 (docs/method.md §5 and decision 12).

At the first response position (after the prompt and any attacker prefill) take the top-K
next-token logits, softmax over those K, and report the entropy H = −Σ p log p and the
sharpness: p_top1 (default) or p_top1 − p_top2. Conditions:
  direct   the plain query
  prefill  the query with an attacker-prefilled response start (" Sure, here is")
  nested   the DeepInception prompt around the behaviour
The paper's finding on chat models: from direct to prefill to nested, entropy rises and
sharpness falls (the next-token choice becomes less decisive).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clsalign_jax.eval.attacks import DeepInception, Direct, Prefill
from clsalign_jax.eval.benchmarks import Item
from clsalign_jax.eval.lm import TargetModel

SHARPNESS = ("p1", "p1_minus_p2")


def topk_stats(logits_V: np.ndarray, k: int, sharpness: str = "p1") -> tuple[float, float]:
  """(entropy, sharpness) of the softmax over the k largest logits."""
  if sharpness not in SHARPNESS:
    raise ValueError(f"sharpness={sharpness!r}; expected one of {SHARPNESS}")
  top_K = np.sort(np.asarray(logits_V, np.float64))[::-1][:k]
  p_K = np.exp(top_K - top_K[0])
  p_K /= p_K.sum()
  entropy = float(-np.sum(p_K * np.log(np.maximum(p_K, 1e-300))))
  sharp = float(p_K[0] - (p_K[1] if len(p_K) > 1 else 0.0)) if sharpness == "p1_minus_p2" else float(p_K[0])
  return entropy, sharp


def conditions(prefill_text: str) -> dict:
  return {
    "direct": Direct("direct"),
    "prefill": Prefill("prefill", mode="literal", text=prefill_text),
    "nested": DeepInception("nested"),
  }


def run_probe(
  model: TargetModel,
  items: Sequence[Item],
  names: Sequence[str] = ("direct", "prefill", "nested"),
  top_k: int = 10,
  sharpness: str = "p1",
  prefill_text: str = "Sure, here is",
) -> tuple[dict, list]:
  """Per condition: mean and std of entropy and sharpness over the items, and per-item records."""
  attacks = conditions(prefill_text)
  unknown = set(names) - set(attacks)
  if unknown:
    raise ValueError(f"unknown probe conditions {sorted(unknown)}; known: {sorted(attacks)}")
  summary, records = {}, []
  for name in names:
    cases = [attacks[name].cases(it, model)[0] for it in items]
    scores = model.score([c.encode(model) for c in cases])
    stats = np.asarray([topk_stats(l, top_k, sharpness) for l in scores.next_logits]).reshape(-1, 2)
    summary[name] = {
      "entropy_mean": float(stats[:, 0].mean()),
      "entropy_std": float(stats[:, 0].std()),
      "sharpness_mean": float(stats[:, 1].mean()),
      "sharpness_std": float(stats[:, 1].std()),
      "n": len(cases),
    }
    records += [
      {"condition": name, "item_id": c.item_id, "entropy": float(h), "sharpness": float(s), "p_malicious": float(p)}
      for c, (h, s), p in zip(cases, stats, scores.p_malicious)
    ]
  return summary, records
