"""A tiny Llama-3-style tokenizer built offline: byte-level BPE trained on a few sentences, the
Llama-3 split regex, header / end-of-turn special tokens after the base vocabulary, a BOS
post-processor and a Jinja chat template, written as tokenizer.json + tokenizer_config.json."""

import json
import pathlib

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

# The Llama-3 (tiktoken cl100k-style) pre-tokenizer pattern: contractions, letter runs with one
# leading non-letter, digit groups of at most three, punctuation runs, newlines, spaces.
LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = (
  "<|begin_of_text|>",
  "<|end_of_text|>",
  "<|reserved_special_token_0|>",
  "<|reserved_special_token_1|>",
  "<|start_header_id|>",
  "<|end_header_id|>",
  "<|reserved_special_token_2|>",
  "<|reserved_special_token_3|>",
  "<|eot_id|>",
)
# One user turn (content trimmed, as the Llama-3 template does) and an optional system turn.
CHAT_TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
  "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
  "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CORPUS = (
  "How do I bake bread at home? Mix flour, water, salt and yeast; knead it for ten minutes.",
  "The quick brown fox jumps over the lazy dog 1234567890 times.",
  "Task: Check if there is unsafe content in 'Agent' messages in conversations according our safety policy.",
  "User: Agent: safe unsafe categories conversation assessment violated list comma-separated line.",
  "You are a classifier for red teaming large language models. Given a generation, answer yes or no.",
  "Behavior generation rules instances harmful undesirable caveats warnings code English.",
  "Violent Crimes, Non-Violent Crimes, Sex-Related Crimes, Defamation, Privacy, Hate, Elections.",
  "café naïve 日本語 中文 😀 emoji\n\n  indented\tand tabs",
)


def build(directory, chat_template: str = CHAT_TEMPLATE, vocab_size: int = 600) -> pathlib.Path:
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tok = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(list(CORPUS) * 4, trainer)
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIALS])
  bos = tok.token_to_id("<|begin_of_text|>")
  tok.post_processor = processors.Sequence(
    [
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
      ),
    ]
  )
  tok.save(str(directory / "tokenizer.json"))
  config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|eot_id|>",
    "clean_up_tokenization_spaces": False,
    "chat_template": chat_template,
    "model_max_length": 131072,
  }
  (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
  return directory
