"""Llama-3.1-8B-Instruct → Llama3-8B-CLS: the paper's SFT recipe on the Llama-3 chat format.

Point init_from at a Hugging Face Llama-3.1-8B-Instruct directory (config.json with
rope_type llama3, safetensors shards, tokenizer.json):
  --config.init_from=hf:/path/to/Llama-3.1-8B-Instruct
As with Mistral-7B-Instruct, the start is already instruction-tuned, so the CLS loss weight is
the paper's instruct setting (λ2 = 0.01) and the run is 8 epochs.
"""

from clsalign_jax.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "llama3_8b"
  c.init_from = "hf:/path/to/Llama-3.1-8B-Instruct"
  c.data.template = "llama3"
  c.loss.cls_weight = 0.01
  c.train.num_epochs = 8.0
  return c
