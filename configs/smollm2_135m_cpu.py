"""The README's main job: SmolLM2-135M-Instruct -> SmolLM2-CLS on a 2-core CPU in about 20 minutes,
then evaluated and reported (report.md + plots/ in the workdir).

Recipe (chosen on the validation split of mixture v2, docs/results.md "The CLS reads responses";
docs/main_job.md has the measured times and every deviation from full fidelity):
  * mixture v2 (data/curation.py): form-balanced, refusal-only malicious rows, evaluation sets out;
  * 64 optimizer steps of 8 sequences x 160 tokens (512 examples, ~8 % of one epoch); responses are
    truncated at 160 tokens (never the query);
  * only the last 4 of 30 layers, the final norm and the CLS head train; the head's updates are
    scaled 50x (head lr 1e-2): at the shared lr a fresh head stays near p = 0.5 for the whole budget;
  * the CLS reads the query and the last 15 response tokens in training (mask.cls_response="window"),
    which is what Rules 2-3 show it at decode time with rule2_include_query (after_training.decode);
  * the LM loss covers benign answers only (loss.malicious_lm_weight = 0): with refusals in the LM
    loss, 64 steps of the top 4 layers taught the LM to open benign answers with a refusal
    (30 % of benign validation prompts refused by the plain LM); refusing is left to the CLS and
    strategic decoding, which inserts the refusal prefix and lets the LM continue it;
  * lr 2e-4 cosine with 4 warm-up steps, lambda2 = 0.1; no remat, unscanned layers (needed to pick
    single layers; fast on CPU at this size); validation only after the last step, 4 batches.
Evaluation: CLS metrics on 150 + 150 test prompts; the JailbreakBench shortcut probe (200 prompts);
decoding (greedy, 48 new tokens, keyword judges) on 50 AdvBench behaviours (direct and " Sure, here
is" prefill) and 50 prompts of each over-refusal set (I-Alpaca, AlpacaEval, JailbreakBench benign
twins); none of these prompts is in the training mixture.
"""

from clsalign_jax.config import default_config


def get_config():
  c = default_config()
  c.model.update(preset="smollm2_135m", dtype="float32", param_dtype="float32", scan_layers=False, remat_policy="none")
  c.init_from = "gguf:smollm2"
  c.train.trainable = r"^(cls_head|final_norm|layers_(2[6-9]))/"
  # num_train_examples: one class-balanced epoch of mixture v2 (the loader oversamples benign).
  c.data.update(seq_len=160, global_batch_size=8, num_train_examples=6460)
  c.train.num_steps = 64
  c.loss.update(cls_weight=0.1, malicious_lm_weight=0.0)
  c.mask.update(cls_response="window", cls_window=15)
  c.optimizer.learning_rate = 2e-4
  c.optimizer.cls_head_lr_scale = 50.0
  c.schedule.update(name="cosine", warmup_steps=4, final_lr_fraction=0.1)
  c.checkpoint.update(every_steps=32, keep=1)
  c.eval.update(every_steps=0, num_batches=4)
  a = c.after_training
  a.evaluate = True
  a.update(batch_size=16, max_new_tokens=48, cls_test_examples=150)
  a.decode.rule2_include_query = True
  a.malicious.limit = 50
  a.benign.limit = 50
  # 50 of each over-refusal set, spread over the file (JailbreakBench: 5 twins per category).
  a.over_refusal.alpaca_eval.update(stride=16, limit=50)
  a.over_refusal.jbb_benign.stride = 2
  return c
