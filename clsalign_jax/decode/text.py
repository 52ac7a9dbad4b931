"""Text in, text out: chat-template encoding, the refusal prefix and readable per-row results.

The refusal prefix is tokenised once, as standalone text (`Tokenizer.encode`), and those ids are
teacher-forced wherever it is inserted, so its tokenisation is fixed (docs/method.md decision 10).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from clsalign_jax.data.templates import ChatTemplate, encode_prompt
from clsalign_jax.data.tokenizer import Tokenizer
from clsalign_jax.decode.config import DecodeConfig
from clsalign_jax.decode.loop import RowResult, generate_ids
from clsalign_jax.decode.sampling import SamplingParams
from clsalign_jax.model import ModelConfig


class TextResult(NamedTuple):
  query: str
  response: str  # the attacker prefill (if any) and everything after it, special tokens skipped
  row: RowResult
  insert_char: int  # offset in `response` where the refusal prefix starts; -1 if none


def refusal_ids(tokenizer: Tokenizer, dcfg: DecodeConfig) -> list[int]:
  ids = tokenizer.encode(dcfg.refusal_text)
  if not ids:
    raise ValueError("the refusal prefix encodes to no tokens")
  return ids


def generate_text(
  cfg: ModelConfig,
  params,
  tokenizer: Tokenizer,
  template: ChatTemplate,
  queries: Sequence[str],
  dcfg: DecodeConfig = DecodeConfig(),
  sampling: SamplingParams | None = None,
  prefill: str = "",
  stop_at_eos: bool = True,
) -> list[TextResult]:
  """Decode one batch of queries. `prefill` is response text forced before generation (an
  attacker prefill such as " Sure, here is"). Rows stop at the template's end token."""
  if tokenizer.cls_id != cfg.cls_id:
    raise ValueError(f"tokenizer [CLS] id {tokenizer.cls_id} != model cls_id {cfg.cls_id}")
  encodings = [encode_prompt(tokenizer, template, q, prefill) for q in queries]
  prompts = [e.tokens[: e.prefill_span[0]].tolist() for e in encodings]
  prefills = [e.tokens[e.prefill_span[0] :].tolist() for e in encodings]
  rows = generate_ids(
    cfg,
    params,
    prompts,
    [e.query_span for e in encodings],
    refusal_ids(tokenizer, dcfg),
    dcfg,
    sampling,
    prefills,
    template.end.id(tokenizer) if stop_at_eos else None,
  )
  results = []
  for query, row in zip(queries, rows):
    text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    insert_char = len(text(row.response_ids[: row.insert_index])) if row.insert_index >= 0 else -1
    results.append(TextResult(query, text(row.response_ids), row, insert_char))
  return results
