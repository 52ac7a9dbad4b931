"""Optional continued pretraining of Llama-2-7B on labelled Wikipedia chunks:
L_lm + 0.01·BCE with one label per chunk, CLS reading the whole chunk, 3 epochs.

Two values are yours to give (the run is refused without them, naming the key):
  --config.data.files=corpus.jsonl          one {"text": ..., "label": 0|1} document per line
  --config.data.num_train_examples=ROWS     seq_len-token rows in one pass over the corpus (the epoch)

Follow it with SFT from its weights:
  --config=configs/llama7b_sft.py --config.init_from=orbax:PRETRAIN_WORKDIR/checkpoints
"""

from clsalign_jax.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "llama2_7b"
  c.init_from = "hf:/path/to/Llama-2-7b-hf"
  c.train.mode = "pretrain"
  c.train.num_epochs = 3.0
  c.loss.cls_weight = 0.01
  c.data.source = "wiki_pretrain"
  c.data.num_train_examples = 0  # refused until set: the rows of seq_len tokens one pass over data.files gives
  c.schedule.decay_every_steps = 0
  return c
