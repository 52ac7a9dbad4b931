"""train_and_evaluate: state (resume / init_from / fresh), the sharded jitted step, the loop, eval.

Loss (docs/method.md §4.1; masks §2.1):
  sft       L = L_sft + λ·BCE(cls)   L_sft: token cross-entropy on response + EOS targets, averaged
                                      over the supervised tokens of the whole (global) batch
  pretrain  L = L_lm + λ·BCE(cls)    L_lm: every in-segment next token, CLS row excluded
BCE is averaged over the sequences of the batch. Both terms are built from sums, so the
result does not depend on how the batch is split over devices or accumulation steps.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import math
import os
import re
import time
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from clsalign_jax import artifacts
from clsalign_jax import checkpoint as ckpt_lib
from clsalign_jax import config as config_lib
from clsalign_jax import errors, files, losses, masks, metrics as metrics_lib
from clsalign_jax import model as model_lib
from clsalign_jax import sharding, synthetic
from clsalign_jax.lock import workdir_lock

# Fields a checkpoint or imported weights must share with the configured model.
_ARCH_FIELDS = (
  "vocab_size",
  "d_model",
  "n_layers",
  "n_heads",
  "n_kv_heads",
  "head_dim",
  "d_ff",
  "tie_embeddings",
  "rope_theta",
  "rms_eps",
  "sliding_window",
)
_LAYOUT_FIELDS = _ARCH_FIELDS + ("scan_layers", "param_dtype")
# What `_forward_sums` returns: float32 scalars summed over rows.
_SUM_KEYS = ("lm_sum", "lm_count", "cls_sum", "tp", "fp", "fn", "tn")
# Workdir subdirectories for step directories taken out of `checkpoints/` (kept, never deleted):
# corrupted ones skipped by `checkpoint.fallback_to_intact`, and ones saved from a state that
# went on to a non-finite or diverging loss.
CORRUPT_DIR = "corrupt_checkpoints"
REJECTED_DIR = "rejected_checkpoints"


class NonFiniteLossError(errors.TrainingStopped, FloatingPointError):
  """Loss or gradient norm became NaN/inf; the run stops before saving the broken state."""


class DivergenceError(errors.TrainingStopped):
  """The loss stayed above `guard.divergence_factor` × its running median for
  `guard.divergence_steps` steps; the run stops before saving the diverged state."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any
  # Raw key data (uint32), so checkpoints hold a plain array. No layer is stochastic today; the
  # per-step key is threaded through (as the 'dropout' stream) so adding one keeps resume exact.
  rng: jax.Array


# ---------------------------------------------------------------------------------------------
# Data hook


def make_data_iterator(config, split: str, shard_index: int, shard_count: int):
  """The single place where a data source is chosen.

  Returns an iterator of dicts of numpy arrays holding rows [shard_index·b, (shard_index+1)·b)
  of each global batch (b = global_batch_size / shard_count), with JSON-able
  `get_state()` / `set_state(state)`. 'synthetic' is clsalign_jax.synthetic; every other
  source name is passed to `clsalign_jax.data.make_data_iterator` with the same arguments.
  """
  if config.data.source == "synthetic":
    return synthetic.make_data_iterator(config, split, shard_index, shard_count)
  try:
    data = importlib.import_module("clsalign_jax.data")
  except ModuleNotFoundError as e:
    if e.name != "clsalign_jax.data":
      raise
    raise ValueError(
      f"config.data.source={config.data.source!r} needs the data pipeline package "
      "clsalign_jax.data, which is not installed; use config.data.source='synthetic'"
    ) from None
  if not hasattr(data, "make_data_iterator"):
    raise ValueError("clsalign_jax.data has no make_data_iterator(config, split, shard_index, shard_count)")
  return data.make_data_iterator(with_tokenizer(config), split, shard_index, shard_count)


def with_tokenizer(config):
  """`config` with `data.tokenizer` filled from the checkpoint it starts from when it is empty:
  the data room reads the tokenizer from the config alone (it must not parse checkpoint specs)."""
  if config.data.tokenizer or not config.init_from:
    return config
  found = artifacts.tokenizer_spec_of(config.init_from)
  if not found:
    return config
  config = config.copy_and_resolve_references()
  config.data.tokenizer = found
  return config


# ---------------------------------------------------------------------------------------------
# Optimizer


