"""A tiny Qwen2.5-Instruct-style HF directory built offline: a byte-level BPE tokenizer with Qwen2's
split rule (single digits) and NFC normalizer, its special tokens after the base vocabulary
(<|endoftext|>, <|im_start|>, <|im_end|>, ...), a tokenizer_config.json that names no BOS (as
Qwen's does) and a ChatML chat template with Qwen2.5's default system turn; `build_model` adds a
Qwen2ForCausalLM config.json whose vocab_size pads past the tokenizer's tokens, and random weights."""

import json
import pathlib

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2's pre-tokenizer pattern: Llama-3's, except that digits split one by one.
QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# In Qwen2.5's order: <|endoftext|> first (its BOS and base-model EOS), then the chat markers.
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>")
SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's chat template without its tool-calling branch: a default system turn when the
# conversation has none, each turn as <|im_start|>role\ncontent<|im_end|>\n, no BOS.
CHAT_TEMPLATE = (
  "{%- if messages[0]['role'] == 'system' %}"
  "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
  "{%- else %}{{- '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
  "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
  "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
  "{%- endif %}{%- endfor %}"
  "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = (
  "How do I bake bread at home? Mix flour, water, salt and yeast; knead it for ten minutes.",
  "The quick brown fox jumps over the lazy dog 1234567890 times.",
  "You are Qwen, created by Alibaba Cloud. You are a helpful assistant. system user assistant",
  "I cannot help with that request. Sure, here is how to do it step by step.",
  "café naïve 日本語 中文 😀 emoji\n\n  indented\tand tabs",
)


def build(directory, vocab_size: int = 400) -> pathlib.Path:
  """tokenizer.json + tokenizer_config.json in `directory`; the tokenizer has about `vocab_size`
  base tokens plus SPECIALS."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tok = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(list(CORPUS) * 4, trainer)
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIALS])
  tok.save(str(directory / "tokenizer.json"))
  config = {
    "tokenizer_class": "Qwen2TokenizerFast",
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "clean_up_tokenization_spaces": False,
    "errors": "replace",
    "split_special_tokens": False,
    "chat_template": CHAT_TEMPLATE,
    "model_max_length": 131072,
  }
  (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
  return directory


def build_model(directory, pad_to: int = 64, seed: int = 0):
  """A Qwen2.5-Instruct-like HF directory: `build`'s tokenizer, a Qwen2ForCausalLM config.json
  whose vocab_size is the tokenizer's size rounded up to `pad_to` (plus `pad_to` when already
  round, so there always are padded rows), BOS <|endoftext|> and EOS <|im_end|>, and random tied
  weights; no CLS extras (a checkpoint from the hub has none). Returns (directory, ModelConfig)."""
  from clsalign_jax import artifacts
  from clsalign_jax import model as model_lib
  from clsalign_jax.interop import hf

  directory = build(directory)
  base = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
  n = base.get_vocab_size(with_added_tokens=True)
  cfg = model_lib.ModelConfig(
    vocab_size=(n // pad_to + 1) * pad_to,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=64,
    max_seq_len=512,
    rms_eps=1e-6,
    rope_theta=1000000.0,
    tie_embeddings=True,
    bos_id=base.token_to_id("<|endoftext|>"),
    eos_id=base.token_to_id("<|im_end|>"),
    family="qwen2",
    dtype="float32",
    param_dtype="float32",
    scan_layers=False,
    remat_policy="none",
  )
  hf.save_hf(str(directory), cfg, artifacts.random_params(cfg, seed))
  for extra in (hf.CLS_FILE, hf.CLS_META, "generation_config.json"):
    (directory / extra).unlink()
  return directory, cfg
