"""The cheapest baseline for the CLS: a logistic regression on frozen hidden states of the base model.

What a user could build in minutes without training the model at all: run the *base* checkpoint (a
run's `init_from`, e.g. SmolLM2-135M-Instruct) over the chat-templated prompts, pool the residual stream
of a few layers (mean over the query tokens, or the last prompt token), and fit an L2-regularised
logistic regression on the mixture's train split. Layer x pooling x C is chosen on the validation
split (AUC, ties to F1 at 0.5), and the chosen probe is reported on the test split, JailbreakBench's
harmful behaviours vs their benign twins and the prompts of the decoding cells; `after_training`
puts these figures beside the CLS's.

  features(cfg, params, rows, layers, batch_size)   [N, len(layers), 2, D] pooled hidden states
  fit_logistic / predict_proba                      the regression (numpy + scipy)
  fit_and_evaluate(...)                             selection on validation, figures on the rest

Layer k is the residual stream after k decoder layers (HF's `hidden_states[k]` for k < n_layers;
k = n_layers is the final norm's input, where HF returns the normed state). Prompts run without the [CLS] row, under the plain causal mask: the base model
never saw a CLS token.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from clsalign_jax import model as model_lib
from clsalign_jax.data.templates import ChatTemplate, encode_prompt
from clsalign_jax.data.tokenizer import Tokenizer
from clsalign_jax.metrics import auc

POOLINGS = ("mean", "last")  # mean over the query tokens; the last prompt token (the response is next)
# Ascending: on equal validation AUC and F1 the stronger regularisation wins.
DEFAULT_C = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
THRESHOLD = 0.5


class PromptRow(NamedTuple):
  """A chat-templated prompt without the [CLS] row: token ids and the query's half-open span."""

  tokens: tuple[int, ...]
  query_span: tuple[int, int]


def encode(tokenizer: Tokenizer, template: ChatTemplate, query: str) -> PromptRow:
  """The row the CLS would read (encode_prompt), minus the leading [CLS] id."""
  enc = encode_prompt(tokenizer, template, query)
  if int(enc.tokens[0]) != tokenizer.cls_id:
    raise ValueError(f"encode_prompt did not start with [CLS] ({tokenizer.cls_id}): {enc.tokens[:4].tolist()}")
  q0, q1 = enc.query_span
  return PromptRow(tuple(int(t) for t in enc.tokens[1:]), (q0 - 1, q1 - 1))


# ----- features -----------------------------------------------------------------------------------


def _causal(cfg: model_lib.ModelConfig, rows: int, prefix: int):
  """[1, rows, prefix + rows]: every row sees the whole shared prefix and the rows up to itself
  (within a sliding window). Rows are right-padded, so real rows never see padding; padded rows
  see real keys and stay finite (NaN x 0 would poison the pooled mean)."""
  i_T1 = prefix + jnp.arange(rows)[:, None]
  j_1S = jnp.arange(prefix + rows)[None, :]
  mask_TS = j_1S <= i_T1
  if cfg.sliding_window is not None:
    mask_TS &= (i_T1 - j_1S) < cfg.sliding_window
  return mask_TS[None]


