"""Chat templates, and their tokenisation with exact query / response token spans.

A template is a sequence of parts: literal text, special tokens (inserted as ids, never parsed from
text) and one QUERY slot. Every encoding is `[CLS] + prompt tokens (+ response tokens + end token)`.

Span policy (what "exact" means here):
* The prompt is tokenised per text run (text between special tokens) in one pass, as the model's own
  tokenizer would. If the run's token boundaries fall on the query's first and last character, the
  query span is those tokens ("natural").
* SentencePiece glues a word's leading space into the word's token, so a template that puts a space
  before the query ("[INST] {query}") yields "▁How" for the query "How...". That natural tokenisation
  is kept and the span starts at the token carrying the separator (`glued_space=True`); its tokens
  decode to " " + query, and `query_text` strips that one separator.
* Otherwise a merge straddles a query edge (e.g. byte-level BPE joining the template's "\n" with a
  query that starts with newlines). Then the run is tokenised in three pieces, before / query / after,
  the later two as continuations, which forces token boundaries at the query edges
  (`forced_boundary=True`). Training and inference both go through `encode_prompt`, so the model
  sees the same ids in both.
* The response is always tokenised as a continuation of the prompt (the boundary is forced), which is
  what happens at generation time: the model produces response tokens after the prompt's tokens.
In every case `query_text(tokenizer, encoding) == query`; a tokenizer that cannot represent the
query losslessly (e.g. U+2581 with SentencePiece, which reads it as a space) raises `SpanError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from clsalign_jax import families
from clsalign_jax.data.tokenizer import Tokenizer

# The paper's Llama-2 wrapper around the Alpaca system line (docs/method.md §4.3).
LLAMA2_SYSTEM_PROMPT = (
  "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
# What SmolLM2's GGUF chat template inserts when the conversation has no system turn.
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


# What Qwen2.5-Instruct's chat template inserts when the conversation has no system turn.
QWEN25_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# What Llama-3.1's chat template puts at the top of its system turn (no tools, default date).
LLAMA31_DATE_PREAMBLE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"


class SpanError(ValueError):
  """The query cannot be tokenised so that its tokens decode back to exactly the query."""


@dataclasses.dataclass(frozen=True)
class Special:
  """A special token: "bos" / "eos" mean the tokenizer's own, anything else is a token string."""

  token: str

  def id(self, tokenizer: Tokenizer) -> int:
    if self.token == "bos":
      return tokenizer.bos_id
    if self.token == "eos":
      return tokenizer.eos_id
    i = tokenizer.token_to_id(self.token)
    if i is None:
      raise ValueError(f"template token {self.token!r} is not in {tokenizer.name}")
    return i

  def text(self, tokenizer: Tokenizer | None) -> str:
    if tokenizer is None:
      return self.token if self.token not in ("bos", "eos") else f"<{self.token}>"
    return tokenizer.id_to_token(self.id(tokenizer))


class _QuerySlot:
  def __repr__(self) -> str:
    return "QUERY"


QUERY = _QuerySlot()
BOS, EOS = Special("bos"), Special("eos")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A single-turn template: `prompt` parts, then prefix + response + suffix, then `end`."""

  name: str
  prompt: tuple
  response_prefix: str = ""
  response_suffix: str = ""
  end: Special = EOS

  def __post_init__(self):
    slots = [i for i, p in enumerate(self.prompt) if p is QUERY]
    if len(slots) != 1:
      raise ValueError(f"template {self.name!r} needs exactly one QUERY slot")
    i = slots[0]
    # A query at the very start of a text run would pick up the SentencePiece dummy-prefix
    # space, so its tokens could not decode to the query alone.
    if i == 0 or not isinstance(self.prompt[i - 1], str) or not self.prompt[i - 1]:
      raise ValueError(f"template {self.name!r}: the query must follow literal text")


def llama2_template(system_prompt: str | None = LLAMA2_SYSTEM_PROMPT) -> ChatTemplate:
  """The paper's template: Llama-2 `[INST]` + `<<SYS>>` block around an Alpaca instruction."""
  sys_block = f"<<SYS>>\n{system_prompt}\n<</SYS>>\n\n" if system_prompt is not None else ""
  return ChatTemplate(
    name="llama2",
    prompt=(BOS, f"[INST] {sys_block}### Instruction:\n", QUERY, "\n\n### Response:\n [/INST]"),
    # The reference joins prompt, " ", response, " " and appends EOS.
    response_prefix=" ",
    response_suffix=" ",
  )


