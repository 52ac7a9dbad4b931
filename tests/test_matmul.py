"""matmul.dense (the MLP projections' custom VJP) against plain einsum autodiff: values and
gradients alone, under remat policies, and through a whole model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clsalign_jax import losses, masks, matmul
from clsalign_jax import model as model_lib


@pytest.mark.parametrize("policy", [None, "nothing_saveable", "checkpoint_dots"])
def test_dense_has_the_einsum_values_and_gradients(policy):
  x_BTD = jax.random.normal(jax.random.key(0), (3, 5, 7))
  w_DF = jax.random.normal(jax.random.key(1), (7, 11))
  plain = lambda x, w: jnp.einsum("btd,df->btf", x, w)

  def loss(dense, x, w):
    h = jnp.sin(dense(x, w))  # a non-trivial output gradient
    return jnp.sum(h * jnp.cos(dense(x, w)))

  fn = lambda d: lambda x, w: loss(d, x, w)
  if policy:
    fn = lambda d, f=fn: jax.checkpoint(f(d), policy=getattr(jax.checkpoint_policies, policy))
  val, (gx, gw) = jax.value_and_grad(fn(matmul.dense), argnums=(0, 1))(x_BTD, w_DF)
  ref_val, (ref_gx, ref_gw) = jax.value_and_grad(fn(plain), argnums=(0, 1))(x_BTD, w_DF)
  np.testing.assert_allclose(val, ref_val, rtol=1e-6)
  np.testing.assert_allclose(gx, ref_gx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_train_step_gradients_match_plain_einsum_mlp(monkeypatch):
  """The whole model's gradient with the custom-VJP MLP equals plain autodiff of the einsums."""
  cfg = model_lib.ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48)
  params = model_lib.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  mask = masks.causal_mask(jnp.ones((2, 16), jnp.int32))

  def loss(p):
    out = model_lib.Transformer(cfg).apply({"params": p}, tokens, pos, mask)
    s, n = losses.token_cross_entropy(out.logits_BTV, tokens, jnp.ones((2, 16)))
    return s / n

  val, grad = jax.value_and_grad(loss)(params)
  monkeypatch.setattr(matmul, "dense", lambda x, w: jnp.einsum("btd,df->btf", x, w))
  ref_val, ref_grad = jax.value_and_grad(loss)(params)
  np.testing.assert_allclose(val, ref_val, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grad, ref_grad)