def make_schedule(config, num_steps: int) -> optax.Schedule:
  s, lr = config.schedule, config.optimizer.learning_rate
  if s.name == "constant":
    main = optax.constant_schedule(lr)
  elif s.name == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps=max(num_steps - s.warmup_steps, 1), alpha=s.final_lr_fraction)
  else:
    every = s.decay_every_steps or config_lib.steps_per_epoch(config)
    main = optax.exponential_decay(lr, transition_steps=every, decay_rate=s.decay_rate, staircase=True)
  if s.warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, lr, s.warmup_steps)
  return optax.join_schedules([warmup, main], [s.warmup_steps])


def with_state_dtype(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """Run `tx` in `dtype` (its moments live in it) and hand back updates in the params' dtype."""
  cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)

  def init(params):
    return tx.init(cast(params))

  def update(grads, state, params=None):
    updates, state = tx.update(cast(grads), state, None if params is None else cast(params))
    return jax.tree.map(lambda u, g: u.astype(g.dtype), updates, grads), state

  return optax.GradientTransformation(init, update)


def _cls_head_mask(params):
  return jax.tree_util.tree_map_with_path(
    lambda path, _: bool(path) and getattr(path[0], "key", None) == "cls_head", params
  )


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  o = config.optimizer
  parts = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
  head_scale = float(o.get("cls_head_lr_scale", 1.0))
  if head_scale != 1.0:
    parts.append(optax.masked(optax.scale(head_scale), _cls_head_mask))
  return with_state_dtype(optax.chain(*parts), jnp.dtype(o.state_dtype))


# ---------------------------------------------------------------------------------------------
# Trainable subset


def _path_key(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _is_param(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata) or not isinstance(x, dict)


class ParamPartition:
  """Splits a params tree into the trainable subtree (`config.train.trainable`) and the frozen
  rest, both nested dicts with the params' own keys, so optimizer state and checkpoints keep a
  plain tree. Gradients are taken w.r.t. the trainable part only: JAX then runs no backward pass
  through layers below the lowest trainable one and computes no weight gradients for frozen ones."""

  def __init__(self, config, cfg: model_lib.ModelConfig):
    pattern = config.train.trainable
    paths = lambda c: [
      _path_key(p)
      for p, _ in jax.tree_util.tree_flatten_with_path(
        model_lib.abstract_params(c), is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
      )[0]
    ]
    if not pattern:
      self.trainable = frozenset(paths(cfg))
      return
    if cfg.scan_layers:
      # Scanned layers are one stacked array per weight: a pattern must pick all layers or none.
      per_layer = {}
      for path in paths(cfg.replace(scan_layers=False)):
        layer, _, rest = path.partition("/")
        if re.fullmatch(r"layers_\d+", layer):
          per_layer.setdefault(rest, set()).add(bool(re.search(pattern, path)))
      if any(len(picked) > 1 for picked in per_layer.values()):
        raise ValueError(
          f"config.train.trainable={pattern!r} selects individual layers, but scanned layers "
          "are stacked into one array per weight; set config.model.scan_layers=False"
        )
    # A stacked weight 'layers/X' is what 'layers_0/X' (hence every layer) is unscanned.
    unscanned = lambda p: re.sub(r"^layers/", "layers_0/", p)
    self.trainable = frozenset(p for p in paths(cfg) if re.search(pattern, p) or re.search(pattern, unscanned(p)))
    if not self.trainable:
      raise ValueError(
        f"config.train.trainable={pattern!r} matches no parameter; paths look like {', '.join(paths(cfg)[:4])}"
      )
    shared = sorted(p for p in self.trainable if not p.startswith("cls_"))
    if config.get("views", {}).get("enabled") and shared:
      # The views objective runs the tokens outside the gradient (the LM is the base model).
      raise errors.ConfigError(
        f"config.train.trainable={pattern!r} selects {shared[0]} ({len(shared)} shared weights), but "
        "config.views.enabled trains the CLS path only: use a pattern such as '^cls_'"
      )

  def _select(self, tree, keep: bool, prefix: str = ""):
    out = {}
    for k, v in tree.items():
      path = f"{prefix}{k}"
      if not _is_param(v):
        sub = self._select(v, keep, path + "/")
        if sub:
          out[k] = sub
      elif (path in self.trainable) == keep:
        out[k] = v
    return out

  def split(self, params) -> tuple[dict, dict]:
    return self._select(params, True), self._select(params, False)

  @staticmethod
  def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
      out[k] = ParamPartition.merge(out[k], v) if k in out else v
    return out


# ---------------------------------------------------------------------------------------------
# Forward, step, eval


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


def make_train_step(config, cfg: model_lib.ModelConfig, tx: optax.GradientTransformation, schedule):
  model = model_lib.Transformer(cfg)
  accum = config.train.grad_accum_steps
  cls_weight = config.loss.cls_weight
  partition = ParamPartition(config, cfg)

  def train_step(state: TrainState, batch: dict):
    rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
    trainable, frozen = partition.split(state.params)
    batch = _with_lm_weights(batch, config.train.mode, float(config.loss.malicious_lm_weight))
    n_rows = batch["tokens"].shape[0]
    # Normalisers of the *global* batch, so each micro-batch's gradient is its exact share.
    n_tok = jnp.maximum(jnp.sum(batch["lm_weights"]), 1.0)
    n_seq = jnp.maximum(jnp.sum(batch["cls_label"] >= 0), 1).astype(jnp.float32)

    def loss_fn(trainable, micro, key):
      sums = _forward_sums(model, partition.merge(trainable, frozen), micro, config, key)
      return sums["lm_sum"] / n_tok + cls_weight * sums["cls_sum"] / n_seq, sums

    grad_fn = jax.grad(loss_fn, has_aux=True)
    to_f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    if accum == 1:
      grads, sums = grad_fn(trainable, batch, step_rng)
      grads = to_f32(grads)
    else:
      # Strided micro-batches (rows i, i+A, ...) keep every micro-batch spread over all batch shards.
      def split(x):
        x = x.reshape(n_rows // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(x, (None, "activation_batch") + (None,) * (x.ndim - 2))

      def body(carry, xs):
        grads_acc, sums_acc = carry
        grads, sums = grad_fn(trainable, *xs)
        return (jax.tree.map(jnp.add, grads_acc, to_f32(grads)), jax.tree.map(jnp.add, sums_acc, sums)), None

      zeros = (
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable),
        {k: jnp.zeros((), jnp.float32) for k in _SUM_KEYS},
      )
      micro_batches = jax.tree.map(split, batch)
      (grads, sums), _ = jax.lax.scan(body, zeros, (micro_batches, jax.random.split(step_rng, accum)))

    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = partition.merge(optax.apply_updates(trainable, updates), frozen)
    lm_loss, cls_loss = sums["lm_sum"] / n_tok, sums["cls_sum"] / n_seq
    step_metrics = {
      "loss": lm_loss + cls_weight * cls_loss,
      "lm_loss": lm_loss,
      "cls_loss": cls_loss,
      "cls_accuracy": (sums["tp"] + sums["tn"]) / n_seq,
      "grad_norm": optax.global_norm(grads),
      "learning_rate": schedule(state.step),
    }
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng))
    return new_state, step_metrics

  return train_step


