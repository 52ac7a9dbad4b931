"""The README's main job: SmolLM2-135M-Instruct → SmolLM2-CLS on a 2-core CPU in under 30 minutes,
then evaluated and reported (report.md + plots/ in the workdir).

Deviations from full fidelity (configs/smollm2_135m_sft.py and the paper's recipe), all for the
CPU budget; docs/main_job.md has the measured times:
  * 64 optimizer steps of 4 sequences (256 examples, ~6 % of one epoch) instead of epochs of the
    mixture at 16 × 1024 (paper: 15 epochs, 72 × 2048).
  * seq_len 256: about half of the benign training examples lose the tail of their response
    (never the query), 2 % of benign prompts are longer than 256 tokens and are dropped; malicious
    examples fit (98 %).
  * Only the last 4 of 30 layers, the final norm and the CLS head train (the paper fine-tunes
    everything). The CLS input row stays at its initial value (the mean embedding): training it
    would need the backward pass through all 30 layers (~1.5-2x the step time measured).
  * lr 2e-4 cosine with 4 warm-up steps (paper: 2e-5 StepLR), λ2 = 0.1, and the head's updates
    scaled 50× (head lr 1e-2): at the shared lr the fresh head stays near p = 0.5 for the whole
    budget (measured: test F1 0.73 with every benign prompt flagged; 0.95 with the scale).
  * No remat and unscanned layers (needed to pick single layers; fast on CPU at this size).
  * Validation only after the last step, 4 batches (16 sequences).
  * Evaluation: CLS metrics on the whole test split (214 prompts); decoding on the first 48 AdvBench
    behaviours (direct and " Sure, here is" prefill) and 48 benign I-Alpaca prompts, greedy, 48 new
    tokens, keyword judges (no LLM judge, no GCG / AutoDAN / decoding-grid attacks).
"""

from clsalign_jax.config import default_config


def get_config():
  c = default_config()
  c.model.update(preset="smollm2_135m", dtype="float32", param_dtype="float32", scan_layers=False,
                 remat_policy="none")
  c.init_from = "gguf:smollm2"
  c.train.trainable = r"^(cls_head|final_norm|layers_(2[6-9]))/"
  # num_train_examples: one class-balanced epoch of the shipped mixture (the loader oversamples benign).
  c.data.update(seq_len=256, global_batch_size=4, num_train_examples=4462)
  c.train.num_steps = 64
  c.loss.cls_weight = 0.1
  c.optimizer.learning_rate = 2e-4
  c.optimizer.cls_head_lr_scale = 50.0
  c.schedule.update(name="cosine", warmup_steps=4, final_lr_fraction=0.1)
  c.checkpoint.update(every_steps=32, keep=1)
  c.eval.update(every_steps=0, num_batches=4)
  a = c.after_training
  a.evaluate = True
  a.update(batch_size=16, max_new_tokens=48, cls_test_examples=150)
  a.malicious.limit = 50
  a.benign.limit = 50
  # 50 of each over-refusal set, spread over the file (JailbreakBench: 5 twins per category).
  a.over_refusal.alpaca_eval.update(stride=16, limit=50)
  a.over_refusal.jbb_benign.stride = 2
  return c
