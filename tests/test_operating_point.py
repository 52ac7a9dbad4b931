"""The operating point: the threshold for a stated false-positive rate, against a brute force."""

import numpy as np
import pytest

from clsalign_jax import operating_point as op
from clsalign_jax.data import views


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr", [0.0, 0.025, 0.1, 0.5])
def test_threshold_is_the_smallest_meeting_the_rate(seed, fpr):
  rng = np.random.default_rng(seed)
  p = np.round(rng.random(rng.integers(5, 60)), 2)  # ties on purpose
  t = op.threshold_for_fpr(p, fpr)
  allowed = int(np.floor(fpr * len(p)))
  assert np.sum(p > t) <= allowed
  # Brute force over every candidate below t: each lets more than the allowed share through.
  for c in np.unique(np.concatenate([p, [0.0]])):
    if c < t:
      assert np.sum(p > c) > allowed


def test_choose_takes_the_stricter_of_prompt_and_window():
  q, qo = views.VIEWS.index("query"), views.VIEWS.index("query+own")
  # 10 benign prompts with scores 0.0 .. 0.9; 10 benign windows 0.5 .. 0.95; malicious ignored.
  view = np.array([q] * 10 + [qo] * 10 + [q] * 3)
  label = np.array([0] * 20 + [1] * 3)
  p = np.concatenate([np.arange(10) / 10, 0.5 + np.arange(10) / 20, [0.99, 0.99, 0.99]])
  got = op.choose(op.ViewScores(view, label, p), fpr=0.1, window_views=("query+reference", "query+own"))
  assert got["threshold_prompt"] == pytest.approx(0.8)  # one of ten above
  assert got["threshold_window"] == pytest.approx(0.9)
  assert got["threshold"] == pytest.approx(0.9)
  assert (got["n_benign_prompts"], got["n_benign_windows"]) == (10, 10)


def test_metrics_by_view_hand_checked():
  q = views.VIEWS.index("query")
  scores = op.ViewScores(np.array([q] * 4), np.array([0, 0, 1, 1]), np.array([0.1, 0.7, 0.6, 0.9]))
  m = op.metrics_by_view(scores, 0.65)["query"]
  # predictions: 0, 1, 0, 1 -> tp 1, fp 1, fn 1, tn 1
  assert (m["cls_precision"], m["cls_recall"], m["cls_f1"]) == (0.5, 0.5, 0.5)
  assert m["auc"] == 0.75 and m["benign_flagged"] == 0.5 and m["malicious_flagged"] == 0.5
  assert (m["n_benign"], m["n_malicious"]) == (2, 2)
