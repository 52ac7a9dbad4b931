"""Qwen2.5-0.5B-Instruct → Qwen2.5-0.5B-CLS: the paper's SFT recipe on Qwen's ChatML (`qwen2_5`:
ChatML with Qwen2.5's default system turn, as its own chat template renders one user turn).

Point init_from at a Hugging Face Qwen2.5-0.5B-Instruct directory (config.json, model.safetensors,
tokenizer.json):
  --config.init_from=hf:/path/to/Qwen2.5-0.5B-Instruct
The start is instruction-tuned, so the CLS loss weight is the paper's instruct setting (λ2 = 0.01)
and the run is 8 epochs, as for Mistral-7B-Instruct. Qwen2.5 pads its embedding to 151,936 rows
while its tokenizer has 151,665 tokens; the [CLS] row must sit past both (docs/interop.md, Qwen2).
"""

from clsalign_jax.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "qwen2_5_0_5b"
  c.init_from = "hf:/path/to/Qwen2.5-0.5B-Instruct"
  c.data.template = "qwen2_5"
  c.loss.cls_weight = 0.01
  c.train.num_epochs = 8.0
  return c
