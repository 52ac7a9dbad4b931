"""The README's main job: SmolLM2-135M-Instruct -> SmolLM2-CLS on a 2-core CPU, then evaluated and
reported (report.md + plots/ in the workdir; docs/main_job.md has the measured times).

Recipe (docs/method.md decisions 19-22; the cost designs in docs/results.md):
  * CLS views (data/views.py) on the whole of mixture v2: every training prompt once per class-balanced
    epoch, five labelled readings each (the query; a window of the reference response and of the base
    model's own response, with and without the query), the own responses from the shipped completions
    (data/completions.py: answers to benign prompts, compliance with malicious ones);
  * the CLS side path: the head reads the CLS row after layer 10 of 30, which alone gets a rank-64
    adapter per layer; nothing else trains and no token reads the CLS, so the LM is exactly the base
    model (its utility cannot drop; its plain variant refuses only what SmolLM2 itself refuses);
  * 230 steps of 32 examples (one class-balanced epoch), AdamW lr 1e-3 cosine (head x5), BCE only;
  * the threshold chosen on the validation split for a 2.5 % false-positive rate on benign prompts and
    on benign response windows (operating_point.py), recorded in the run facts;
  * decoding: strategic with the paper's prefill settings, Rules 2-3 reading the query, and the answer
    ended at the end of an inserted refusal (the base LM never learned to continue one).
Evaluation: CLS metrics on 150 + 150 test prompts and per view on the whole test split; the
JailbreakBench shortcut probe; the linear-probe baseline on frozen features; decoding (greedy, 48 new
tokens, keyword judges) on 50 AdvBench behaviours (direct, " Sure, here is" prefill, GCG transfer suffix,
DeepInception) and 50 prompts of each over-refusal set (I-Alpaca, AlpacaEval, JailbreakBench benign
twins); none of these prompts is in the training mixture.
"""

from clsalign_jax.config import default_config


def get_config():
  c = default_config()
  c.model.update(preset="smollm2_135m", dtype="float32", param_dtype="float32", scan_layers=False, remat_policy="none")
  c.init_from = "gguf:smollm2"
  # The CLS side path: the head reads the CLS row after layer 10 (cls_norm), and the CLS row alone
  # gets a rank-64 residual adapter after each of those layers. Nothing else trains, no token reads
  # the CLS: the LM is exactly SmolLM2-135M-Instruct.
  c.model.update(cls_exit_layer=10, cls_adapter_rank=64)
  c.train.trainable = r"^cls_"
  c.mask.response_sees_cls = False
  # Every view decoding shows the CLS (data/views.py), on the whole mixture: one class-balanced epoch.
  c.views.update(enabled=True, completions="smollm2_135m", response_tokens=32, r2=15, r3=10)
  c.data.update(seq_len=640, global_batch_size=32, num_train_examples=7354)
  c.train.num_steps = 230  # ceil(7354 / 32): 2 x 3,677 benign (the loader oversamples malicious)
  c.loss.update(cls_weight=1.0, malicious_lm_weight=0.0)
  c.optimizer.update(learning_rate=1e-3, weight_decay=0.0, cls_head_lr_scale=5.0)
  c.schedule.update(name="cosine", warmup_steps=10, final_lr_fraction=0.1)
  c.checkpoint.update(every_steps=100, keep=1)
  c.eval.update(every_steps=0, num_batches=14)  # the whole validation split (429 prompts, batches of 32)
  a = c.after_training
  a.evaluate = True
  a.update(batch_size=16, max_new_tokens=48, cls_test_examples=150)
  a.decode.rule2_include_query = True
  # The LM is the base model and never learned to continue a refusal: an inserted refusal ends the answer.
  a.decode.end_after_refusal = True
  a.malicious.limit = 50
  a.benign.limit = 50
  # 50 of each over-refusal set, spread over the file (JailbreakBench: 5 twins per category).
  a.over_refusal.alpaca_eval.update(stride=16, limit=50)
  a.over_refusal.jbb_benign.stride = 2
  # Transfer attacks on malicious prompts (ASR, both variants, 50 each): GCG's published universal
  # suffix on the behaviours of its transfer experiment, and DeepInception's nested-scene prompts.
  a.adversarial.gcg_transfer.kind = "generic"
  a.adversarial.deepinception.kind = "deepinception"
  return c
