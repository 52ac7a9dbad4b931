"""The train state: its shardings, a fresh start (random or `init_from` weights) and the restore of
the newest usable checkpoint. Nothing here writes into the workdir."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from clsalign_jax import artifacts, sharding
from clsalign_jax import checkpoint as ckpt_lib
from clsalign_jax import model as model_lib
from clsalign_jax.train.inputs import InitFrom
from clsalign_jax.train.optimizer import ParamPartition

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
# Workdir subdirectory for corrupted step directories skipped by `checkpoint.fallback_to_intact`
# (moved out of `checkpoints/`, kept, never deleted).
CORRUPT_DIR = "corrupt_checkpoints"


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any
  opt_state: Any
  # Raw key data (uint32), so checkpoints hold a plain array. No layer is stochastic today; the
  # per-step key is threaded through (as the 'dropout' stream) so adding one keeps resume exact.
  rng: jax.Array


@dataclasses.dataclass
class StateLayout:
  """The train state's NamedShardings, and its ShapeDtypeStructs carrying them (restore targets)."""

  shardings: TrainState
  abstract: TrainState


def state_layout(cfg: model_lib.ModelConfig, tx, mesh, rules, partition: ParamPartition | None = None) -> StateLayout:
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
  return StateLayout(shardings, abstract)


def _same(a, b) -> bool:
  # Float fields may have passed through float32 (GGUF stores rms_eps 1e-5 as 9.99999975e-06).
  if isinstance(a, float) and isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-6)
  return a == b


def check_same_arch(found: dict, expected: model_lib.ModelConfig, fields, source: str) -> None:
  """CheckpointError naming every field of `fields` where `found` (a model config dict) differs."""
  diff = {f: (found.get(f), getattr(expected, f)) for f in fields if not _same(found.get(f), getattr(expected, f))}
  if diff:
    detail = ", ".join(f"{f}: {a!r} there vs {b!r} in the config" for f, (a, b) in diff.items())
    raise ckpt_lib.CheckpointError(f"{source}: does not match the configured model ({detail})")


# ---------------------------------------------------------------------------------------------
# Fresh start


def load_init_params(config, cfg: model_lib.ModelConfig, layout: StateLayout, init: InitFrom | None = None):
  """`config.init_from` (parsed once, as `init`) through the one loader (clsalign_jax.artifacts). A
  training run's step is restored straight into the sharded layout; other weights are read on the
  host, then sharded."""
  spec = (init or InitFrom(config.init_from)).spec

  def check(src_cfg: model_lib.ModelConfig, where: str) -> None:
    # A run restores into our layer layout, so that must match too; the param dtype may differ (restoring casts).
    fields = _ARCH_FIELDS + ("scan_layers",) if spec.kind == "run" else _ARCH_FIELDS
    check_same_arch(dataclasses.asdict(src_cfg), cfg, fields, where)

  if spec.kind == "run":
    return artifacts.load(
      spec,
      tokenizer="none",
      check=check,
      restore_into=layout.abstract.params,
      allow_unverified=config.checkpoint.allow_unverified,
    ).params
  # Host-side loads; stacking for scan_layers goes through jnp, so keep it off device 0.
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    params = model_lib.to_layout(artifacts.load(spec, tokenizer="none", check=check).params, cfg)
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


def fresh_state(config, cfg, tx, layout: StateLayout, partition: ParamPartition, init: InitFrom) -> TrainState:
  """Step 0: `init_from`'s weights (`init`) when set, else random ones from `config.seed`."""
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  if config.init_from:
    params = load_init_params(config, cfg, layout, init)
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
# Resume


def _exists_everywhere(directory: str) -> bool:
  exists = os.path.isdir(directory)
  if jax.process_count() > 1:
    # Opening a checkpoint manager is collective: every process must take the same branch, even if
    # process 0 has since created the directory.
    from jax.experimental import multihost_utils

    exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
  return exists


def _check_same_batch(meta: dict, config, source: str) -> None:
  """The saved data position counts batches of the saved size: resumed with another size, the run
  would repeat or skip examples. Refused by name, as a change of the model's shape is."""
  saved = ((meta.get("config") or {}).get("data") or {}).get("global_batch_size")
  if saved is not None and saved != config.data.global_batch_size:
    raise ckpt_lib.CheckpointError(
      f"config.data.global_batch_size={config.data.global_batch_size}: {source} was saved with {saved}, and its "
      f"data position counts batches of {saved}; resume with {saved}, or start a new --workdir from this one "
      f"(--config.init_from={os.path.dirname(source)})"
    )


def _restore_step(config, cfg, layout: StateLayout, reader: ckpt_lib.Checkpointer, step: int) -> dict | None:
  """The restored items of `step`; None when it is corrupted and `checkpoint.fallback_to_intact` is set."""
  try:
    reader.verify(step)
    meta = reader.read_meta(step)
    # Another model is not corruption: never fall back past it.
    check_same_arch(meta["model_config"], cfg, _LAYOUT_FIELDS, reader.step_dir(step))
    _check_same_batch(meta, config, reader.step_dir(step))
    return reader.restore(
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
        f"{os.path.join(os.path.dirname(reader.directory), CORRUPT_DIR)})"
      ) from None
    logging.warning("%s; trying the step before", e)
    return None


def restore_latest(config, cfg, layout: StateLayout, directory: str, train_iter) -> tuple[TrainState | None, list[int]]:
  """The newest usable checkpoint of `directory`, read without writing anything: (state or None when
  there is no checkpoint, the corrupted newer steps skipped). A corrupted step is refused unless
  `checkpoint.fallback_to_intact`, which skips to the newest intact one. `train_iter` is set to the
  data position saved with the step restored."""
  if not _exists_everywhere(directory):
    return None, []
  reader = ckpt_lib.Checkpointer(directory, read_only=True, allow_unverified=config.checkpoint.allow_unverified)
  try:
    steps = reader.all_steps()
    skipped = []
    for step in reversed(steps):
      items = _restore_step(config, cfg, layout, reader, step)
      if items is None:
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
