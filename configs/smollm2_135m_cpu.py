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
  # The CLS side path: the head reads the CLS row after layer 16 (cls_norm), and the CLS row alone
  # gets a rank-64 residual adapter after each of those layers. Nothing else trains, no token reads
  # the CLS: the LM is exactly SmolLM2-135M-Instruct.
  c.model.update(cls_exit_layer=16, cls_adapter_rank=64)
  c.train.trainable = r"^cls_"
  c.mask.response_sees_cls = False
  # Every view decoding shows the CLS (data/views.py), on the whole mixture: one class-balanced epoch.
  c.views.update(enabled=True, completions="smollm2_135m", response_tokens=32, r2=15, r3=10)
  c.data.update(seq_len=640, global_batch_size=32, num_train_examples=6460)
  c.train.num_steps = 202  # ceil(6460 / 32)
  c.loss.update(cls_weight=1.0, malicious_lm_weight=0.0)
  c.optimizer.update(learning_rate=1e-3, weight_decay=0.0, cls_head_lr_scale=5.0)
  c.schedule.update(name="cosine", warmup_steps=10, final_lr_fraction=0.1)
  c.checkpoint.update(every_steps=100, keep=1)
  c.eval.update(every_steps=0, num_batches=13)  # the whole validation split (390 prompts, batches of 32)
  a = c.after_training
  a.evaluate = True
  a.update(batch_size=16, max_new_tokens=48, cls_test_examples=150)
  a.decode.rule2_include_query = True
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
