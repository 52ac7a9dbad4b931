"""Token cross-entropy and the [CLS] binary cross-entropy, as sums so that gradient
accumulation and multi-device reductions give the same result as one big batch.

Row t of `logits_BTV` predicts token t + 1; its weight is the weight of that *target*.
A `cls_label` of -1 marks an empty filler row: it adds nothing to the CLS loss or counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from clsalign_jax import masks


def lm_target_weights(batch: dict, mode: str, malicious_weight: float = 1.0) -> jax.Array:
  """[B, T] float32 weight of the prediction made at row t (of token t + 1).

  sft: `loss_mask` of the target (response tokens and the final EOS), times `malicious_weight` in
  malicious examples (0: the LM learns only from benign answers and refusing is left to the CLS
  and strategic decoding).
  pretrain: every next token inside the same segment, except predictions made by the CLS row
  (no token attends to CLS in pretraining, and the CLS row has no next-token meaning).
  """
  seg_BT = batch["segment_ids"]
  if mode == "sft":
    target_w_BT = batch["loss_mask"][:, 1:].astype(jnp.float32)
    if malicious_weight != 1.0:
      label = batch["cls_label"]
      if label.ndim == 1:  # one example per row
        label_BT = jnp.broadcast_to(label[:, None], seg_BT.shape)
      else:  # packed rows: segment n + 1 carries label[:, n]
        label_BT = jnp.take_along_axis(label, jnp.clip(seg_BT - 1, 0, label.shape[1] - 1), axis=1)
      target_w_BT *= jnp.where(label_BT[:, 1:] == 1, malicious_weight, 1.0)
  elif mode == "pretrain":
    same_BT = (seg_BT[:, 1:] == seg_BT[:, :-1]) & (seg_BT[:, 1:] > 0)
    target_w_BT = (same_BT & ~masks.segment_starts(seg_BT)[:, :-1]).astype(jnp.float32)
  else:
    raise ValueError(f"loss mode {mode!r}; expected 'sft' or 'pretrain'")
  return jnp.pad(target_w_BT, ((0, 0), (0, 1)))


def token_cross_entropy(logits_BTV: jax.Array, tokens_BT: jax.Array, weights_BT: jax.Array):
  """(weighted sum of next-token cross-entropies, sum of weights). Logits are taken in fp32."""
  # Shifting the targets instead of slicing the logits avoids a copy of the [B, T, V] tensor.
  targets_BT = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1)))
  # Unsupervised targets may be ids outside the LM vocabulary (CLS, padding); a zero weight
  # does not cancel the NaN an out-of-range gather would produce.
  targets_BT = jnp.where(weights_BT > 0, targets_BT, 0)
  ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
  return jnp.sum(ce_BT * weights_BT), jnp.sum(weights_BT)


def cls_bce(cls_logit_B: jax.Array, label_B: jax.Array) -> jax.Array:
  """Per-example binary cross-entropy with logits; label 1 = malicious, -1 (filler) → 0."""
  bce_B = optax.sigmoid_binary_cross_entropy(
    cls_logit_B.astype(jnp.float32), jnp.maximum(label_B, 0).astype(jnp.float32)
  )
  return jnp.where(label_B >= 0, bce_B, 0.0)


def cls_confusion(cls_logit_B: jax.Array, label_B: jax.Array, threshold: float) -> dict:
  """Counts of true/false positives/negatives with 'malicious' as the positive class."""
  pred_B = jax.nn.sigmoid(cls_logit_B.astype(jnp.float32)) > threshold
  true_B = label_B > 0
  valid_B = label_B >= 0
  count = lambda m: jnp.sum((m & valid_B).astype(jnp.float32))
  return {
    "tp": count(pred_B & true_B),
    "fp": count(pred_B & ~true_B),
    "fn": count(~pred_B & true_B),
    "tn": count(~pred_B & ~true_B),
  }


def classification_metrics(tp: float, fp: float, fn: float, tn: float) -> dict:
  """Accuracy, precision, recall, F1 from counts (0 where a ratio has no support)."""
  ratio = lambda a, b: a / b if b else 0.0
  precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
  return {
    "cls_accuracy": ratio(tp + tn, tp + fp + fn + tn),
    "cls_precision": precision,
    "cls_recall": recall,
    "cls_f1": ratio(2 * precision * recall, precision + recall),
  }
