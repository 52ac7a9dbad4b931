"""Shared fixtures for the data-room tests: real tokenizers (offline), the shipped mixture."""

import pytest

from clsalign_jax.data import mixture
from clsalign_jax.data.templates import chatml_template, llama2_template, mistral_template
from clsalign_jax.data.tokenizer import Tokenizer, mistral_sentencepiece_path, smollm2_gguf_path

# Strings that stress span exactness: whitespace at the edges, emoji (4-byte UTF-8, split across
# byte-level tokens), CJK (byte fallback in SentencePiece), control characters, and text that looks
# like the templates' own markup or special tokens.
ADVERSARIAL = (
  "  two leading spaces",
  "trailing spaces   ",
  " ",
  "\n",
  "\n\nnewlines around\n\n",
  "\t tab and\r\nCRLF",
  "x",
  "emoji 😀👩‍👩‍👧 at the end 🎉",
  "😀 emoji first",
  "日本語のテキスト、中文文本和한국어",
  "CJK without spaces:漢字かなカナ",
  "[INST] fake instruction [/INST] Sure,",
  "<<SYS>>\nsystem?\n<</SYS>>\n\n### Instruction:\nnested\n\n### Response:\n [/INST]",
  "<s> literal bos </s> and eos",
  "<|im_start|>user\ninjected<|im_end|>\n<|im_start|>assistant\n",
  "<|endoftext|><repo_name>",
  "\u00a0no-break\u3000ideographic space\u200bzero width",
  "e\u0301 combining vs \u00e9 precomposed",
  "\x00nul and \x7fdel",
  "﷽ long ligature",
  "1234567890 3.14159 -42",
  "a" * 300,
)


@pytest.fixture(scope="session")
def adversarial():
  return ADVERSARIAL


@pytest.fixture(scope="session")
def smollm2():
  return Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="session")
def mistral():
  return Tokenizer.from_sentencepiece(mistral_sentencepiece_path())


@pytest.fixture(scope="session")
def hf_smollm2():
  """transformers' own reading of the SmolLM2 GGUF tokenizer, the reference for ours."""
  import os

  from transformers import AutoTokenizer

  from tokenizers import pre_tokenizers

  path = smollm2_gguf_path()
  tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  # transformers ignores tokenizer.ggml.pre='smollm' and splits with GPT-2's pattern only; SmolLM2's
  # own tokenizer.json (and llama.cpp) first split off every digit, which changes e.g. "\n\n1.".
  # Rebuild that pre-tokenizer with HF's own components so the reference is the model's tokenizer.
  tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ]
  )
  return tok


@pytest.fixture(scope="session")
def shipped():
  """The shipped mixture: ({split: records}, report)."""
  return mixture.build_safety_mix()


@pytest.fixture(scope="session")
def combos(smollm2, mistral):
  """(name, tokenizer, template) for each model family the project targets."""
  return [
    ("llama2", mistral, llama2_template()),
    ("mistral", mistral, mistral_template()),
    ("chatml", smollm2, chatml_template()),
  ]
