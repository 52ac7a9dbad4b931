"""`dry_run`: parameter count and per-device memory of a config, without allocating anything."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from clsalign_jax import config as config_lib
from clsalign_jax import model as model_lib
from clsalign_jax import sharding
from clsalign_jax.train.optimizer import ParamPartition, make_optimizer


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
