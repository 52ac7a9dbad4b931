"""Next-token choice: greedy, temperature, top-k and top-p, with per-row settings and seeds.

Settings are traced arrays, so one compiled decode loop serves any mix of them. Each row draws
from its own key (its seed folded with the step), so a row's samples do not depend on which
other rows share the batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Next-token choice: greedy, temperature, top-k, top-p and a seed.

  One type at both scales: scalar fields describe one generation (an evaluation case's setting,
  a request's), [B] array fields a batch (what the decode loop traces, so one compiled loop serves
  any mix of settings). `Sampling.batch` stacks per-row settings; `Sampling.make` broadcasts one.
  """

  temperature: Any = 0.0  # <= 0: greedy
  top_k: Any = 0  # <= 0: off
  top_p: Any = 1.0  # >= 1: off
  seed: Any = 0

  @classmethod
  def make(cls, batch: int, temperature=0.0, top_k=0, top_p=1.0, seed=0) -> Sampling:
    """Scalars broadcast to every row; the default per-row seed is `seed + row`."""
    seed_B = np.asarray(seed, np.int32)
    if seed_B.ndim == 0:
      seed_B = seed_B + np.arange(batch, dtype=np.int32)
    as_B = lambda x, dt: jnp.broadcast_to(jnp.asarray(x, dt), (batch,))
    return cls(
      as_B(temperature, jnp.float32), as_B(top_k, jnp.int32), as_B(top_p, jnp.float32), as_B(seed_B, jnp.int32)
    )

  @classmethod
  def batch(cls, rows: Sequence[Sampling]) -> Sampling:
    """Per-row scalar settings → one batched Sampling ([B] arrays)."""
    col = lambda name, dt: jnp.asarray(np.asarray([getattr(r, name) for r in rows], dt))
    # Seeds wrap to int32 (a request's seed may be any integer); equal seeds stay equal.
    seed_B = jnp.asarray(np.asarray([r.seed for r in rows], np.int64).astype(np.int32))
    return cls(col("temperature", np.float32), col("top_k", np.int32), col("top_p", np.float32), seed_B)


jax.tree_util.register_dataclass(Sampling, data_fields=["temperature", "top_k", "top_p", "seed"], meta_fields=[])


def filter_logits(logits_BV: Array, top_k_B: Array, top_p_B: Array) -> Array:
  """Set to -inf every logit outside the row's top-k and then outside its top-p nucleus.

  Ties with the k-th value are kept (as transformers does). The nucleus is the smallest set of
  highest-probability tokens whose mass reaches p; the top token is always kept.
  """
  V = logits_BV.shape[-1]
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)
  k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
  kth_B1 = jnp.take_along_axis(sorted_BV, (k_B - 1)[:, None], axis=-1)
  sorted_BV = jnp.where(sorted_BV >= kth_B1, sorted_BV, -jnp.inf)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  # Capped at k: past the top-k the mass only grows by zeros, and a sum that rounds to just
  # below 1 would otherwise let top_p = 1 ("off") reach the -inf tail and undo top-k.
  n_keep_B = jnp.clip(jnp.sum(mass_before_BV < top_p_B[:, None], axis=-1), 1, k_B)
  floor_B1 = jnp.take_along_axis(sorted_BV, (n_keep_B - 1)[:, None], axis=-1)
  return jnp.where(logits_BV >= floor_B1, logits_BV, -jnp.inf)


def sample_tokens(logits_BV: Array, sampling: Sampling, step) -> Array:
  """[B] int32 next tokens for a batched `sampling`. Greedy-only batches skip the sort entirely."""
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  temperature_B, seed_B = sampling.temperature, sampling.seed

  def draw(_):
    t_B1 = jnp.maximum(temperature_B, 1e-6)[:, None]
    filtered_BV = filter_logits(logits_BV / t_B1, sampling.top_k, sampling.top_p)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seed_B)
    drawn_B = jax.vmap(jax.random.categorical)(keys, filtered_BV).astype(jnp.int32)
    return jnp.where(temperature_B > 0, drawn_B, greedy_B)

  return jax.lax.cond(jnp.any(temperature_B > 0), draw, lambda _: greedy_B, None)
