"""A two-layer fp32 model on synthetic data: seconds on one CPU core (tests, smoke runs)."""

from clsalign_jax.config import default_config


def get_config():
  c = default_config()
  c.model.update(
    vocab_size=256,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    d_ff=128,
    max_seq_len=128,
    dtype="float32",
    param_dtype="float32",
    scan_layers=False,
    remat_policy="none",
  )
  c.data.update(source="synthetic", seq_len=64, global_batch_size=8)
  c.train.num_steps = 20
  c.optimizer.update(learning_rate=3e-3, weight_decay=0.0)
  c.schedule.update(name="cosine", warmup_steps=2)
  c.checkpoint.every_steps = 10
  c.eval.update(every_steps=10, num_batches=2)
  return c