def make_eval_step(config, cfg: model_lib.ModelConfig):
  model = model_lib.Transformer(cfg)

  def eval_step(params, batch: dict) -> dict:
    return _forward_sums(
      model, params, _with_lm_weights(batch, config.train.mode, float(config.loss.malicious_lm_weight)), config
    )

  return eval_step


# ---------------------------------------------------------------------------------------------
# State layout, init, resume


@dataclasses.dataclass
class _Layout:
  """The train state's NamedShardings, and its ShapeDtypeStructs carrying them (restore targets)."""

  shardings: TrainState
  abstract: TrainState


def _layout(cfg: model_lib.ModelConfig, tx, mesh, rules, partition: ParamPartition | None = None) -> _Layout:
  """`partition` None: every parameter is trainable."""
  params_boxed = model_lib.abstract_params(cfg)
  opt_state_boxed = jax.eval_shape(tx.init, partition.split(params_boxed)[0] if partition else params_boxed)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = TrainState(
    step=replicated,
    params=sharding.named_shardings(params_boxed, mesh, rules),
    opt_state=sharding.named_shardings(opt_state_boxed, mesh, rules),
    rng=replicated,
  )
  key_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  unboxed = TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32),
    params=nn.meta.unbox(params_boxed),
    opt_state=nn.meta.unbox(opt_state_boxed),
    rng=key_shape,
  )
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), unboxed, shardings)
  return _Layout(shardings, abstract)


def _same(a, b) -> bool:
  # Float fields may have passed through float32 (GGUF stores rms_eps 1e-5 as 9.99999975e-06).
  if isinstance(a, float) and isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-6)
  return a == b