def mistral_template() -> ChatTemplate:
  """Mistral-7B-Instruct `[INST] {query} [/INST]`; the answer follows after a space."""
  return ChatTemplate(
    name="mistral",
    prompt=(BOS, "[INST] ", QUERY, " [/INST]"),
    response_prefix=" ",
  )


def chatml_template(system_prompt: str | None = SMOLLM2_SYSTEM_PROMPT) -> ChatTemplate:
  """ChatML as SmolLM2's GGUF chat template renders one user turn with a generation prompt.

  That template adds its default system turn when none is given; `system_prompt=None` omits it.
  There is no separate BOS: the first `<|im_start|>` is SmolLM2's BOS token.
  """
  start, end = Special("<|im_start|>"), Special("<|im_end|>")
  system = (start, f"system\n{system_prompt}", end, "\n") if system_prompt is not None else ()
  return ChatTemplate(
    name="chatml",
    prompt=(*system, start, "user\n", QUERY, end, "\n", start, "assistant\n"),
    end=end,
  )


def qwen2_5_template(system_prompt: str | None = QWEN25_SYSTEM_PROMPT) -> ChatTemplate:
  """ChatML as Qwen2.5-Instruct's chat template renders one user turn with a generation prompt:
  its default system turn first (`system_prompt=None` omits it), no BOS, turns end with <|im_end|>."""
  return dataclasses.replace(chatml_template(system_prompt), name="qwen2_5")


def llama3_template(system_prompt: str | None = None) -> ChatTemplate:
  """Llama-3.x instruct: header-delimited turns, each closed by `<|eot_id|>`, after BOS.

  One user turn with a generation prompt, as the Llama-3 chat template renders it (the template
  trims the message: queries with surrounding whitespace render differently there). With
  `system_prompt` a system turn comes first; Llama-3.1's template always writes one, starting
  with its knowledge-cutoff lines (`LLAMA31_DATE_PREAMBLE`), pass them here to match it.
  """
  start, end_header, eot = Special("<|start_header_id|>"), Special("<|end_header_id|>"), Special("<|eot_id|>")
  system = (start, "system", end_header, f"\n\n{system_prompt}", eot) if system_prompt is not None else ()
  return ChatTemplate(
    name="llama3",
    prompt=(BOS, *system, start, "user", end_header, "\n\n", QUERY, eot, start, "assistant", end_header, "\n\n"),
    end=eot,
  )


def get_template(name: str, **kwargs) -> ChatTemplate:
  """`llama2` (the paper's), `mistral`, `chatml` (alias `smollm2`), `qwen2_5` (ChatML with Qwen's
  system prompt) or `llama3`."""
  factories = {
    "llama2": llama2_template,
    "mistral": mistral_template,
    "chatml": chatml_template,
    "smollm2": chatml_template,
    "qwen2_5": qwen2_5_template,
    "llama3": llama3_template,
  }
  if name not in factories:
    raise ValueError(f"unknown chat template {name!r}; choose from {sorted(factories)}")
  return factories[name](**kwargs)


# ----- rendering to text --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rendered:
  text: str
  query_span: tuple[int, int]  # character offsets of the query in `text`
  response_span: tuple[int, int]  # character offsets of the response text (empty if none)


def render(
  template: ChatTemplate,
  query: str,
  response: str | None = None,
  *,
  tokenizer: Tokenizer | None = None,
) -> Rendered:
  """The text a template produces; with `response=None`, the generation prompt only."""
  out, query_span = [], None
  for part in template.prompt:
    if part is QUERY:
      start = sum(map(len, out))
      out.append(query)
      query_span = (start, start + len(query))
    elif isinstance(part, Special):
      out.append(part.text(tokenizer))
    else:
      out.append(part)
  text = "".join(out)
  if response is None:
    return Rendered(text, query_span, (len(text), len(text)))
  start = len(text) + len(template.response_prefix)
  text += template.response_prefix + response + template.response_suffix
  text += template.end.text(tokenizer)
  return Rendered(text, query_span, (start, start + len(response)))


