"""The optimizer: LR schedule, the optax chain (AdamW, clipping, the CLS head's own LR scale, moments
in `optimizer.state_dtype`) and the trainable subset (`train.trainable`) it updates."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from clsalign_jax import config as config_lib
from clsalign_jax import errors
from clsalign_jax import model as model_lib


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


def _param_paths(cfg: model_lib.ModelConfig) -> list[str]:
  return [
    _path_key(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(
      model_lib.abstract_params(cfg), is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
    )[0]
  ]


def _check_whole_layers(pattern: str, cfg: model_lib.ModelConfig) -> None:
  # Scanned layers are one stacked array per weight: a pattern must pick all layers or none.
  per_layer = {}
  for path in _param_paths(cfg.replace(scan_layers=False)):
    layer, _, rest = path.partition("/")
    if re.fullmatch(r"layers_\d+", layer):
      per_layer.setdefault(rest, set()).add(bool(re.search(pattern, path)))
  if any(len(picked) > 1 for picked in per_layer.values()):
    raise ValueError(
      f"config.train.trainable={pattern!r} selects individual layers, but scanned layers "
      "are stacked into one array per weight; set config.model.scan_layers=False"
    )


class ParamPartition:
  """Splits a params tree into the trainable subtree (`config.train.trainable`) and the frozen
  rest, both nested dicts with the params' own keys, so optimizer state and checkpoints keep a
  plain tree. Gradients are taken w.r.t. the trainable part only: JAX then runs no backward pass
  through layers below the lowest trainable one and computes no weight gradients for frozen ones."""

  def __init__(self, config, cfg: model_lib.ModelConfig):
    pattern = config.train.trainable
    paths = _param_paths(cfg)
    if not pattern:
      self.trainable = frozenset(paths)
      return
    if cfg.scan_layers:
      _check_whole_layers(pattern, cfg)
    # A stacked weight 'layers/X' is what 'layers_0/X' (hence every layer) is unscanned.
    unscanned = lambda p: re.sub(r"^layers/", "layers_0/", p)
    self.trainable = frozenset(p for p in paths if re.search(pattern, p) or re.search(pattern, unscanned(p)))
    if not self.trainable:
      raise ValueError(
        f"config.train.trainable={pattern!r} matches no parameter; paths look like {', '.join(paths[:4])}"
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
