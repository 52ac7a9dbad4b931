"""Mistral-7B-Instruct-v0.2 → Mistral-7B-CLS: λ2 = 0.01 (instruction-tuned start), 8 epochs."""

from clsalign_jax.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "mistral_7b_instruct_v0_2"
  c.init_from = "hf:/path/to/Mistral-7B-Instruct-v0.2"
  c.loss.cls_weight = 0.01
  c.train.num_epochs = 8.0
  return c
