"""Sampling: top-k / top-p filtering, greedy rows, per-row seeds."""

import jax
import jax.numpy as jnp
import numpy as np

from clsalign_jax.decode import Sampling, filter_logits, sample_tokens

sample = jax.jit(sample_tokens)  # eager lax.cond would compile on every call

PROBS = np.asarray([0.05, 0.5, 0.15, 0.3], np.float32)  # sorted: 1, 3, 2, 0


def _kept(top_k, top_p):
  logits = jnp.log(jnp.asarray([PROBS]))
  out = filter_logits(logits, jnp.asarray([top_k]), jnp.asarray([top_p], jnp.float32))
  return set(np.flatnonzero(np.isfinite(np.asarray(out[0]))).tolist())


def test_top_k_and_top_p():
  assert _kept(0, 1.0) == {0, 1, 2, 3}
  assert _kept(2, 1.0) == {1, 3}
  assert _kept(0, 0.5) == {1}  # the top token alone reaches 0.5
  assert _kept(0, 0.8) == {1, 3}
  assert _kept(0, 0.81) == {1, 2, 3}
  assert _kept(0, 0.0) == {1}  # the top token is always kept
  assert _kept(1, 0.99) == {1}  # top-k first, then the nucleus of what is left


def test_greedy_and_sampled_rows_and_seeds():
  logits = jnp.log(jnp.asarray(np.tile(PROBS, (4, 1))))
  params = Sampling.make(4, temperature=[0.0, 1.0, 1.0, 1.0], top_k=[0, 2, 2, 2], seed=[0, 7, 7, 8])
  draws = np.stack([np.asarray(sample(logits, params, step)) for step in range(64)])
  assert (draws[:, 0] == 1).all()  # greedy
  assert set(draws[:, 1].tolist()) == {1, 3}  # top-2 only, both drawn
  np.testing.assert_array_equal(draws[:, 1], draws[:, 2])  # same seed, same draws
  assert (draws[:, 1] != draws[:, 3]).any()
  again = np.asarray(sample(logits, params, 5))
  np.testing.assert_array_equal(again, draws[5])


def test_make_defaults_to_one_seed_per_row():
  params = Sampling.make(3, seed=10)
  np.testing.assert_array_equal(params.seed, [10, 11, 12])
  assert float(params.temperature[0]) == 0.0 and int(params.top_k[2]) == 0


def test_top_p_off_keeps_top_k_whatever_the_rounding():
  # With top_p = 1 the mass before the first token past top-k sums to 1 only up to rounding;
  # below 1 it used to count the -inf tail as nucleus and drop the top-k cut.
  logits = jax.random.normal(jax.random.key(0), (256, 97))
  kept = np.isfinite(np.asarray(filter_logits(logits, jnp.full((256,), 20), jnp.ones((256,)))))
  np.testing.assert_array_equal(kept.sum(-1), 20)