@functools.partial(jax.jit, static_argnums=0)
def _prefix_cache(cfg: model_lib.ModelConfig, embed_VD, stacked, prefix_1P):
  """Per-layer keys and values ([L, 1, G, P, H] each) of the prefix every prompt shares (the chat
  template's system turn: ~40 % of a typical prompt's tokens), computed once instead of per row."""
  P = prefix_1P.shape[1]
  x_1PD = jnp.take(embed_VD, prefix_1P, axis=0).astype(cfg.dtype)
  positions_1P = jnp.arange(P)[None]
  cos, sin = model_lib.rope_tables(positions_1P, cfg)
  mask = _causal(cfg, P, 0)
  empty = jnp.zeros((1, cfg.n_kv_heads, P, cfg.head_dim), cfg.dtype)
  layer = model_lib.DecoderLayer(cfg)

  def body(x, layer_params):
    x, (k, v) = layer.apply({"params": layer_params}, x, (empty, empty), cos, sin, mask, positions_1P)
    return x, (k, v)

  _, (k_L1GPH, v_L1GPH) = jax.lax.scan(body, x_1PD, stacked)
  return k_L1GPH, v_L1GPH


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pooled(
  cfg: model_lib.ModelConfig, layers: tuple[int, ...], embed_VD, stacked, prefix_kv, tokens_BT, length_B, span_B2
):
  """[B, K, 2, D]: per chosen layer, the query mean and the last-token state of rows that continue
  the shared prefix (`prefix_kv`, possibly of length 0; spans and lengths count from the prefix's
  end). One decoder layer is scanned over the stacked weights of the first max(layers), so each
  bucket compiles one layer body, not an unrolled stack (seconds per compile on a CPU)."""
  B, T = tokens_BT.shape
  k_L1GPH, v_L1GPH = prefix_kv
  P = k_L1GPH.shape[3]
  x_BTD = jnp.take(embed_VD, tokens_BT, axis=0).astype(cfg.dtype)
  positions_BT = jnp.broadcast_to(P + jnp.arange(T), (B, T))
  cos_BTH, sin_BTH = model_lib.rope_tables(positions_BT, cfg)
  mask_BTS = jnp.broadcast_to(_causal(cfg, T, P), (B, T, P + T))
  t_1T = jnp.arange(T)[None]
  in_query_BT = (t_1T >= span_B2[:, :1]) & (t_1T < span_B2[:, 1:])
  mean_w_BT = in_query_BT / jnp.maximum(in_query_BT.sum(axis=1, keepdims=True), 1)
  last_w_BT = (t_1T == (length_B - 1)[:, None]).astype(jnp.float32)
  weights_B2T = jnp.stack([mean_w_BT, last_w_BT], axis=1).astype(jnp.float32)
  free_BGTH = jnp.zeros((B, cfg.n_kv_heads, T, cfg.head_dim), cfg.dtype)
  layer = model_lib.DecoderLayer(cfg)

  def body(x_BTD, xs):
    layer_params, k_1GPH, v_1GPH = xs
    # The rows write their own keys and values after the prefix's (slots P..P+T-1).
    cache = tuple(
      jnp.concatenate([jnp.broadcast_to(c, (B, *c.shape[1:])), free_BGTH], axis=2) for c in (k_1GPH, v_1GPH)
    )
    x_BTD, _ = layer.apply({"params": layer_params}, x_BTD, cache, cos_BTH, sin_BTH, mask_BTS, positions_BT)
    return x_BTD, jnp.einsum("bpt,btd->bpd", weights_B2T, x_BTD.astype(jnp.float32))

  _, pooled_LB2D = jax.lax.scan(body, x_BTD, (stacked, k_L1GPH, v_L1GPH))
  return jnp.moveaxis(pooled_LB2D[jnp.asarray([k - 1 for k in layers])], 0, 1)


def shared_prefix(rows: Sequence[PromptRow]) -> int:
  """Tokens every row starts with, stopping before any row's query and before any row's last
  token (the pooled positions stay in the per-row part)."""
  if not rows:
    return 0
  first = rows[0].tokens
  n = min(min(r.query_span[0], len(r.tokens) - 1) for r in rows)
  for r in rows:
    n = next((i for i in range(n) if r.tokens[i] != first[i]), n)
  return n