# ----- tokenisation -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptEncoding:
  """An inference prompt: `tokens` = [CLS, BOS, ...template and query...] (int32)."""

  tokens: np.ndarray
  query_span: tuple[int, int]  # half-open token range of the query text
  prefill_span: tuple[int, int]  # tokens of a prefilled response start (empty if none)
  forced_boundary: bool
  glued_space: bool  # the first query token also carries the template's separator space


@dataclasses.dataclass(frozen=True)
class EncodedExample:
  """One training sequence starting with [CLS]; all spans are half-open token ranges."""

  tokens: np.ndarray  # int32 [L]
  query_span: tuple[int, int]
  response_span: tuple[int, int]  # response tokens, through the end token (EOS)
  loss_span: tuple[int, int]  # positions whose token is an LM target
  label: int  # 1 = malicious
  forced_boundary: bool = False
  glued_space: bool = False

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def loss_mask(self) -> np.ndarray:
    mask = np.zeros(len(self.tokens), np.int32)
    mask[self.loss_span[0] : self.loss_span[1]] = 1
    return mask


def encode_prompt(tokenizer: Tokenizer, template: ChatTemplate, query: str, prefill: str = "") -> PromptEncoding:
  """[CLS] + the template's generation prompt, and optionally a prefilled response start.

  `prefill` is response text placed after the prompt (e.g. an attacker's " Sure, here is"); it is
  tokenised as the start of the response, including the template's response prefix.
  """
  if not query:
    raise SpanError("empty query")
  ids = [tokenizer.cls_id]
  query_span, forced, glued = None, False, False
  run, run_query = [], None  # text pieces of the current run; query char span inside it

  def flush():
    nonlocal query_span, forced, glued
    text = "".join(run)
    if run_query is None:
      ids.extend(tokenizer.encode(text))
      return
    run_ids, (i, j), forced, glued = _encode_run_with_query(tokenizer, text, *run_query)
    query_span = (len(ids) + i, len(ids) + j)
    ids.extend(run_ids)

  for part in template.prompt:
    if isinstance(part, Special):
      if run:
        flush()
        run, run_query = [], None
      ids.append(part.id(tokenizer))
    elif part is QUERY:
      start = sum(map(len, run))
      run_query = (start, start + len(query))
      run.append(query)
    else:
      run.append(part)
  if run:
    flush()
  prefill_start = len(ids)
  if prefill:
    ids.extend(tokenizer.encode_continuation(template.response_prefix + prefill))
  return PromptEncoding(
    tokens=np.asarray(ids, np.int32),
    query_span=query_span,
    prefill_span=(prefill_start, len(ids)),
    forced_boundary=forced,
    glued_space=glued,
  )


def encode_example(
  tokenizer: Tokenizer,
  template: ChatTemplate,
  query: str,
  response: str,
  label: int,
) -> EncodedExample:
  """[CLS] + prompt + response + end token; the loss covers the response through the end token."""
  prompt = encode_prompt(tokenizer, template, query)
  response_ids = tokenizer.encode_continuation(template.response_prefix + response + template.response_suffix)
  response_ids.append(template.end.id(tokenizer))
  tokens = np.concatenate([prompt.tokens, np.asarray(response_ids, np.int32)])
  span = (len(prompt.tokens), len(tokens))
  return EncodedExample(
    tokens=tokens,
    query_span=prompt.query_span,
    response_span=span,
    loss_span=span,
    label=int(label),
    forced_boundary=prompt.forced_boundary,
    glued_space=prompt.glued_space,
  )