def _check_same_arch(found: dict, expected: model_lib.ModelConfig, fields, source: str) -> None:
  diff = {f: (found.get(f), getattr(expected, f)) for f in fields if not _same(found.get(f), getattr(expected, f))}
  if diff:
    detail = ", ".join(f"{f}: {a!r} there vs {b!r} in the config" for f, (a, b) in diff.items())
    raise ckpt_lib.CheckpointError(f"{source}: does not match the configured model ({detail})")


def _load_init_params(config, cfg: model_lib.ModelConfig, layout: _Layout):
  """`config.init_from` through the one loader (clsalign_jax.artifacts). A training run's step is
  restored straight into the sharded layout; other weights are read on the host, then sharded."""
  spec = artifacts.parse_spec(config.init_from)

  def check(src_cfg: model_lib.ModelConfig, where: str) -> None:
    # A run restores into our layer layout, so that must match too; the param dtype may differ (restoring casts).
    fields = _ARCH_FIELDS + ("scan_layers",) if spec.kind == "run" else _ARCH_FIELDS
    _check_same_arch(dataclasses.asdict(src_cfg), cfg, fields, where)

  if spec.kind == "run":
    return artifacts.load(config.init_from, tokenizer="none", check=check, restore_into=layout.abstract.params).params
  # Host-side loads; stacking for scan_layers goes through jnp, so keep it off device 0.
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    params = model_lib.to_layout(artifacts.load(config.init_from, tokenizer="none", check=check).params, cfg)
    # Base weights carry no CLS side path; it starts fresh (as the CLS head of a base model does).
    side = model_lib.fresh_cls_path(cfg, jax.random.key(config.seed))
    params = {**{k: v for k, v in side.items() if k not in params}, **params}
  if jax.tree.structure(params) != jax.tree.structure(layout.abstract.params):
    raise ckpt_lib.CheckpointError(f"{config.init_from}: parameter tree does not match the model's")
  # Every process reads the whole file but only materialises its own shards.
  return jax.tree.map(
    lambda a, s: jax.make_array_from_callback(s.shape, s.sharding, lambda idx: np.asarray(a[idx]).astype(s.dtype)),
    params,
    layout.abstract.params,
  )


def _run_meta(config, cfg: model_lib.ModelConfig) -> dict:
  return {"model_config": dataclasses.asdict(cfg), "config": json.loads(config.to_json_best_effort())}


def _restore_latest(config, cfg, layout: _Layout, directory: str, train_iter) -> tuple[TrainState | None, list[int]]:
  """The newest usable checkpoint of `directory`, read without writing anything: (state or None when
  there is no checkpoint, the corrupted newer steps skipped). A corrupted step is refused unless
  `checkpoint.fallback_to_intact`, which skips to the newest intact one."""
  exists = os.path.isdir(directory)
  if jax.process_count() > 1:
    # Opening a checkpoint manager is collective: every process must take the same branch, even if
    # process 0 has since created the directory.
    from jax.experimental import multihost_utils

    exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
  if not exists:
    return None, []
  reader = ckpt_lib.Checkpointer(directory, read_only=True)
  try:
    steps = reader.all_steps()
    skipped = []
    for step in reversed(steps):
      try:
        reader.verify(step)
        meta = reader.read_meta(step)
        # Another model is not corruption: never fall back past it.
        _check_same_arch(meta["model_config"], cfg, _LAYOUT_FIELDS, reader.step_dir(step))
        items = reader.restore(
          step,
          layout.abstract.params,
          layout.abstract.opt_state,
          {"step": layout.abstract.step, "rng": layout.abstract.rng},
        )
      except ckpt_lib.CorruptCheckpointError as e:
        if not config.checkpoint.fallback_to_intact:
          raise ckpt_lib.CorruptCheckpointError(
            f"{e}; to resume from the newest intact step instead, rerun with "
            f"--config.checkpoint.fallback_to_intact=true (corrupted steps are then moved to "
            f"{os.path.join(os.path.dirname(directory), CORRUPT_DIR)})"
          ) from None
        logging.warning("%s; trying the step before", e)
        skipped.append(step)
        continue
      train_iter.set_state(items["data"])
      logging.info("resumed from %s", reader.step_dir(step))
      state = TrainState(
        step=items["progress"]["step"],
        params=items["params"],
        opt_state=items["opt_state"],
        rng=items["progress"]["rng"],
      )
      return state, skipped
    if skipped:
      raise ckpt_lib.CorruptCheckpointError(
        f"{directory}: no intact checkpoint among steps {steps}; refusing to start from scratch"
      )
    return None, []
  finally:
    reader.close()


