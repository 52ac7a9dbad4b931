"""Llama-2-7B base → Llama2-7B-CLS: the paper's SFT run (the defaults are its recipe).

Point init_from at a Hugging Face Llama-2-7b directory:
  --config.init_from=hf:/path/to/Llama-2-7b-hf
"""

from clsalign_jax.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "llama2_7b"
  c.init_from = "hf:/path/to/Llama-2-7b-hf"
  return c