def features(
  cfg: model_lib.ModelConfig,
  params: Mapping,
  rows: Sequence[PromptRow],
  layers: Sequence[int],
  batch_size: int = 16,
  bucket_multiple: int = 8,
  share_prefix: bool = True,
) -> np.ndarray:
  """float32 [N, len(layers), 2, D]: for each row and chosen layer (1-based, see the module
  docstring), the mean over the query tokens and the last prompt token's state (POOLINGS order).
  Only the first max(layers) decoder layers run; the prefix all rows share runs once
  (`share_prefix`); the rest is sorted by length and padded to a multiple of `bucket_multiple`,
  so each bucket compiles once."""
  layers = tuple(int(k) for k in layers)
  if not layers or min(layers) < 1 or max(layers) > cfg.n_layers:
    raise ValueError(f"linear probe layers {layers}: each must be in 1..{cfg.n_layers} (the model's layers)")
  for i, r in enumerate(rows):
    if not r.tokens or not 0 <= r.query_span[0] < r.query_span[1] <= len(r.tokens):
      raise ValueError(f"linear probe row {i}: query span {r.query_span} outside its {len(r.tokens)} tokens")
  # The einsum attention: the fused cuDNN path takes bf16 / fp16 only.
  cfg = cfg.replace(scan_layers=False, remat_policy="none", attention_impl="xla")
  params = model_lib.unstack_layers(dict(params))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(max(layers))])
  embed_VD = jnp.asarray(params["embedding"])
  out = np.zeros((len(rows), len(layers), len(POOLINGS), cfg.d_model), np.float32)
  if not rows:
    return out
  P = shared_prefix(rows) if share_prefix else 0
  if P:
    prefix_kv = _prefix_cache(cfg, embed_VD, stacked, np.asarray([rows[0].tokens[:P]], np.int32))
  else:
    none = jnp.zeros((max(layers), 1, cfg.n_kv_heads, 0, cfg.head_dim), cfg.dtype)
    prefix_kv = (none, none)
  order = sorted(range(len(rows)), key=lambda i: len(rows[i].tokens))
  for k in range(0, len(order), batch_size):
    idx = order[k : k + batch_size]
    T = -(-max(len(rows[i].tokens) - P for i in idx) // bucket_multiple) * bucket_multiple
    tokens_BT = np.zeros((batch_size, T), np.int32)
    length_B = np.ones(batch_size, np.int32)
    span_B2 = np.tile(np.array([0, 1], np.int32), (batch_size, 1))
    for b, i in enumerate(idx):
      tokens_BT[b, : len(rows[i].tokens) - P] = rows[i].tokens[P:]
      length_B[b] = len(rows[i].tokens) - P
      span_B2[b] = np.asarray(rows[i].query_span) - P
    pooled = _pooled(cfg, layers, embed_VD, stacked, prefix_kv, tokens_BT, length_B, span_B2)
    out[idx] = jax.device_get(pooled)[: len(idx)]
  return out


# ----- logistic regression ------------------------------------------------------------------------
# numpy + scipy rather than scikit-learn: scikit-learn is not a dependency (scipy comes with jax), and
# the model is 20 lines.


class Logistic(NamedTuple):
  """p(malicious | x) = sigmoid(((x - mean) / scale) . w + b)."""

  mean: np.ndarray
  scale: np.ndarray
  w: np.ndarray
  b: float
  C: float


def _objective(theta: np.ndarray, Z: np.ndarray, s: np.ndarray, C: float) -> tuple[float, np.ndarray]:
  """0.5 |w|^2 + C sum_i log(1 + exp(-s_i (z_i . w + b))) and its gradient (the bias is not
  penalised; s = +-1). float64 throughout: the Newton steps stop on small gradients."""
  w, b = theta[:-1], theta[-1]
  m = s * (_matvec(Z, w) + b)
  loss = 0.5 * w @ w + C * np.logaddexp(0.0, -m).sum()
  g = -C * s * _sigmoid(-m)  # d loss / d (z . w + b)
  return float(loss), np.concatenate([w + np.einsum("nd,n->d", Z, g), [g.sum()]])


def _hessp(theta: np.ndarray, v: np.ndarray, Z: np.ndarray, s: np.ndarray, C: float) -> np.ndarray:
  """The objective's Hessian times `v`: [v_w, 0] + C Z1^T diag(p (1 - p)) Z1 v, Z1 = [Z, 1]."""
  q = _sigmoid(s * (_matvec(Z, theta[:-1]) + theta[-1]))
  u = C * q * (1.0 - q) * (_matvec(Z, v[:-1]) + v[-1])
  return np.concatenate([v[:-1] + np.einsum("nd,n->d", Z, u), [u.sum()]])


def _matvec(Z: np.ndarray, w: np.ndarray) -> np.ndarray:
  # einsum's own loop, not BLAS: OpenBLAS threads a [1024, 576] product, and on a shared 2-core CPU
  # its threads wait for each other (80 s instead of 1 s for the 50 fits of `select`, measured).
  return np.einsum("nd,d->n", Z, w)


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warning for large |x|


def standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean and scale of the training features (a constant feature keeps scale 1)."""
  X = np.asarray(X, np.float64)
  scale = X.std(axis=0)
  return X.mean(axis=0), np.where(scale > 1e-12, scale, 1.0)


def fit_logistic(X: np.ndarray, y: np.ndarray, C: float, warm: Logistic | None = None) -> Logistic:
  """L2-regularised logistic regression on standardised features (y in {0, 1}). `warm`: a fit on
  the same X (another C): its standardisation is kept and its weights start this fit."""
  y = np.asarray(y)
  if set(np.unique(y).tolist()) != {0, 1}:
    raise ValueError(f"linear probe: training labels must hold both 0 and 1, got {sorted(set(y.tolist()))}")
  mean, scale = standardise(X) if warm is None else (warm.mean, warm.scale)
  Z = (np.asarray(X, np.float64) - mean) / scale
  theta0 = np.zeros(Z.shape[1] + 1) if warm is None else np.concatenate([warm.w, [warm.b]])
  # Newton with conjugate-gradient steps on Hessian-vector products: pure numpy, so no BLAS threads
  # (L-BFGS-B's Fortran loop had the same stalls as `_matvec`), and ~15 iterations to |grad| < 1e-7.
  res = scipy.optimize.minimize(
    _objective,
    theta0,
    args=(Z, 2.0 * y - 1.0, C),
    jac=True,
    hessp=_hessp,
    method="trust-ncg",
    options={"gtol": 1e-7, "maxiter": 1000},
  )
  return Logistic(mean, scale, res.x[:-1], float(res.x[-1]), float(C))


def predict_proba(model: Logistic, X: np.ndarray) -> np.ndarray:
  return _sigmoid(_matvec((np.asarray(X, np.float64) - model.mean) / model.scale, model.w) + model.b)


# ----- metrics and selection ----------------------------------------------------------------------


def binary_metrics(p: np.ndarray, y: np.ndarray, threshold: float = THRESHOLD) -> dict:
  """Counts, accuracy / precision / recall / F1 at `threshold` (malicious = positive), AUC."""
  p, y = np.asarray(p, np.float64), np.asarray(y)
  pred = p >= threshold
  tp, fp = int(np.sum(pred & (y == 1))), int(np.sum(pred & (y == 0)))
  fn, tn = int(np.sum(~pred & (y == 1))), int(np.sum(~pred & (y == 0)))
  ratio = lambda a, b: a / b if b else 0.0
  precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
  return {
    "accuracy": ratio(tp + tn, len(y)),
    "precision": precision,
    "recall": recall,
    "f1": ratio(2 * precision * recall, precision + recall),
    "auc": auc(p, y),
    "tp": tp,
    "fp": fp,
    "fn": fn,
    "tn": tn,
    "n_malicious": int(np.sum(y == 1)),
    "n_benign": int(np.sum(y == 0)),
  }


def select(
  train: tuple[np.ndarray, np.ndarray],
  validation: tuple[np.ndarray, np.ndarray],
  layers: Sequence[int],
  C_grid: Sequence[float] = DEFAULT_C,
) -> tuple[dict, Logistic, list[dict]]:
  """Fit every layer x pooling x C on `train` (features [N, K, 2, D], labels) and pick the best by
  validation AUC, ties to validation F1, then to the earlier candidate (layers and poolings in the
  given order, C ascending). Returns (choice, its fitted model, the whole grid's validation figures);
  nothing outside these two splits is read."""
  (Xt, yt), (Xv, yv) = train, validation
  grid, best, best_key = [], None, None
  for k, layer in enumerate(layers):
    for j, pooling in enumerate(POOLINGS):
      model = None
      for C in sorted(C_grid):
        model = fit_logistic(Xt[:, k, j], yt, C, warm=model)  # warm start along the C path
        m = binary_metrics(predict_proba(model, Xv[:, k, j]), yv)
        grid.append({"layer": int(layer), "pooling": pooling, "C": float(C), "auc": m["auc"], "f1": m["f1"]})
        key = (np.nan_to_num(m["auc"], nan=-1.0), m["f1"])
        if best_key is None or key > best_key:
          best_key, best = key, ({"layer": int(layer), "pooling": pooling, "C": float(C)}, model)
  return best[0], best[1], grid


def fit_and_evaluate(
  train: tuple[np.ndarray, np.ndarray],
  validation: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  layers: Sequence[int],
  labelled: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
  unlabelled: Mapping[str, np.ndarray] | None = None,
  C_grid: Sequence[float] = DEFAULT_C,
) -> dict:
  """Choose layer x pooling x C on `validation` (select), then report the chosen probe: `test`
  metrics at threshold 0.5 with AUC and n per class, the same for every `labelled` set (e.g. the
  JailbreakBench twins) and the share flagged (p >= 0.5) of every `unlabelled` set, with its n.
  Features are [N, len(layers), 2, D] arrays from `features`; labels 1 = malicious."""
  choice, model, grid = select(train, validation, layers, C_grid)
  k, j = list(layers).index(choice["layer"]), POOLINGS.index(choice["pooling"])
  p = lambda X: predict_proba(model, X[:, k, j])
  out = {
    "choice": choice,
    "validation_grid": grid,
    "n_train": {"benign": int(np.sum(train[1] == 0)), "malicious": int(np.sum(train[1] == 1))},
    "validation": binary_metrics(p(validation[0]), validation[1]),
    "test": {**binary_metrics(p(test[0]), test[1]), "p_malicious": [round(float(x), 4) for x in p(test[0])]},
    "labelled": {},
    "flagged": {},
  }
  for name, (X, y) in (labelled or {}).items():
    out["labelled"][name] = {**binary_metrics(p(X), y), "p_malicious": [round(float(x), 4) for x in p(X)]}
  for name, X in (unlabelled or {}).items():
    flags = p(X) >= THRESHOLD
    rate = float(flags.mean()) if len(flags) else float("nan")
    out["flagged"][name] = {"flagged": int(flags.sum()), "n": len(flags), "rate": rate}
  return out