def encode_document(tokenizer: Tokenizer, text: str, label: int, max_length: int) -> list[EncodedExample]:
  """A pretraining document as [CLS, BOS, text..., EOS], cut into chunks of `max_length`.

  Each chunk repeats [CLS, BOS] and the document's label; only the last chunk ends with EOS.
  `query_span` is the chunk's text tokens (what the CLS reads), `response_span` is empty, and the
  loss covers every text token. Documents get no template.
  """
  if max_length < 3:
    raise ValueError("max_length must leave room for [CLS], BOS and one token")
  body = tokenizer.encode(text) + [tokenizer.eos_id]
  width = max_length - 2
  out = []
  for start in range(0, len(body), width):
    chunk = body[start : start + width]
    tokens = np.asarray([tokenizer.cls_id, tokenizer.bos_id, *chunk], np.int32)
    n = len(tokens)
    out.append(
      EncodedExample(
        tokens=tokens,
        query_span=(2, n),
        response_span=(n, n),
        loss_span=(2, n),
        label=int(label),
      )
    )
  return out


def query_text(tokenizer: Tokenizer, encoding: PromptEncoding | EncodedExample) -> str:
  """The query as decoded from its token span: equals the query text, always."""
  q0, q1 = encoding.query_span
  text = tokenizer.decode_fragment(encoding.tokens[q0:q1].tolist())
  return text[1:] if encoding.glued_space else text


def _encode_run_with_query(
  tokenizer: Tokenizer, text: str, q0: int, q1: int
) -> tuple[list[int], tuple[int, int], bool, bool]:
  """Ids of one text run, the query's token range, and (forced_boundary, glued_space)."""
  query = text[q0:q1]
  ids, offsets = tokenizer.encode_with_offsets(text)
  j = _boundary(offsets, q1)
  tail_ok = j is not None and tokenizer.decode_fragment(ids[j:]) == text[q1:]
  if tail_ok:
    i = _boundary(offsets, q0)
    if i is not None and tokenizer.decode_fragment(ids[i:j]) == query and tokenizer.decode(ids[:i]) == text[:q0]:
      return ids, (i, j), False, False
    # SentencePiece writes a word's leading space into the word's token, so the template's
    # separator before the query ("[INST] How") lives in the query's first token ("▁How").
    # Keeping that natural tokenisation, the span starts one character early at that space.
    i = _boundary(offsets, q0 - 1) if text[q0 - 1] == " " else None
    if (
      i is not None
      and tokenizer.decode_fragment(ids[i:j]) == " " + query
      and tokenizer.decode(ids[:i]) == text[: q0 - 1]
    ):
      return ids, (i, j), False, True
  head = tokenizer.encode(text[:q0])
  middle = tokenizer.encode_continuation(query)
  tail = tokenizer.encode_continuation(text[q1:])
  if tokenizer.decode_fragment(middle) != query:
    bad = _first_lossy_char(tokenizer, query)
    raise SpanError(
      f"{tokenizer.name} cannot encode this query losslessly (first lossy character "
      f"{bad!r}); query starts {query[:60]!r}"
    )
  return head + middle + tail, (len(head), len(head) + len(middle)), True, False


def _boundary(offsets: Sequence[tuple[int, int]], c: int) -> int | None:
  """Index i with every token before i ending at or before c and every token from i starting at
  or after c; None if a token straddles c. Zero-width tokens at c fall after the boundary."""
  i = sum(1 for s, _ in offsets if s < c)
  if any(e > c for _, e in offsets[:i]) or any(s < c for s, _ in offsets[i:]):
    return None
  return i


def _first_lossy_char(tokenizer: Tokenizer, text: str) -> str:
  for ch in text:
    if tokenizer.decode_fragment(tokenizer.encode_continuation(ch)) != ch:
      return ch
  return text


def training_default(tokenizer: Tokenizer, family: families.Family | str | None = None) -> str:
  """The template a run trains with when `data.template` is empty: the model family's own when the
  family has one format (`Family.template_from_vocabulary` False: Qwen2's `qwen2_5`), else ChatML
  for a vocabulary that has `<|im_start|>` (SmolLM2), Llama-2's [INST] format otherwise (the paper's,
  for Llama-2 and Mistral alike). `family`: a `families.Family` or its name (None: the vocabulary decides)."""
  if isinstance(family, str):
    family = families.get(family)
  if family is not None and not family.template_from_vocabulary:
    return family.chat_template
  return "chatml" if tokenizer.token_to_id("<|im_start|>") is not None else "llama2"
