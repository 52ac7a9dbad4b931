"""CLS training on the views the decoder shows it (config.views; docs/method.md, "CLS views").

At decode time the CLS reads the query alone (Rule 1, the prompt-time verdict) and then, while the
answer grows, a window of the *model's own* response: the latest r2 tokens (Rule 2) or the r2 + r3
tokens around a flip (Rule 3), with or without the query (`rule2_include_query`). A view is one such
reading, labelled with the query's intent. Per example:

    0 query            the query alone
    1 query+reference  the query and a window of the reference response (a bank refusal for a
                       malicious query, the dataset's answer for a benign one)
    2 reference        that window alone (the paper's Rule 2)
    3 query+own        the query and a window of the base model's own response (data/completions.py:
                       its answer to a benign query; for a malicious one, its compliance, prefilled
                       where it would refuse)
    4 own              that window alone

A window ends at a uniformly drawn response token e (the step it is read at) and spans r2 tokens
(Rule 2) or r2 + r3 (Rule 3), cut at the response start. Draws are a pure function of (seed, step),
so a resumed run sees the same windows.

Row layout: one sequence holds the prompt and both responses as branches of it,

    slot 0         empty (the decode CLS slot; nothing reads it)
    slots 1..P-1   template + query                  positions 1..P-1   branch 0
    next la slots  reference response (≤ L tokens)    positions P..      branch 1
    next lb slots  own response (≤ L tokens)          positions P..      branch 2

so the prompt is encoded once and each response sees the prompt and itself (`masks.branch_mask`),
with the positions it has at decode time. The CLS rows are not in the sequence: training (train/step.py) runs the
tokens once into a KV cache and then the K view rows over it (`masks.view_rows_mask`), as a decode
step does. Arrays of a batch (B rows, T slots, K = 5 views):

    tokens, positions, branch  [B, T]     branch -1 = padding or the empty CLS slot
    query_span                 [B, 2]
    view_window                [B, K, 2]  half-open slot range of the response window ([0, 0]: none)
    view_query                 [B, K]     the view reads the query
    cls_label                  [B, K]     the example's label; -1 where the view does not exist (no
                                          own response for this prompt, or a filler row)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from clsalign_jax.data import pipeline
from clsalign_jax.data.records import DataError, read_completions  # noqa: F401 - completions files are read here too
from clsalign_jax.data.templates import ChatTemplate, encode_prompt
from clsalign_jax.data.tokenizer import Tokenizer

VIEWS = ("query", "query+reference", "reference", "query+own", "own")
K = len(VIEWS)
# view -> (response branch or 0 for none, reads the query)
_VIEW_SPEC = ((0, True), (1, True), (1, False), (2, True), (2, False))


@dataclasses.dataclass(frozen=True)
class ViewSettings:
  r2: int = 15  # Rule 2: the latest r2 response tokens
  r3: int = 10  # Rule 3: r3 more tokens after the flip
  response_tokens: int = 32  # L: each response is cut to this many tokens (windows end within it)
  rule3_share: float = 0.5  # share of windows drawn with Rule 3's length r2 + r3


@dataclasses.dataclass
class ViewCorpus:
  """Encoded examples, ragged arrays with offsets."""

  prompt: list[np.ndarray]  # [CLS, BOS, template + query ...] ids
  query_span: np.ndarray  # [n, 2]
  reference: list[np.ndarray]  # ≤ L ids
  own: list[np.ndarray]  # ≤ L ids; empty where the completions have no row for the prompt
  labels: np.ndarray  # [n] 0 benign / 1 malicious
  own_kind: list[str]  # completions' kind ("answer", "compliance", "refusal") or "" when missing
  prompts: list[str]

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def lengths(self) -> np.ndarray:
    return np.asarray([len(p) + len(a) + len(b) for p, a, b in zip(self.prompt, self.reference, self.own)])


def _response_ids(tokenizer: Tokenizer, template: ChatTemplate, query: str, text: str, limit: int) -> np.ndarray:
  """The response as decoding tokenises an attacker prefill, plus the end token if it fits in `limit`."""
  enc = encode_prompt(tokenizer, template, query, prefill=text)
  ids = enc.tokens[enc.prefill_span[0] :]
  if len(ids) < limit:
    ids = np.concatenate([ids, [template.end.id(tokenizer)]])
  return np.asarray(ids[:limit], np.int32)


def encode_views(
  records: Sequence,
  tokenizer: Tokenizer,
  template: ChatTemplate,
  completions: Mapping[str, Mapping],
  settings: ViewSettings = ViewSettings(),
  max_prompt_tokens: int = 512,
) -> ViewCorpus:
  """Records with prompt / response / label (dicts or a safety_mix split) and the completions map
  (prompt -> row of data/completions.py) -> a ViewCorpus. Prompts over `max_prompt_tokens` are
  dropped (as the SFT pipeline drops prompts longer than its rows)."""
  out = ViewCorpus([], [], [], [], [], [], [])
  spans = []
  L = settings.response_tokens
  for n in range(len(records)):
    rec = records[n]
    prompt, response = pipeline._field(rec, "prompt"), pipeline._field(rec, "response")
    label = int(pipeline._field(rec, "label"))
    if label not in (0, 1):
      raise DataError(f"record {n}: label {label!r}; expected 0 or 1")
    enc = encode_prompt(tokenizer, template, prompt)
    if len(enc.tokens) > max_prompt_tokens:
      continue
    row = completions.get(prompt)
    out.prompt.append(np.asarray(enc.tokens, np.int32))
    spans.append(tuple(enc.query_span))
    out.reference.append(_response_ids(tokenizer, template, prompt, response, L))
    if row is not None and row["response"].strip():
      out.own.append(_response_ids(tokenizer, template, prompt, row["response"], L))
      out.own_kind.append(row["kind"])
    else:
      out.own.append(np.zeros((0,), np.int32))
      out.own_kind.append("")
    out.labels.append(label)
    out.prompts.append(prompt)
  if not out.prompt:
    raise DataError("no examples to build views from")
  out.query_span = np.asarray(spans, np.int32)
  out.labels = np.asarray(out.labels, np.int32)
  return out


# Row lengths a batch is padded to: every new length compiles the step again (tens of seconds on a
# CPU), and most examples are short, so a handful of sizes with tight ones at the bottom.
ROW_LENGTHS = (128, 192, 256, 384, 512, 768)


def row_length(longest: int) -> int:
  for n in ROW_LENGTHS:
    if longest <= n:
      return n
  return -(-longest // 256) * 256


def draw_window(rng: np.random.Generator, start: int, n: int, settings: ViewSettings) -> tuple[int, int]:
  """Slot range of a window over a response of n tokens starting at slot `start` (n ≥ 1)."""
  end = int(rng.integers(1, n + 1))
  width = settings.r2 + settings.r3 if rng.random() < settings.rule3_share else settings.r2
  return start + max(0, end - width), start + end


class ViewsBatchFn:
  """Global step -> this process's rows of the views batch (the SFT pipeline's `_BatchFn` twin)."""

  def __init__(
    self,
    corpus: ViewCorpus,
    config: pipeline.PipelineConfig,
    settings: ViewSettings,
    pad_id: int,
    process_index: int,
    process_count: int,
  ):
    self.corpus, self.config, self.settings, self.pad_id = corpus, config, settings, pad_id
    self.process_index, self.process_count = process_index, process_count
    self.plan = pipeline._Plan(corpus.lengths, corpus.labels, config)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, k = self.plan.locate(int(step))
    rows = self.plan.epoch_batches(epoch)[k]
    per_process = len(rows) // self.process_count
    longest = max((int(self.corpus.lengths[r].sum()) for r in rows), default=1)
    T = row_length(longest)
    # Windows depend on the global step and the row's place in the global batch only.
    rng = np.random.default_rng([self.config.seed, int(step), 7])
    draws = [self._draw(rng, r) for r in rows]
    local = range(self.process_index * per_process, (self.process_index + 1) * per_process)
    return self._batch([rows[i] for i in local], [draws[i] for i in local], T)

  def _draw(self, rng, idx) -> list[tuple[int, int]] | None:
    """Window ranges (relative to each response's first slot) of views 1-4 for one row."""
    if len(idx) == 0:
      return None
    i = int(idx[0])
    c = self.corpus
    out = []
    for branch, _ in _VIEW_SPEC[1:]:
      n = len(c.reference[i] if branch == 1 else c.own[i])
      out.append(draw_window(rng, 0, n, self.settings) if n else (0, 0))
    return out

  def _batch(self, rows, draws, T) -> dict[str, np.ndarray]:
    c = self.corpus
    b = len(rows)
    out = {
      "tokens": np.full((b, T), self.pad_id, np.int32),
      "positions": np.zeros((b, T), np.int32),
      "branch": np.full((b, T), -1, np.int32),
      "query_span": np.zeros((b, 2), np.int32),
      "view_window": np.zeros((b, K, 2), np.int32),
      "view_query": np.zeros((b, K), bool),
      "cls_label": np.full((b, K), -1, np.int32),
    }
    for r, (idx, draw) in enumerate(zip(rows, draws)):
      if len(idx) == 0:
        continue
      i = int(idx[0])
      p, ref, own = c.prompt[i], c.reference[i], c.own[i]
      P = len(p)
      out["tokens"][r, 1:P] = p[1:]  # slot 0 (the CLS slot) stays padding
      out["positions"][r, :P] = np.arange(P)
      out["branch"][r, 1:P] = 0
      starts = {1: P, 2: P + len(ref)}
      for branch, ids in ((1, ref), (2, own)):
        s = starts[branch]
        out["tokens"][r, s : s + len(ids)] = ids
        out["positions"][r, s : s + len(ids)] = P + np.arange(len(ids))
        out["branch"][r, s : s + len(ids)] = branch
      out["query_span"][r] = c.query_span[i]
      for v, (branch, reads_query) in enumerate(_VIEW_SPEC):
        out["view_query"][r, v] = reads_query
        if branch:
          lo, hi = draw[v - 1]
          if hi == 0:
            continue  # no such response for this prompt
          out["view_window"][r, v] = (starts[branch] + lo, starts[branch] + hi)
        out["cls_label"][r, v] = c.labels[i]
    return out


class ViewsPipeline(pipeline.Pipeline):
  """`pipeline.Pipeline` (planning, class balance, grain iterator, resume) over view batches."""

  def __init__(
    self,
    corpus: ViewCorpus,
    config: pipeline.PipelineConfig,
    settings: ViewSettings,
    *,
    pad_id: int,
    process_index: int,
    process_count: int,
  ):
    super().__init__(corpus, config, pad_id=pad_id, process_index=process_index, process_count=process_count)
    self._fn = ViewsBatchFn(corpus, config, settings, pad_id, process_index, process_count)
