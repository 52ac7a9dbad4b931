"""The linear-probe baseline (eval/linear_probe.py): the regression against an independent optimiser and
its optimality conditions, the feature extractor against the full model's own hidden states, and a
layer / C choice that reads the validation split only."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from flax import linen as nn

from clsalign_jax import masks
from clsalign_jax import model as model_lib
from clsalign_jax.data.templates import encode_prompt, get_template
from clsalign_jax.data.tokenizer import load_tokenizer
from clsalign_jax.eval import linear_probe as LP

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "eval"


def _toy(n=200, d=4, seed=0, shift=0.7):
  """Overlapping Gaussian classes (not separable) with unequal scales per feature."""
  rng = np.random.default_rng(seed)
  y = (rng.random(n) < 0.4).astype(int)  # imbalanced on purpose: the intercept must absorb it
  X = rng.normal(size=(n, d)) * np.arange(1, d + 1) + shift * y[:, None] * np.array([1.0, -2.0, 0.0, 0.5])[:d]
  return X, y


# ----- the regression -----------------------------------------------------------------------------


def test_logistic_regression_reaches_the_optimum_an_independent_solver_finds():
  X, y = _toy()
  C = 0.05
  fit = LP.fit_logistic(X, y, C)
  # Independent reference: the same objective written out here, minimised without a gradient.
  Z = (X - X.mean(0)) / X.std(0)

  def objective(theta):
    w, b = theta[:-1], theta[-1]
    z = Z @ w + b
    return 0.5 * w @ w + C * np.sum(np.log1p(np.exp(-np.where(y == 1, z, -z))))

  ref = scipy.optimize.minimize(
    objective,
    np.zeros(Z.shape[1] + 1),
    method="Nelder-Mead",
    options=dict(xatol=1e-10, fatol=1e-12, maxiter=40000, maxfev=40000),
  )
  np.testing.assert_allclose(np.append(fit.w, fit.b), ref.x, atol=2e-4)
  assert objective(np.append(fit.w, fit.b)) <= ref.fun + 1e-9
  # Stationarity, by hand: w = C sum (y - p) z, and the unpenalised bias makes sum(p) = sum(y).
  p = LP.predict_proba(fit, X)
  np.testing.assert_allclose(fit.w, C * Z.T @ (y - p), atol=1e-5)
  assert abs(p.sum() - y.sum()) < 1e-4


def test_regularisation_shrinks_and_separable_data_is_ranked_perfectly():
  rng = np.random.default_rng(1)
  X = np.concatenate([rng.normal(-2, 0.5, (30, 2)), rng.normal(2, 0.5, (30, 2))])
  y = np.repeat([0, 1], 30)
  norms = [np.linalg.norm(LP.fit_logistic(X, y, C).w) for C in (1e-3, 1e-1, 10.0)]
  assert norms[0] < norms[1] < norms[2]  # separable: the weights grow with C instead of converging
  m = LP.binary_metrics(LP.predict_proba(LP.fit_logistic(X, y, 1.0), X), y)
  assert (m["auc"], m["accuracy"], m["tp"], m["tn"]) == (1.0, 1.0, 30, 30)
  with pytest.raises(ValueError, match="both 0 and 1"):
    LP.fit_logistic(X[:30], y[:30], 1.0)


def test_auc_counts_pairs_and_half_ties():
  rng = np.random.default_rng(2)
  score = rng.integers(0, 5, 60).astype(float)  # many ties
  y = rng.integers(0, 2, 60)
  pos, neg = score[y == 1], score[y == 0]
  brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
  assert LP.auc(score, y) == pytest.approx(brute)
  assert np.isnan(LP.auc(score, np.zeros(60)))


# ----- selection on validation only ---------------------------------------------------------------


def _two_layer_features(n, informative, rng):
  """[n, 2, 2, 1] features whose label signal sits in the candidate layers named by `informative`."""
  y = np.repeat([0, 1], n // 2)
  F = rng.normal(size=(n, 2, 2, 1))
  for k in informative:
    F[:, k, :, 0] += 3.0 * y[:, None]
  return F, y


def test_layer_choice_reads_the_validation_split_only():
  rng = np.random.default_rng(3)
  train = _two_layer_features(200, (0, 1), rng)  # both candidate layers carry the label in training
  validation = _two_layer_features(200, (0,), rng)  # only layer 10 does on validation
  test = _two_layer_features(200, (1,), rng)  # only layer 20 does on test
  out = LP.fit_and_evaluate(train, validation, test, layers=(10, 20))
  assert out["choice"]["layer"] == 10
  # Had the test split been read, layer 20 would win there by far; the chosen probe is at chance on test.
  assert out["test"]["auc"] < 0.7 and out["validation"]["auc"] > 0.95
  by_layer = {(g["layer"], g["pooling"], g["C"]): g["auc"] for g in out["validation_grid"]}
  assert by_layer[(10, "mean", out["choice"]["C"])] > 0.95
  assert len(out["validation_grid"]) == 2 * 2 * len(LP.DEFAULT_C)
  # Another test split changes the test figures, never the choice.
  other = LP.fit_and_evaluate(train, validation, _two_layer_features(200, (0,), rng), layers=(10, 20))
  assert other["choice"] == out["choice"] and other["test"]["auc"] > 0.95


def test_fit_and_evaluate_reports_counts_and_flag_shares():
  rng = np.random.default_rng(4)
  train, validation, test = (_two_layer_features(100, (0,), rng) for _ in range(3))
  jbb = _two_layer_features(40, (0,), rng)
  sure_malicious = np.full((7, 2, 2, 1), 5.0)
  out = LP.fit_and_evaluate(
    train, validation, test, (1, 2), labelled={"jbb": jbb}, unlabelled={"cell/direct": sure_malicious}
  )
  assert out["n_train"] == {"benign": 50, "malicious": 50}
  t = out["test"]
  assert (t["n_benign"], t["n_malicious"], t["tp"] + t["fn"], t["fp"] + t["tn"]) == (50, 50, 50, 50)
  assert len(t["p_malicious"]) == 100 and out["labelled"]["jbb"]["n_malicious"] == 20
  assert out["flagged"]["cell/direct"] == {"flagged": 7, "n": 7, "rate": 1.0}


# ----- features -----------------------------------------------------------------------------------


def _tiny(sliding_window=None):
  cfg = model_lib.ModelConfig(
    vocab_size=61,
    d_model=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=48,
    max_seq_len=128,
    sliding_window=sliding_window,
  )
  params = model_lib.init_params(cfg, jax.random.key(0))
  # Non-trivial norm scales, so a missing or misplaced norm shows.
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: x * 1.5 if "norm" in jax.tree_util.keystr(path) else x, params
  )
  return cfg, params


def _rows(rng, n, prefix=(5, 9, 2, 7)):
  rows = []
  for _ in range(n):
    q = list(rng.integers(1, 61, rng.integers(1, 12)))
    tail = list(rng.integers(1, 61, rng.integers(1, 4)))
    tokens = tuple(int(t) for t in (*prefix, *q, *tail))
    rows.append(LP.PromptRow(tokens, (len(prefix), len(prefix) + len(q))))
  return rows


def _reference(cfg, params, row, layers):
  """Each row alone through the full Transformer (plain causal mask), its decoder layers' outputs
  captured by flax: [K, 2, D] (query mean, last token), plus the LM-head logits of its last token."""
  tokens = jnp.asarray([row.tokens])
  T = tokens.shape[1]
  mask = masks.causal_mask(jnp.ones((1, T), jnp.int32), cfg.sliding_window)
  out, state = model_lib.Transformer(cfg).apply(
    {"params": params},
    tokens,
    jnp.arange(T)[None],
    mask,
    cls_row=None,
    capture_intermediates=lambda mdl, _: isinstance(mdl, model_lib.DecoderLayer),
  )
  inter = state["intermediates"]
  q0, q1 = row.query_span
  pooled = []
  for k in layers:
    h = np.asarray(inter[f"layers_{k - 1}"]["__call__"][0][0])[0]  # the layer's (x, cache) output
    pooled.append([h[q0:q1].mean(0), h[-1]])
  return np.asarray(pooled), np.asarray(out.logits_BTV[0, -1])


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_features_are_the_full_models_hidden_states(sliding_window):
  cfg, params = _tiny(sliding_window)
  rows = _rows(np.random.default_rng(5), 5)
  layers = (1, 3)
  got = LP.features(cfg, params, rows, layers, batch_size=3, bucket_multiple=4)
  assert got.shape == (5, 2, 2, cfg.d_model) and LP.shared_prefix(rows) == 4
  plain = LP.features(cfg, params, rows, layers, batch_size=4, bucket_multiple=8, share_prefix=False)
  np.testing.assert_allclose(got, plain, atol=2e-5)
  for n, row in enumerate(rows):
    want, logits = _reference(cfg, params, row, layers)
    np.testing.assert_allclose(got[n], want, atol=2e-5)
    # The deepest layer is the final norm's input: normed and through the LM head, the model's logits.
    h = got[n, -1, 1]
    normed = h / np.sqrt(np.mean(h**2) + cfg.rms_eps) * np.asarray(params["final_norm"]["weight"])
    np.testing.assert_allclose(normed @ np.asarray(params["lm_head"]), logits, atol=1e-4)


def test_features_reject_layers_outside_the_model():
  cfg, params = _tiny()
  rows = _rows(np.random.default_rng(6), 2)
  with pytest.raises(ValueError, match=r"each must be in 1\.\.3"):
    LP.features(cfg, params, rows, (0, 2))
  with pytest.raises(ValueError, match="outside"):
    LP.features(cfg, params, [LP.PromptRow((1, 2), (1, 4))], (1,))


def test_encode_is_the_cls_row_without_the_cls():
  tok = load_tokenizer(str(FIXTURES / "tiny_tokenizer"))
  template = get_template("llama2")
  query = "How do I bake bread?"
  row = LP.encode(tok, template, query)
  enc = encode_prompt(tok, template, query)
  assert row.tokens == tuple(enc.tokens[1:].tolist()) and enc.tokens[0] == tok.cls_id
  q0, q1 = row.query_span
  assert tok.decode(list(row.tokens[q0:q1])).strip() == query


def test_param_tree_of_the_scan_matches_the_model():
  # features() scans one DecoderLayer over the stacked `layers_{i}` subtrees: their structure must be
  # the layer's own, or the scan would silently read wrong names.
  cfg, params = _tiny()
  layer = nn.meta.unbox(
    model_lib.DecoderLayer(cfg).init(
      jax.random.key(1),
      jnp.zeros((1, 2, cfg.d_model)),
      None,
      *model_lib.rope_tables(jnp.arange(2)[None], cfg),
      jnp.ones((1, 2, 2), bool),
      None,
    )["params"]
  )
  assert jax.tree.structure(layer) == jax.tree.structure(params["layers_0"])
