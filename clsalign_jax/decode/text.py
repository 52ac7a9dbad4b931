"""Text in, text out: the one path from queries to decoded responses.

`Decoder` holds a loaded model with its tokenizer, chat template, decode settings and placement
(one device, or a mesh through `sharding.Layout`); `generate` CLI, the evaluation harness, judges,
attacks and serving all decode through it. Rows are grouped by padded length and run in
fixed-size batches (short ones filled with copies of their first row, the size rounded up to the
layout's row shards), so each length bucket compiles once.

The refusal prefix is tokenised once, as standalone text (`Tokenizer.encode`), and those ids are
teacher-forced wherever it is inserted, so its tokenisation is fixed (docs/method.md decision 10).

On several processes (`jax.distributed`), every process passes the same rows: each places and
decodes only the rows its devices hold, and the results are gathered so every process returns
all of them (the caller decides which process writes files).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from clsalign_jax.data.templates import ChatTemplate, encode_prompt
from clsalign_jax.data.tokenizer import Tokenizer
from clsalign_jax.decode.config import DecodeConfig
from clsalign_jax.decode.loop import DecodeInputs, RowResult, bucket, decode, pack_inputs, row_results
from clsalign_jax.decode.sampling import Sampling
from clsalign_jax.model import ModelConfig, abstract_params, to_layout
from clsalign_jax.sharding import Layout


class Encoded(NamedTuple):
  """One prompt row: `prompt` = [CLS, BOS, ...] ids, the query's half-open token span, and
  attacker-prefilled response ids (fed as response tokens, not generated)."""

  prompt: tuple[int, ...]
  query_span: tuple[int, int]
  prefill: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Generation:
  """One generated response. Indices are in continuation coordinates (0 = first token after
  any attacker prefill); -1 means "did not happen"."""

  response: str  # the model's continuation, special tokens dropped
  response_ids: list[int]
  prompt_tokens: int
  p_initial: float  # prompt-time p(malicious)
  initial_malicious: bool
  refusal_inserted: bool
  insert_index: int
  insert_char: int  # offset in `response` where the refusal prefix starts; -1 if none
  trigger_index: int
  false_alarms: int
  cls_trace: list[float]  # p(malicious) at each re-classification
  row: RowResult = dataclasses.field(repr=False, compare=False)  # the loop's row (prefill included)


def refusal_ids(tokenizer: Tokenizer, dcfg: DecodeConfig) -> list[int]:
  ids = tokenizer.encode(dcfg.refusal_text)
  if not ids:
    raise ValueError("the refusal prefix encodes to no tokens")
  return ids


def gather_rows(tree):
  """Global arrays → host numpy; rows held by other processes are fetched (process_allgather)."""
  if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


class Decoder:
  """A loaded model ready to decode text."""

  def __init__(
    self,
    name: str,
    cfg: ModelConfig,
    params: dict,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    dcfg: DecodeConfig = DecodeConfig(),
    batch_size: int = 8,
    layout: Layout | None = None,
  ):
    if cfg.vocab_size != tokenizer.vocab_size:
      raise ValueError(
        f"{name}: model vocabulary {cfg.vocab_size} != tokenizer vocabulary "
        f"{tokenizer.vocab_size} (the CLS id must be one past both)"
      )
    if tokenizer.cls_id != cfg.cls_id:
      raise ValueError(f"{name}: tokenizer [CLS] id {tokenizer.cls_id} != model cls_id {cfg.cls_id}")
    self.name, self.tokenizer, self.template, self.dcfg = name, tokenizer, template, dcfg
    self.layout = layout
    # Rows split evenly over the layout's row shards: the batch is rounded up to them.
    self.batch_size = layout.pad_rows(batch_size) if layout else batch_size
    # Decoding runs the plain per-layer layout: no remat, no scan bookkeeping at decode time.
    self.cfg = cfg.replace(scan_layers=False, remat_policy="none")
    params = to_layout(params, self.cfg)
    if layout is None:
      # Onto the default device explicitly: a training run's params are restored onto the CPU, and
      # a bare device_put would leave such committed arrays there (decoding would run on the CPU).
      self.params = jax.device_put(params, jax.devices()[0])
    else:
      self.params = layout.place(params, layout.params(abstract_params(self.cfg)))
    self.eos_id = template.end.id(tokenizer)

  # ----- rows ---------------------------------------------------------------------------------

  def encode(self, query: str, prefill: str = "", raw: bool = False, raw_prefix: str = "") -> Encoded:
    """The row for a user query. `raw` feeds `raw_prefix + query` without the chat template
    (Huang et al.'s setting); the CLS then reads the query text itself."""
    tok = self.tokenizer
    if not raw:
      enc = encode_prompt(tok, self.template, query, prefill)
      p0, p1 = enc.prefill_span
      return Encoded(tuple(enc.tokens[:p0].tolist()), tuple(enc.query_span), tuple(enc.tokens[p0:p1].tolist()))
    head = [tok.cls_id, tok.bos_id] + (tok.encode(raw_prefix) if raw_prefix else [])
    body = tok.encode_continuation(query) if raw_prefix else tok.encode(query)
    prompt = head + body
    fill = tok.encode_continuation(prefill) if prefill else []
    return Encoded(tuple(prompt), (len(head), len(prompt)), tuple(fill))

  # ----- generation ---------------------------------------------------------------------------

  def generate(
    self,
    rows: Sequence[Encoded],
    sampling: Sequence[Sampling],
    dcfg: DecodeConfig | None = None,
    on_batch: Callable[[int], None] | None = None,
  ) -> list[Generation]:
    """Generate for every row, with its own sampling setting."""
    dcfg = dcfg or self.dcfg
    refusal_R = jnp.asarray(refusal_ids(self.tokenizer, dcfg), jnp.int32)
    results: list[Generation | None] = [None] * len(rows)
    for idx in self._batches(rows):
      fill = self.batch_size - len(idx)
      batch = [rows[i] for i in idx] + [rows[idx[0]]] * fill
      samp = [sampling[i] for i in idx] + [sampling[idx[0]]] * fill
      for i, res in zip(idx, self._decode_batch(batch, Sampling.batch(samp), refusal_R, dcfg)):
        results[i] = self._generation(rows[i], res)
      if on_batch:
        on_batch(len(idx))
    return results

  def generate_text(
    self,
    queries: Sequence[str],
    prefill: str = "",
    sampling: Sampling | Sequence[Sampling] = Sampling(),
    dcfg: DecodeConfig | None = None,
  ) -> list[Generation]:
    """`generate` for chat queries, each with the same attacker prefill; one Sampling for all
    rows (row i then samples with seed + i) or one per row."""
    if isinstance(sampling, Sampling):
      sampling = [dataclasses.replace(sampling, seed=sampling.seed + i) for i in range(len(queries))]
    return self.generate([self.encode(q, prefill) for q in queries], sampling, dcfg)

  def _decode_batch(self, batch: list[Encoded], sampling: Sampling, refusal_R, dcfg: DecodeConfig) -> list[RowResult]:
    inputs = pack_inputs([r.prompt for r in batch], [r.query_span for r in batch], [r.prefill for r in batch])
    if self.layout is not None:
      rows = lambda x: self.layout.rows(np.ndim(x))
      inputs = self.layout.place(inputs, DecodeInputs(*(rows(x) for x in inputs)))
      sampling = self.layout.place(sampling, jax.tree.map(rows, sampling))
      refusal_R = self.layout.place(refusal_R, self.layout.replicated)
    out = decode(
      self.params, inputs, refusal_R, sampling, cfg=self.cfg, dcfg=dcfg, eos_id=self.eos_id, layout=self.layout
    )
    return row_results(gather_rows(out), gather_rows(inputs))

  def _generation(self, row: Encoded, res: RowResult) -> Generation:
    ids = res.response_ids[res.prefill_len :]
    shift = lambda i: i - res.prefill_len if i >= 0 else -1
    text = lambda xs: self.tokenizer.decode([i for i in xs if i != self.eos_id], skip_special_tokens=True)
    insert = shift(res.insert_index)
    return Generation(
      response=text(ids),
      response_ids=ids,
      prompt_tokens=len(row.prompt),
      p_initial=res.p_initial,
      initial_malicious=res.initial_malicious,
      refusal_inserted=res.insert_index >= 0,
      insert_index=insert,
      insert_char=len(text(ids[:insert])) if insert >= 0 else -1,
      trigger_index=shift(res.trigger_index),
      false_alarms=res.false_alarms,
      cls_trace=[round(p, 4) for _, _, p in res.trace],
      row=res,
    )

  def _batches(self, rows: Sequence[Encoded]) -> list[list[int]]:
    by_bucket: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
      by_bucket.setdefault(bucket(len(r.prompt) + len(r.prefill)), []).append(i)
    B = self.batch_size
    return [ids[k : k + B] for _, ids in sorted(by_bucket.items()) for k in range(0, len(ids), B)]
