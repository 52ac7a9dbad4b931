import json
import os

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


def test_qwen2_5_run_fits_the_padded_vocabulary_and_trains(tmp_path, monkeypatch):
  """configs/qwen2_5_0_5b_sft.py on a tiny Qwen2.5-like HF directory (a vocabulary padded past
  its tokenizer, no BOS in the tokenizer files): rows start [CLS, <|im_start|>system...] with [CLS]
  one past the padded rows, the family's template is the default, and two steps train."""
  import qwen2_tokenizer
  from train_utils import load_config, read_metrics

  from clsalign_jax import artifacts
  from clsalign_jax import model as model_lib

  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  directory, cfg = qwen2_tokenizer.build_model(tmp_path / "qwen")
  c = load_config("qwen2_5_0_5b_sft")
  c.init_from = f"hf:{directory}"
  # A small user file: encoding the whole shipped mixture with a 400-token BPE costs seconds.
  sft = tmp_path / "sft.jsonl"
  pairs = (
    ("How do I bake bread?", "Mix flour, water and yeast."),
    ("How do I pick a lock?", "I cannot help with that."),
  )
  records = [{"prompt": f"{pairs[i % 2][0]} ({i})", "response": pairs[i % 2][1], "label": i % 2} for i in range(40)]
  sft.write_text("".join(json.dumps(r) + "\n" for r in records))
  c.data.update(template="", seq_len=160, global_batch_size=4, files=(str(sft),))
  keep = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len")
  keep += ("bos_id", "eos_id")
  c.model.update(**{k: getattr(cfg, k) for k in keep}, dtype="float32", param_dtype="float32")
  c.model.update(scan_layers=False, remat_policy="none")
  c.train.num_steps = 2
  c.checkpoint.update(every_steps=2, async_save=False)
  c.eval.update(every_steps=0, num_batches=1)
  c.metrics.progress_bar = False

  inputs = train.resolve_text_inputs(c, model_lib.config_from_fields(c.model), train.InitFrom(c.init_from))
  tok = inputs.tokenizer
  assert inputs.template == "qwen2_5" and inputs.tokenizer_spec == os.path.abspath(directory)
  assert (tok.cls_id, tok.bos_id, tok.eos_id) == (cfg.vocab_size, cfg.bos_id, cfg.eos_id)
  # The tokenizer on its own, away from the model's config.json: the data room fits it all the same.
  alone = tmp_path / "tokenizer"
  alone.mkdir()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (alone / name).write_bytes((directory / name).read_bytes())
  fitted = sources.resolve_text_inputs(c, model_lib.config_from_fields(c.model), str(alone)).tokenizer
  assert (fitted.cls_id, fitted.bos_id, fitted.base_vocab_size) == (tok.cls_id, tok.bos_id, tok.base_vocab_size)
  batch = next(train.make_data_iterator(c, "train", 0, 1, inputs))
  real = batch["tokens"][:, 1:][batch["tokens"][:, 1:] != tok.pad_id]
  assert (batch["tokens"][:, 0] == cfg.vocab_size).all() and (real < tok.base_vocab_size).all()
  assert (batch["tokens"][:, 1] == tok.token_to_id("<|im_start|>")).all()  # Qwen's prompt has no BOS

  workdir = tmp_path / "run"
  train.train_and_evaluate(c, str(workdir))
  losses = [r["loss"] for r in read_metrics(workdir).values()]
  assert len(losses) == 2 and np.isfinite(losses).all()
  facts = json.loads((workdir / artifacts.RUN_FACTS).read_text())
  assert facts["template"] == "qwen2_5"
  loaded = artifacts.load(str(workdir))
  tok = loaded.tokenizer
  assert (tok.cls_id, tok.bos_id, loaded.template_name) == (cfg.vocab_size, cfg.bos_id, "qwen2_5")