def _fresh_state(config, cfg, tx, layout: _Layout, partition: ParamPartition) -> TrainState:
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  if config.init_from:
    params = _load_init_params(config, cfg, layout)
    logging.info("initialised params from %s", config.init_from)
  else:
    params = jax.jit(lambda k: model_lib.init_params(cfg, k), out_shardings=layout.shardings.params)(init_key)
  opt_state = jax.jit(lambda p: tx.init(partition.split(p)[0]), out_shardings=layout.shardings.opt_state)(params)
  return TrainState(
    step=jax.device_put(jnp.int32(0), layout.shardings.step),
    params=params,
    opt_state=opt_state,
    rng=jax.device_put(jax.random.key_data(train_key), layout.shardings.rng),
  )


# ---------------------------------------------------------------------------------------------
# The loop


def _evaluate(config, eval_fn, params, batch_shardings, shard_index, shard_count) -> dict:
  it = make_data_iterator(config, config.data.eval_split, shard_index, shard_count)
  totals: dict[str, float] = {}
  for _, local in zip(range(config.eval.num_batches), it):
    batch = sharding.to_global_batch(local, batch_shardings, config.data.global_batch_size)
    for k, v in jax.device_get(eval_fn(params, batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n_seq = max(totals["tp"] + totals["fp"] + totals["fn"] + totals["tn"], 1.0)
  return {
    "lm_loss": totals["lm_sum"] / max(totals["lm_count"], 1.0),
    "cls_loss": totals["cls_sum"] / n_seq,
    **losses.classification_metrics(totals["tp"], totals["fp"], totals["fn"], totals["tn"]),
  }


def train_and_evaluate(config, workdir: str, devices: Sequence[jax.Device] | None = None) -> TrainState:
  """Train until `total_steps(config)`, resuming from `workdir` when it holds a checkpoint.

  `devices` (default: all) are the devices the mesh is built from. Returns the final state.
  Holds the workdir lock throughout. Nothing is written into `workdir` until the config, the
  checkpoint (digests, architecture, restore) or the init weights have been checked, so a refused
  invocation leaves it as it was.
  """
  config_lib.validate(config)
  cfg = config_lib.model_config(config)
  num_steps = config_lib.total_steps(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = tuple(tuple(rule) for rule in config.mesh.logical_axis_rules)
  schedule = make_schedule(config, num_steps)
  tx = make_optimizer(config, schedule)
  with workdir_lock(workdir, enabled=jax.process_index() == 0):
    return _train_and_evaluate(config, workdir, cfg, num_steps, mesh, rules, schedule, tx)


def _train_and_evaluate(config, workdir, cfg, num_steps, mesh, rules, schedule, tx) -> TrainState:
  # Axis rules are active only while the step functions are traced: unboxing and init would
  # otherwise apply activation constraints to trees and dummy batches they do not fit.
  partition = ParamPartition(config, cfg)
  with jax.set_mesh(mesh):
    layout = _layout(cfg, tx, mesh, rules, partition)
    micro = config.data.global_batch_size // config.train.grad_accum_steps
    if micro % sharding.batch_shard_count(mesh, rules):
      raise ValueError(
        f"micro-batch of {micro} sequences does not split over the "
        f"{sharding.batch_shard_count(mesh, rules)} batch shards of mesh {dict(mesh.shape)}; "
        "change config.mesh, data.global_batch_size or train.grad_accum_steps"
      )
    shard_index, shard_count = sharding.process_batch_block(mesh, rules, config.data.global_batch_size)
    train_iter = make_data_iterator(config, "train", shard_index, shard_count)
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    state, corrupted = _restore_latest(config, cfg, layout, directory, train_iter)
    if state is None:
      state = _fresh_state(config, cfg, tx, layout, partition)
    start = int(state.step)
    if start >= num_steps:
      print(f"training is complete: checkpoint at step {start} of {num_steps} in {directory}", flush=True)
      return state

    # Everything is checked: from here on the run writes.
    if jax.process_index() == 0:
      files.atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2) + "\n")
      # What generate, convert and evaluation must use this run with (template, tokenizer, CLS facts).
      artifacts.write_run_facts(config, workdir)
    ckpt = ckpt_lib.Checkpointer(directory, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    try:
      for step in corrupted:
        logging.warning("moved corrupted checkpoint to %s", ckpt.move_aside(step, os.path.join(workdir, CORRUPT_DIR)))
      with nn.logical_axis_rules(rules):
        state = _train_loop(
          config,
          cfg,
          tx,
          schedule,
          mesh,
          rules,
          layout,
          ckpt,
          train_iter,
          state,
          start,
          num_steps,
          workdir,
          (shard_index, shard_count),
        )
    finally:
      ckpt.close()
  return state


class LossGuard:
  """Divergence guard: a step is flagged when its loss exceeds `factor` × the median of the last
  `window` unflagged losses (from the second step of an invocation on, so a run that blows up at
  once is caught too) and by more than 1 nat; `patience` flagged steps in a row stop the run.
  factor 0 turns it off."""

  def __init__(self, factor: float, patience: int, window: int):
    self.factor, self.patience, self.window = factor, patience, window
    self.history: list[float] = []
    self.flagged = 0  # consecutive flagged steps so far
    self.first_flagged: int | None = None
    self.median = math.nan

  def observe(self, step: int, loss: float) -> bool:
    """Records one step's loss; True if that step is flagged."""
    if self.factor > 0 and self.history:
      self.median = float(np.median(self.history[-self.window :]))
      # The 1-nat margin keeps a run that has converged to a tiny loss from stopping on batch noise.
      if loss > self.factor * self.median and loss > self.median + 1.0:
        self.flagged += 1
        self.first_flagged = step if self.flagged == 1 else self.first_flagged
        return True
    self.flagged, self.first_flagged = 0, None
    self.history = self.history[-self.window :] + [loss]
    return False

  @property
  def tripped(self) -> bool:
    return self.flagged >= self.patience


class _StepMetrics:
  """Fetches step k's metrics only after step k+1 is dispatched, so the host never idles the
  device; adds throughput, writes them, and stops the run on a non-finite or diverging loss.
  Checkpoint and eval steps `flush()` first, so a flagged step is never saved."""

  def __init__(
    self, writer, ckpt, cfg, n_params: int, global_batch: int, peak_flops: float | None, guard: LossGuard, workdir: str
  ):
    self.writer, self.ckpt, self.cfg, self.n_params = writer, ckpt, cfg, n_params
    self.global_batch, self.peak_flops = global_batch, peak_flops
    self.guard, self.workdir = guard, workdir
    self.pending = None
    self.last_time = None
    self.suspect = False  # the last flushed step's loss is flagged by the guard

  def push(self, step: int, device_metrics: dict, seq_len: int) -> None:
    self.flush()
    self.pending = (step, device_metrics, seq_len)

  def reset_clock(self) -> None:
    """Call after work that is not a training step (saving, eval), so it is not counted as one."""
    self.last_time = None

  def flush(self) -> None:
    if self.pending is None:
      return
    step, device_metrics, seq_len = self.pending
    self.pending = None
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()
    if self.last_time is not None:  # the first step of a run also pays for compilation
      dt = now - self.last_time
      values["step_time"] = dt
      values["tokens_per_sec"] = self.global_batch * seq_len / dt
      if self.peak_flops:
        flops = self.global_batch * metrics_lib.train_flops_per_sequence(self.cfg, self.n_params, seq_len)
        values["mfu"] = flops / (dt * jax.device_count() * self.peak_flops)
    self.last_time = now
    self.writer.write(step, "train", values)
    loss = values["loss"]
    if not (math.isfinite(loss) and math.isfinite(values["grad_norm"])):
      raise NonFiniteLossError(
        f"step {step}: loss={loss} grad_norm={values['grad_norm']} is not finite; training "
        f"stopped without saving. {self._last_good(self.guard.first_flagged or step)}"
      )
    self.suspect = self.guard.observe(step, loss)
    if self.guard.tripped:
      g = self.guard
      raise DivergenceError(
        f"step {step}: loss={loss:.4g} has been above {g.factor:g} x its running median {g.median:.4g} for "
        f"{g.patience} steps (config.guard.divergence_factor, config.guard.divergence_steps); training stopped "
        f"without saving. {self._last_good(g.first_flagged)}"
      )

  def _last_good(self, first_bad: int) -> str:
    """Step `first_bad`'s loss was computed from the state after step first_bad - 1, so a checkpoint
    of that step or later holds a broken state: move those aside, then name the newest intact one."""
    self.ckpt.wait()
    moved = [s for s in self.ckpt.all_steps() if s >= first_bad - 1]
    for s in moved:
      self.ckpt.move_aside(s, os.path.join(self.workdir, REJECTED_DIR))
    note = f" (moved step(s) {moved} saved after the loss went bad to {self.workdir}/{REJECTED_DIR})" if moved else ""
    good = self.ckpt.latest_intact_step()
    where = (
      f"step {good} in {self.ckpt.directory}"
      if good is not None
      else f"none (no step was saved in {self.ckpt.directory} before the loss went bad)"
    )
    return f"Last good checkpoint: {where}{note}"


def _next_batch(batches, step: int) -> dict:
  try:
    return next(batches)
  except StopIteration:
    raise ValueError(f"the training data ended before step {step}; the train split must repeat") from None


def _train_loop(
  config, cfg, tx, schedule, mesh, rules, layout, ckpt, train_iter, state, start, num_steps, workdir, shard
) -> TrainState:
  first = _next_batch(train_iter, start + 1)
  if np.ndim(first["cls_label"]) != 1 and "view_window" not in first:  # views batches: [B, K] labels
    raise ValueError(
      "packed rows (several examples per row) are not supported: the model reads one "
      "[CLS] per row; turn packing off in the data config"
    )
  batches = itertools.chain([first], train_iter)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_shardings = sharding.batch_shardings(mesh, rules, first)
  step_fn = jax.jit(
    make_train_step(config, cfg, tx, schedule),
    in_shardings=(layout.shardings, batch_shardings),
    out_shardings=(layout.shardings, replicated),
    donate_argnums=0,
  )
  eval_fn = jax.jit(
    make_eval_step(config, cfg), in_shardings=(layout.shardings.params, batch_shardings), out_shardings=replicated
  )
  gbs = config.data.global_batch_size
  writer = metrics_lib.MetricWriter(workdir, start, num_steps, config.metrics.progress_bar)
  g = config.guard
  step_metrics = _StepMetrics(
    writer,
    ckpt,
    cfg,
    model_lib.count_params(layout.abstract.params),
    gbs,
    metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, config.metrics.peak_flops_per_device),
    LossGuard(g.divergence_factor, g.divergence_steps, g.median_window),
    workdir,
  )
  meta = _run_meta(config, cfg)
  every_ckpt, every_eval = config.checkpoint.every_steps, config.eval.every_steps
  save_due = False  # a save was due at a step the guard flagged; it happens at the next clean step
  try:
    for step in range(start + 1, num_steps + 1):
      local = _next_batch(batches, step)
      state, device_metrics = step_fn(state, sharding.to_global_batch(local, batch_shardings, gbs))
      step_metrics.push(step, device_metrics, local["tokens"].shape[1])
      save_due = save_due or step == num_steps or (every_ckpt > 0 and step % every_ckpt == 0)
      eval_now = step == num_steps or (every_eval > 0 and step % every_eval == 0)
      if not (save_due or eval_now):
        continue
      step_metrics.flush()
      if save_due and step_metrics.suspect:
        if step == num_steps:
          raise DivergenceError(
            f"step {step}: the last step's loss is above {config.guard.divergence_factor:g} x its running median "
            f"{step_metrics.guard.median:.4g}; not saving it. {step_metrics._last_good(step_metrics.guard.first_flagged or step)}"
          )
        logging.warning("step %d: loss flagged by the divergence guard; checkpoint deferred", step)
      elif save_due:
        save_due = False
        ckpt.save(
          step, state.params, state.opt_state, {"step": state.step, "rng": state.rng}, train_iter.get_state(), meta
        )
      if eval_now:
        writer.write(step, "eval", _evaluate(config, eval_fn, state.params, batch_shardings, *shard))
      step_metrics.reset_clock()
    ckpt.wait()
  finally:
    writer.close()
  return state


# ---------------------------------------------------------------------------------------------
# Dry run


def _activation_bytes(cfg: model_lib.ModelConfig, rows: int, seq_len: int, tensor: int) -> float:
  """Coarse per-device activation memory of one micro-batch's forward + backward.

  Per layer and token, without remat: ~6 D-wide tensors, q/k/v/attention output, 3 MLP-wide
  tensors, plus over T keys per (sharded) head the fp32 scores before and after masking and the
  probabilities. With remat only the layer input is kept per layer, plus one layer rebuilt
  during the backward pass. The fp32 logits and their gradient, and the boolean mask, come on
  top. Checked against XLA's peak on one H200, in all with params, optimizer and gradients:
  Llama-2-7B (remat full, micro-batch 1 × 2048) 102.9 GiB estimated vs 102.5 GiB measured;
  SmolLM2-135M (no remat, bf16, 16 × 1024) 59.0 vs 59.2 GiB.
  """
  b, T = rows, seq_len
  act = jnp.dtype(cfg.dtype).itemsize
  heads, kv_heads = cfg.n_heads / tensor, cfg.n_kv_heads / tensor
  per_token = (6 * cfg.d_model + (2 * heads + 2 * kv_heads) * cfg.head_dim + 3 * cfg.d_ff / tensor) * act
  layer = b * T * per_token + b * heads * T * T * (8 + act)
  if cfg.remat_policy == "none":
    layers = cfg.n_layers * layer
  else:
    layers = cfg.n_layers * b * T * cfg.d_model * act + layer
  return layers + 2 * b * T * cfg.vocab_size / tensor * 4 + b * T * T


def dry_run(config, num_devices: int) -> str:
  """Parameter count (jax.eval_shape, nothing allocated) and per-device memory on a mesh of
  `num_devices` devices laid out by config.mesh."""
  config_lib.validate(config)
  cfg = config_lib.model_config(config)
  # The schedule does not change the optimizer state's shapes; a constant one needs no epoch size.
  tx = make_optimizer(config, optax.constant_schedule(config.optimizer.learning_rate))
  rules = tuple(tuple(rule) for rule in config.mesh.logical_axis_rules)
  mesh = sharding.abstract_mesh(config.mesh, num_devices)
  params_boxed = model_lib.abstract_params(cfg)
  trainable_boxed = ParamPartition(config, cfg).split(params_boxed)[0]
  opt_boxed = jax.eval_shape(tx.init, trainable_boxed)
  n_params = model_lib.count_params(params_boxed)
  head = cfg.d_model + 1
  param_specs = sharding.logical_specs(params_boxed, rules)
  params_b = sharding.per_device_bytes(nn.meta.unbox(params_boxed), param_specs, mesh)
  opt_b = sharding.per_device_bytes(nn.meta.unbox(opt_boxed), sharding.logical_specs(opt_boxed, rules), mesh)
  # Gradients (of the trainable params only) come out in the param dtype and are summed in fp32:
  # both exist at the peak.
  trainable_b = sharding.per_device_bytes(
    nn.meta.unbox(trainable_boxed), sharding.logical_specs(trainable_boxed, rules), mesh
  )
  grads_b = trainable_b * 4 // jnp.dtype(cfg.param_dtype).itemsize
  if jnp.dtype(cfg.param_dtype) != jnp.float32:
    grads_b += trainable_b

  batch_shards = sharding.batch_shard_count(mesh, rules)
  micro = config.data.global_batch_size // config.train.grad_accum_steps
  rows = math.ceil(micro / batch_shards)
  act_b = _activation_bytes(cfg, rows, config.data.seq_len, mesh.shape["tensor"])
  gib = lambda x: f"{x / 2**30:.2f} GiB"
  lines = [
    f"model: {config.model.preset or 'explicit'} (layers={cfg.n_layers}, d_model={cfg.d_model}, "
    f"scan_layers={cfg.scan_layers}, remat={cfg.remat_policy}, dtype={cfg.dtype}, param_dtype={cfg.param_dtype})",
    f"parameters: {n_params:,} ({n_params / 1e9:.3f}B = base {n_params - cfg.d_model - head:,} "
    f"+ CLS row {cfg.d_model:,} + CLS head {head:,})",
    f"mesh: {num_devices} devices = " + " x ".join(f"{a} {mesh.shape[a]}" for a in sharding.MESH_AXES),
    f"micro-batch: {micro} sequences x {config.data.seq_len} tokens, {rows} per device"
    + ("" if micro % batch_shards == 0 else f" (NOTE: {micro} does not divide over {batch_shards} batch shards)"),
    f"per device: params {gib(params_b)} ({cfg.param_dtype}), optimizer {gib(opt_b)} ({config.optimizer.state_dtype}), "
    f"gradients {gib(grads_b)}, activations ~{gib(act_b)} (estimate), "
    f"total ~{gib(params_b + opt_b + grads_b + act_b)}",
  ]
  return "\n".join(lines)
