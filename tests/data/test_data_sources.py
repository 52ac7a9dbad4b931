import json

import numpy as np
import pytest

from clsalign_jax import config as config_lib
from clsalign_jax import train
from clsalign_jax.data import sources


@pytest.fixture
def config(tmp_path, monkeypatch):
  # The config stays locked: every key these tests set must be declared in default_config().
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  c = config_lib.default_config()
  c.model.preset = "smollm2_135m"
  c.init_from = "gguf:smollm2"
  c.data.update(tokenizer="smollm2", seq_len=512, global_batch_size=4)
  return c


def test_training_hook_serves_the_shipped_mixture(config):
  it = train.make_data_iterator(config, "train", 0, 1)
  batch = next(it)
  assert batch["tokens"].shape == (4, 512) and batch["cls_label"].shape == (4,)
  assert (batch["tokens"][:, 0] == 49152).all() and (batch["tokens"][:, 1] == 1).all()
  state = json.loads(json.dumps(it.get_state()))
  expected = next(it)
  resumed = train.make_data_iterator(config, "train", 0, 1)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["tokens"], expected["tokens"])
  halves = [next(train.make_data_iterator(config, "train", i, 2)) for i in (0, 1)]
  for key in batch:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batch[key])


def test_eval_split_is_one_ordered_pass(config):
  batches = list(sources.make_data_iterator(config, "validation", 0, 1))
  labels = np.concatenate([b["cls_label"] for b in batches])
  n = int((labels >= 0).sum())  # mixture v2's 429 records, less the few whose prompt exceeds seq_len 512
  assert 424 <= n <= 429 and len(batches) == -(-n // 4)
  assert (labels[:n] >= 0).all() and (labels[n:] == -1).all()


def test_tokenizer_must_fit_the_model(config):
  config.model.preset = "llama2_7b"
  with pytest.raises(ValueError, match="does not fit the model"):
    sources.make_data_iterator(config, "train", 0, 1)
  config.data.tokenizer = ""
  with pytest.raises(ValueError, match="config.data.tokenizer"):
    sources.make_data_iterator(config, "train", 0, 1)


def test_training_hook_takes_the_tokenizer_from_init_from(config):
  # data.tokenizer empty: train's hook resolves it from the checkpoint the run starts from.
  config.data.tokenizer = ""
  assert train.with_tokenizer(config).data.tokenizer == "smollm2"
  assert config.data.tokenizer == ""  # the caller's config is left as it was
  config.init_from = ""
  with pytest.raises(ValueError, match="config.data.tokenizer"):
    train.make_data_iterator(config, "train", 0, 1)


def test_pretraining_source_reads_user_files(config, tmp_path):
  docs = tmp_path / "wiki.jsonl"
  docs.write_text("".join(json.dumps({"text": f"Article {i}. " * 30, "label": i % 2}) + "\n" for i in range(200)))
  config.train.mode = "pretrain"
  config.data.source = "wiki_pretrain"
  config.data.files = (str(docs),)
  batch = next(sources.make_data_iterator(config, "train", 0, 1))
  assert set(batch["cls_label"].tolist()) <= {0, 1}
  assert (batch["loss_mask"][:, :2] == 0).all() and batch["loss_mask"][:, 2:].any()
  config.data.files = ()
  with pytest.raises(ValueError, match="needs config.data.files"):
    sources.make_data_iterator(config, "train", 0, 1)
