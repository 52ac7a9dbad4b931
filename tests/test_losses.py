import jax.numpy as jnp
import numpy as np
import pytest

from clsalign_jax import losses


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_cross_entropy_predicts_the_next_token():
  rng = np.random.default_rng(0)
  logits_BTV = rng.normal(size=(2, 5, 7)).astype(np.float32)
  tokens_BT = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
  weights_BT = np.array([[0, 1, 1, 0, 0], [1, 0, 0, 1, 0]], np.float32)
  total, count = losses.token_cross_entropy(jnp.asarray(logits_BTV), jnp.asarray(tokens_BT), jnp.asarray(weights_BT))
  logp = _log_softmax(logits_BTV.astype(np.float64))
  expected = sum(-logp[b, t, tokens_BT[b, t + 1]] for b in range(2) for t in range(4) if weights_BT[b, t])
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  assert float(count) == 4


def test_unsupervised_targets_outside_the_vocabulary_stay_finite():
  logits_BTV = jnp.zeros((1, 3, 4))
  tokens_BT = jnp.array([[4, 1, 99]])  # CLS id 4 and a stray id: never supervised
  total, count = losses.token_cross_entropy(logits_BTV, tokens_BT, jnp.array([[1.0, 0.0, 0.0]]))
  np.testing.assert_allclose(float(total), np.log(4), rtol=1e-6)
  assert float(count) == 1


def test_sft_weights_are_the_loss_mask_of_the_target():
  batch = {"segment_ids": jnp.array([[1, 1, 1, 1, 0]]), "loss_mask": jnp.array([[0, 0, 1, 1, 0]])}
  np.testing.assert_array_equal(losses.lm_target_weights(batch, "sft"), [[0, 1, 1, 0, 0]])


def test_pretrain_weights_skip_the_cls_row_padding_and_segment_boundaries():
  # Two packed segments: [CLS a b | CLS c] + pad.
  batch = {"segment_ids": jnp.array([[1, 1, 1, 2, 2, 0]])}
  np.testing.assert_array_equal(losses.lm_target_weights(batch, "pretrain"), [[0, 1, 0, 0, 0, 0]])
  with pytest.raises(ValueError):
    losses.lm_target_weights(batch, "dpo")


def test_cls_bce_and_confusion_counts():
  logit_B, label_B = jnp.array([2.0, -1.0, 0.5, -3.0]), jnp.array([1, 1, 0, 0])
  p = 1 / (1 + np.exp(-np.array([2.0, -1.0, 0.5, -3.0])))
  expected = -(np.array([1, 1, 0, 0]) * np.log(p) + np.array([0, 0, 1, 1]) * np.log(1 - p))
  np.testing.assert_allclose(losses.cls_bce(logit_B, label_B), expected, rtol=1e-6)
  counts = {k: float(v) for k, v in losses.cls_confusion(logit_B, label_B, 0.5).items()}
  assert counts == {"tp": 1, "fp": 1, "fn": 1, "tn": 1}
  assert float(losses.cls_confusion(logit_B, label_B, 0.95)["tp"]) == 0  # sigmoid(2) = 0.88


def test_classification_metrics():
  m = losses.classification_metrics(tp=3, fp=1, fn=2, tn=4)
  assert m["cls_accuracy"] == pytest.approx(0.7)
  assert m["cls_precision"] == pytest.approx(0.75)
  assert m["cls_recall"] == pytest.approx(0.6)
  assert m["cls_f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
  assert losses.classification_metrics(0, 0, 0, 5)["cls_f1"] == 0.0


def test_malicious_lm_weight_scales_malicious_targets_only():
  # Two unpacked rows (benign, malicious) and one packed row whose segments are (malicious, benign).
  loss_mask = np.array([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1]], np.int32)
  seg = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 2, 2, 2]], np.int32)
  plain = {"loss_mask": jnp.asarray(loss_mask[:2]), "segment_ids": jnp.asarray(seg[:2]), "cls_label": jnp.array([0, 1])}
  w = np.asarray(losses.lm_target_weights(plain, "sft", malicious_weight=0.25))
  # weight at t is that of target t + 1: row 0 keeps 1s, row 1's targets are scaled.
  np.testing.assert_array_equal(w[0], [0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(w[1], [0, 0.25, 0.25, 0, 0, 0])
  packed = {
    "loss_mask": jnp.asarray(loss_mask[2:]),
    "segment_ids": jnp.asarray(seg[2:]),
    "cls_label": jnp.array([[1, 0]]),
  }
  w = np.asarray(losses.lm_target_weights(packed, "sft", malicious_weight=0.0))
  np.testing.assert_array_equal(w[0], [0, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(
    np.asarray(losses.lm_target_weights(plain, "sft")), np.pad(loss_mask[:2, 1:], ((0, 0), (0, 1)))
  )
