"""`metrics.auc`, the one ROC AUC the reports, the curation baseline, the linear probe and the
operating point share: against a brute-force count over every (positive, negative) pair."""

import itertools

import numpy as np
import pytest
import scipy.stats

from clsalign_jax import metrics


def _brute_auc(score, y) -> float:
  pairs = [(a, b) for (a, ya), (b, yb) in itertools.product(zip(score, y), repeat=2) if ya == 1 and yb == 0]
  return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_counts_pairs_and_half_ties(seed):
  rng = np.random.default_rng(seed)
  score = rng.integers(0, 5, 60).astype(float)  # many ties
  y = rng.integers(0, 2, 60)
  # Both count halves exactly, so the floats agree to the bit.
  assert metrics.auc(score, y) == _brute_auc(score, y)


def test_auc_matches_the_rank_sum_formula_on_continuous_scores():
  rng = np.random.default_rng(3)
  score, y = rng.normal(size=500), rng.integers(0, 2, 500)
  pos = y == 1
  ranks = scipy.stats.rankdata(score)
  expected = (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())
  assert metrics.auc(score, y) == pytest.approx(expected, abs=1e-12)
  assert metrics.auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0 and metrics.auc([0.1, 0.9], [1, 0]) == 0.0


def test_auc_is_nan_without_both_classes():
  assert np.isnan(metrics.auc([0.2, 0.4], [0, 0])) and np.isnan(metrics.auc([0.2, 0.4], [1, 1]))
  assert np.isnan(metrics.auc([], []))


def test_importing_metrics_loads_neither_jax_nor_the_model():
  import subprocess
  import sys

  code = "import sys, clsalign_jax.metrics; assert 'jax' not in sys.modules and 'clsalign_jax.model' not in sys.modules"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
