"""Per-device memory of decoding on a mesh, before any weight is loaded (`--dry_run` of `generate`
and `evaluate`).

Params and KV cache come from their shapes and the layout's shardings (exact); the temporary
memory is what XLA reports for the compiled decode program, lowered from abstract arrays, so
nothing is allocated. Compiled for the devices present: on a CPU host sizing a TPU or GPU mesh
(forced CPU devices), the temp figure is the CPU compiler's and only indicative.
"""

from __future__ import annotations

import math
import os

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np

from clsalign_jax import artifacts, files, sharding
from clsalign_jax import model as model_lib
from clsalign_jax.decode import loop
from clsalign_jax.decode.config import DecodeConfig
from clsalign_jax.decode.sampling import Sampling
from clsalign_jax.errors import CheckpointError
from clsalign_jax.interop import gguf as gguf_io
from clsalign_jax.interop import hf as hf_io


def _abstract(shape, dtype, s):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=s)


def decode_plan(
  cfg: model_lib.ModelConfig,
  layout: sharding.Layout,
  batch: int,
  prompt_len: int,
  dcfg: DecodeConfig,
  compile: bool = True,
) -> dict:
  """Bytes per device of params, KV cache and (compiled) temporaries for `batch` rows of
  `prompt_len` prompt slots and dcfg.max_new_tokens new ones."""
  cfg = cfg.replace(scan_layers=False, remat_policy="none")
  B = layout.pad_rows(batch)
  P = loop.bucket(prompt_len)
  S = P + dcfg.max_new_tokens
  boxed = model_lib.abstract_params(cfg)
  shardings = layout.params(boxed)
  params_abs = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), nn.meta.unbox(boxed), shardings)
  params_b = sum(
    math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
    for a, s in zip(jax.tree.leaves(params_abs), jax.tree.leaves(shardings))
  )
  tensor = layout.mesh.shape["tensor"]
  heads = cfg.n_kv_heads // tensor if cfg.n_kv_heads % tensor == 0 else cfg.n_kv_heads
  cache_b = 2 * cfg.n_layers * (B // layout.row_shards) * heads * S * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
  plan = {
    "mesh": layout.describe(),
    "rows": B,
    "slots": S,
    "params": params_b,
    "kv_cache": cache_b,
    "temp": None,
  }
  if compile:
    rows = layout.rows
    inputs = loop.DecodeInputs(
      _abstract((B, P), jnp.int32, rows(2)),
      _abstract((B,), jnp.int32, rows(1)),
      _abstract((B,), jnp.int32, rows(1)),
      _abstract((B, 2), jnp.int32, rows(2)),
    )
    samp = Sampling(*(_abstract((B,), dt, rows(1)) for dt in (jnp.float32, jnp.int32, jnp.float32, jnp.int32)))
    scalar = _abstract((), jnp.int32, layout.replicated)
    refusal = _abstract((8,), jnp.int32, layout.replicated)
    fn = loop._sharded_decode(layout, cfg, dcfg, False, False, False)
    with layout.activated():
      compiled = fn.lower(params_abs, inputs, refusal, samp, None, scalar, scalar).compile()
    plan["temp"] = compiled.memory_analysis().temp_size_in_bytes
  return plan


def format_plan(name: str, plan: dict) -> str:
  gib = lambda x: f"{x / 2**30:.2f} GiB"
  temp = "n/a" if plan["temp"] is None else gib(plan["temp"])
  total = plan["params"] + plan["kv_cache"] + (plan["temp"] or 0)
  return (
    f"{name}: mesh {plan['mesh']}, {plan['rows']} rows x {plan['slots']} slots; per device: "
    f"params {gib(plan['params'])}, KV cache {gib(plan['kv_cache'])}, temp {temp} (compiled), total {gib(total)}"
  )


class _Sized(Exception):
  """Raised by the loader's check hook once the architecture is known: nothing more is read."""

  def __init__(self, cfg):
    self.cfg = cfg


def model_config_of(spec: str, model_fields: dict | None = None) -> model_lib.ModelConfig:
  """A checkpoint's architecture, read from its config alone: a run's step is not restored, an HF
  directory's or an orbax params directory's weights are not read, a GGUF file's header only."""
  s = artifacts.parse_spec(spec)
  if s.kind == "hf":
    path = os.path.join(s.path, "config.json")
    cfg = hf_io.config_from_hf(files.read_json(path), path)
  elif s.kind == "gguf":
    cfg = gguf_io.config_from_gguf(gguf.GGUFReader(s.path), s.path)
  elif s.kind == "orbax":
    cfg = artifacts.orbax_config(s.path)
  else:  # a run (stopped before its step is restored) or random weights (before they are drawn)

    def stop(cfg, where):
      raise _Sized(cfg)

    try:
      artifacts.load(spec, tokenizer="none", model_fields=model_fields, check=stop)
      raise CheckpointError(f"{spec}: the loader returned without reporting the architecture")
    except _Sized as e:
      cfg = e.cfg
  if model_fields:
    cfg = cfg.replace(**{k: v for k, v in model_fields.items() if k != "preset"})
  return cfg


# Prompt slots the evaluation plan assumes (template + query + CLS; bucketed like real rows).
PLAN_PROMPT_SLOTS = 256


def harness_plan(h) -> str:
  """`evaluate --dry_run`: one line per variant, at the harness's batch size and generation length,
  for PLAN_PROMPT_SLOTS prompt slots."""
  layout = h.layout or sharding.Layout.make({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  lines = []
  for v in h.variants:
    cfg = model_config_of(v.checkpoint, dict(v.model) or None)
    dcfg = DecodeConfig(**{"max_new_tokens": h.config["max_new_tokens"], **dict(v.decode)})
    plan = decode_plan(cfg, layout, h.config["batch_size"], PLAN_PROMPT_SLOTS, dcfg)
    lines.append(format_plan(v.name, plan))
  return "\n".join(lines)
