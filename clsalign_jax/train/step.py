"""The jitted steps: the loss sums of one batch (docs/method.md §4.1; masks §2.1), the train step with
gradient accumulation, the eval step, and `view_logits` for views batches (data/views.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from clsalign_jax import losses, masks
from clsalign_jax import model as model_lib
from clsalign_jax.train.optimizer import ParamPartition
from clsalign_jax.train.state import TrainState

# What `_forward_sums` returns: float32 scalars summed over rows.
_SUM_KEYS = ("lm_sum", "lm_count", "cls_sum", "tp", "fp", "fn", "tn")


def view_logits(model: model_lib.Transformer, params, batch: dict):
  """[B, K] CLS logits of a views batch (data/views.py): the tokens run once into a KV cache,
  outside the gradient, then the K view rows read it as the CLS row of a decode step does."""
  cfg = model.cfg
  tokens_BT = batch["tokens"]
  B, T = tokens_BT.shape
  K = batch["view_query"].shape[1]
  tok = model.apply(
    {"params": params},
    tokens_BT,
    batch["positions"],
    jnp.pad(masks.branch_mask(batch["branch"]), ((0, 0), (0, 0), (0, K))),
    # Only the layers the CLS reads get a cache (cls_only stops there).
    cache=model_lib.init_cache(cfg.replace(n_layers=cfg.cls_layers), B, T + K),
    slots_BT=jnp.broadcast_to(jnp.arange(T), (B, T)),
    cls_row=None,
    cls_only=True,
  )
  rows = model.apply(
    {"params": params},
    jnp.full((B, K), cfg.cls_id, jnp.int32),
    jnp.zeros((B, K), jnp.int32),
    masks.view_rows_mask(batch["query_span"], batch["view_window"], batch["view_query"], T),
    cache=jax.lax.stop_gradient(tok.cache),
    slots_BT=jnp.broadcast_to(T + jnp.arange(K), (B, K)),
    cls_row=jnp.broadcast_to(jnp.arange(K), (B, K)),
    cls_only=True,
  )
  return rows.cls_logit_B


def _views_sums(model, params, batch: dict, config) -> dict:
  logit_N = view_logits(model, params, batch).reshape(-1)
  label_N = batch["cls_label"].reshape(-1)
  zero = jnp.zeros((), jnp.float32)
  return {
    "lm_sum": zero,
    "lm_count": zero,
    "cls_sum": jnp.sum(losses.cls_bce(logit_N, label_N)),
    **losses.cls_confusion(logit_N, label_N, config.loss.cls_threshold),
  }


def _forward_sums(model: model_lib.Transformer, params, batch: dict, config, rng=None) -> dict:
  """Sums over the rows of `batch` (which carries the precomputed `lm_weights`)."""
  if "view_window" in batch:
    return _views_sums(model, params, batch, config)
  mask_BTT = masks.cls_training_mask(
    batch["segment_ids"],
    batch.get("query_span"),
    batch.get("response_span"),
    mode=config.train.mode,
    sliding_window=model.cfg.sliding_window,
    cls_response=config.mask.cls_response,
    cls_window=int(config.mask.cls_window),
    cls_label=batch["cls_label"],
    response_sees_cls=config.mask.response_sees_cls,
  )
  mask_BTT = nn.with_logical_constraint(mask_BTT, ("activation_batch", "activation_length", None))
  out = model.apply(
    {"params": params},
    batch["tokens"],
    batch["positions"],
    mask_BTT,
    cls_row=0,
    rngs=None if rng is None else {"dropout": rng},
  )
  lm_sum, lm_count = losses.token_cross_entropy(out.logits_BTV, batch["tokens"], batch["lm_weights"])
  return {
    "lm_sum": lm_sum,
    "lm_count": lm_count,
    "cls_sum": jnp.sum(losses.cls_bce(out.cls_logit_B, batch["cls_label"])),
    **losses.cls_confusion(out.cls_logit_B, batch["cls_label"], config.loss.cls_threshold),
  }


def _with_lm_weights(batch: dict, mode: str, malicious_weight: float = 1.0) -> dict:
  if "view_window" in batch:  # views batches carry no LM targets
    return dict(batch, lm_weights=jnp.zeros(batch["tokens"].shape[:1] + (1,), jnp.float32))
  return dict(batch, lm_weights=losses.lm_target_weights(batch, mode, malicious_weight))


def _to_f32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _accumulated(grad_fn, trainable, batch: dict, step_rng, accum: int):
  """(fp32 gradients, loss sums) of `batch` split into `accum` micro-batches, summed in a scan."""
  n_rows = batch["tokens"].shape[0]

  # Strided micro-batches (rows i, i+A, ...) keep every micro-batch spread over all batch shards.
  def split(x):
    x = x.reshape(n_rows // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "activation_batch") + (None,) * (x.ndim - 2))

  def body(carry, xs):
    grads_acc, sums_acc = carry
    grads, sums = grad_fn(trainable, *xs)
    return (jax.tree.map(jnp.add, grads_acc, _to_f32(grads)), jax.tree.map(jnp.add, sums_acc, sums)), None

  zeros = (
    jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable),
    {k: jnp.zeros((), jnp.float32) for k in _SUM_KEYS},
  )
  micro_batches = jax.tree.map(split, batch)
  (grads, sums), _ = jax.lax.scan(body, zeros, (micro_batches, jax.random.split(step_rng, accum)))
  return grads, sums


def _step_metrics(sums: dict, grads, n_tok, n_seq, cls_weight: float, schedule, step) -> dict:
  lm_loss, cls_loss = sums["lm_sum"] / n_tok, sums["cls_sum"] / n_seq
  return {
    "loss": lm_loss + cls_weight * cls_loss,
    "lm_loss": lm_loss,
    "cls_loss": cls_loss,
    "cls_accuracy": (sums["tp"] + sums["tn"]) / n_seq,
    "grad_norm": optax.global_norm(grads),
    "learning_rate": schedule(step),
  }


def make_train_step(config, cfg: model_lib.ModelConfig, tx: optax.GradientTransformation, schedule):
  """train_step(state, batch) -> (state, metrics): one optimizer update on the global batch."""
  model = model_lib.Transformer(cfg)
  accum = config.train.grad_accum_steps
  cls_weight = config.loss.cls_weight
  partition = ParamPartition(config, cfg)

  def train_step(state: TrainState, batch: dict):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    trainable, frozen = partition.split(state.params)
    batch = _with_lm_weights(batch, config.train.mode, float(config.loss.malicious_lm_weight))
    # Normalisers of the *global* batch, so each micro-batch's gradient is its exact share.
    n_tok = jnp.maximum(jnp.sum(batch["lm_weights"]), 1.0)
    n_seq = jnp.maximum(jnp.sum(batch["cls_label"] >= 0), 1).astype(jnp.float32)

    def loss_fn(trainable, micro, key):
      sums = _forward_sums(model, partition.merge(trainable, frozen), micro, config, key)
      return sums["lm_sum"] / n_tok + cls_weight * sums["cls_sum"] / n_seq, sums

    grad_fn = jax.grad(loss_fn, has_aux=True)
    if accum == 1:
      grads, sums = grad_fn(trainable, batch, step_rng)
      grads = _to_f32(grads)
    else:
      grads, sums = _accumulated(grad_fn, trainable, batch, step_rng, accum)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = partition.merge(optax.apply_updates(trainable, updates), frozen)
    metrics = _step_metrics(sums, grads, n_tok, n_seq, cls_weight, schedule, state.step)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng))
    return new_state, metrics

  return train_step


def make_eval_step(config, cfg: model_lib.ModelConfig):
  """eval_step(params, batch) -> the batch's loss and confusion sums (`_SUM_KEYS`)."""
  model = model_lib.Transformer(cfg)

  def eval_step(params, batch: dict) -> dict:
    return _forward_sums(
      model, params, _with_lm_weights(batch, config.train.mode, float(config.loss.malicious_lm_weight)), config
    )

  return eval_step
