"""Grain input pipeline: records -> encoded examples -> batches with [CLS] labels and spans.

Batch format (numpy int32; B = per-process rows, T = row length):

    tokens        [B, T]     [CLS] at the start of every example, then BOS, template, query, response
    segment_ids   [B, T]     0 = padding, 1.. = example within the row
    positions     [B, T]     position within its example ([CLS] = 0); 0 on padding
    loss_mask     [B, T]     1 where tokens[t] is an LM target: a response token or the EOS that ends
                             it. The mask sits on target positions; the trainer predicts tokens[t]
                             from logits[t - 1], i.e. uses loss_mask[:, 1:] with logits[:, :-1].
    query_span    [B, 2]     half-open token range of the user query, absolute within the row
    response_span [B, 2]     half-open range of the response through its EOS (a truncated response
                             has no EOS)
    cls_label     [B]        1 = malicious, 0 = benign, -1 = an empty filler row

With packing, each row holds up to N = `max_segments_per_row` examples: `query_span` and
`response_span` become [B, N, 2], `cls_label` [B, N] (-1 where unused, spans [0, 0]) and
`cls_index` [B, N] gives the row position of each example's [CLS].

Every batch is a pure function of (seed, step): epochs are planned deterministically, the iterator
is grain's, and `get_state()` / `set_state()` resume mid-epoch on exactly the next batch.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from clsalign_jax.data.records import DataError, parse_label
from clsalign_jax.data.templates import (
  ChatTemplate,
  EncodedExample,
  SpanError,
  encode_document,
  encode_example,
)
from clsalign_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  max_length: int = 2048
  batch_size: int = 8  # global rows per batch, over all processes
  packing: bool = False
  max_segments_per_row: int = 16
  # Padded batches take the smallest of these lengths that fits their longest row, so shapes
  # (and jit compilations) stay few; `max_length` is always the last bucket.
  bucket_lengths: tuple[int, ...] = (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
  # > 0: within windows of this many batches, batch examples of similar length together.
  length_grouping: int = 0
  # With length_grouping: sort each label by length and alternate the labels, so a batch has rows of
  # similar length *and* both labels (plain grouping makes one-label batches when length follows
  # the label: long prompts are mostly benign).
  group_mixes_labels: bool = False
  balance_classes: bool = False  # oversample the minority label to 50/50 every epoch
  shuffle: bool = True
  seed: int = 42
  num_epochs: int | None = 1  # None: repeat forever
  drop_remainder: bool = True  # False: the last batch is filled with empty rows
  min_response_tokens: int = 1  # drop an example whose prompt leaves less room than this
  skip_bad_records: bool = False  # skip (and count) records that cannot be encoded
  worker_count: int = 0  # grain worker processes; 0 = in the calling process
  worker_buffer_size: int = 2


# ----- encoding -----------------------------------------------------------------------------------


@dataclasses.dataclass
class EncodedCorpus:
  """All encoded examples in flat arrays (cheap to ship to grain workers)."""

  tokens: np.ndarray  # int32 [total tokens]
  starts: np.ndarray  # int64 [n + 1]; example i is tokens[starts[i]:starts[i + 1]]
  query_span: np.ndarray  # int32 [n, 2]
  response_span: np.ndarray  # int32 [n, 2]
  loss_span: np.ndarray  # int32 [n, 2]
  labels: np.ndarray  # int32 [n]
  ids: list[str]
  stats: dict[str, int]

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.starts)

  def example(self, i: int) -> EncodedExample:
    return EncodedExample(
      tokens=self.tokens[self.starts[i] : self.starts[i + 1]],
      query_span=tuple(self.query_span[i]),
      response_span=tuple(self.response_span[i]),
      loss_span=tuple(self.loss_span[i]),
      label=int(self.labels[i]),
    )

  @classmethod
  def from_examples(cls, examples: Sequence[EncodedExample], ids: list[str], stats: dict):
    lengths = np.asarray([len(e) for e in examples], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate([e.tokens for e in examples]) if examples else np.zeros(0, np.int32)

    def spans(name):
      return np.asarray([getattr(e, name) for e in examples], np.int32).reshape(-1, 2)

    return cls(
      tokens=tokens.astype(np.int32),
      starts=starts,
      query_span=spans("query_span"),
      response_span=spans("response_span"),
      loss_span=spans("loss_span"),
      labels=np.asarray([e.label for e in examples], np.int32),
      ids=ids,
      stats=stats,
    )


def encode_sft(
  records: Sequence,
  tokenizer: Tokenizer,
  template: ChatTemplate,
  *,
  max_length: int,
  min_response_tokens: int = 1,
  skip_bad_records: bool = False,
) -> EncodedCorpus:
  """Encodes prompt/response/label records; truncates responses, never queries.

  `records` may be `SftRecord`s or mappings (e.g. a TFDS data source, whose text is bytes).
  An example longer than `max_length` loses response tokens from the end (and so its EOS); one
  whose prompt leaves fewer than `min_response_tokens` is dropped. Both are counted in `stats`.
  """
  stats = dict.fromkeys(
    [
      "records",
      "examples",
      "skipped_bad_records",
      "dropped_prompt_too_long",
      "truncated_responses",
      "truncated_tokens",
      "forced_boundary",
      "glued_space",
      "tokens",
      "benign",
      "malicious",
    ],
    0,
  )
  examples, ids = [], []
  for n in range(len(records)):
    rec = records[n]
    stats["records"] += 1
    rid = _field(rec, "id") or f"record {n}"
    try:
      prompt, response = _field(rec, "prompt"), _field(rec, "response")
      if prompt is None or not prompt.strip():
        raise DataError(f"{rid}: empty prompt")
      label = parse_label(_field(rec, "label"), rid)
      ex = encode_example(tokenizer, template, prompt, response or "", label)
    except (DataError, SpanError) as e:
      if not skip_bad_records:
        raise DataError(f"{rid}: {e}") from e
      stats["skipped_bad_records"] += 1
      continue
    if len(ex) > max_length:
      prompt_len = ex.response_span[0]
      if prompt_len + min_response_tokens > max_length:
        stats["dropped_prompt_too_long"] += 1
        continue
      stats["truncated_responses"] += 1
      stats["truncated_tokens"] += len(ex) - max_length
      ex = dataclasses.replace(
        ex,
        tokens=ex.tokens[:max_length],
        response_span=(prompt_len, max_length),
        loss_span=(prompt_len, max_length),
      )
    stats["forced_boundary"] += ex.forced_boundary
    stats["glued_space"] += ex.glued_space
    examples.append(ex)
    ids.append(rid)
  _finish_stats(stats, examples)
  log.info("encoded SFT records: %s", stats)
  return EncodedCorpus.from_examples(examples, ids, stats)


def encode_documents(
  records: Sequence,
  tokenizer: Tokenizer,
  *,
  max_length: int,
  skip_bad_records: bool = False,
) -> EncodedCorpus:
  """Encodes labelled documents (field `text`) into [CLS, BOS, text, EOS] chunks."""
  stats = dict.fromkeys(
    ["records", "examples", "skipped_bad_records", "chunked_documents", "tokens", "benign", "malicious"],
    0,
  )
  examples, ids = [], []
  for n in range(len(records)):
    rec = records[n]
    stats["records"] += 1
    rid = _field(rec, "id") or f"record {n}"
    try:
      text = _field(rec, "text")
      if text is None or not text.strip():
        raise DataError(f"{rid}: empty text")
      chunks = encode_document(tokenizer, text, parse_label(_field(rec, "label"), rid), max_length)
    except DataError:
      if not skip_bad_records:
        raise
      stats["skipped_bad_records"] += 1
      continue
    stats["chunked_documents"] += len(chunks) > 1
    examples += chunks
    ids += [f"{rid}#{k}" for k in range(len(chunks))]
  _finish_stats(stats, examples)
  log.info("encoded documents: %s", stats)
  return EncodedCorpus.from_examples(examples, ids, stats)


def _finish_stats(stats, examples):
  stats["examples"] = len(examples)
  stats["tokens"] = int(sum(len(e) for e in examples))
  stats["benign"] = sum(e.label == 0 for e in examples)
  stats["malicious"] = sum(e.label == 1 for e in examples)


def _field(record, name):
  value = record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.generic):
    return value.item()
  return value


# ----- planning epochs ----------------------------------------------------------------------------


class _Plan:
  """Which examples go in which row of which global batch; a pure function of (seed, epoch)."""

  def __init__(self, lengths: np.ndarray, labels: np.ndarray, config: PipelineConfig):
    self.lengths, self.labels, self.config = lengths, labels, config
    self._lengths: dict[int, int] = {}  # packed batches per epoch, for every epoch seen
    self._cache: dict[int, list[list[np.ndarray]]] = {}

  def epoch_batches(self, epoch: int) -> list[list[np.ndarray]]:
    if epoch not in self._cache:
      if len(self._cache) > 2:
        self._cache.pop(min(self._cache))
      self._cache[epoch] = self._build(epoch)
    return self._cache[epoch]

  def locate(self, step: int) -> tuple[int, int]:
    """(epoch, batch within epoch) of a global step."""
    epoch = 0
    while self.config.num_epochs is None or epoch < self.config.num_epochs:
      n = self.epoch_length(epoch)
      if n == 0:
        raise ValueError("the dataset yields no batch per epoch")
      if step < n:
        return epoch, step
      step -= n
      epoch += 1
    raise IndexError("step is past the last epoch")

  def epoch_length(self, epoch: int) -> int:
    if not self.config.packing:
      # One example per row: the count is known without planning (resuming at a late step
      # need not replay every earlier epoch).
      full, rest = divmod(self.epoch_examples(), self.config.batch_size)
      return full + (rest > 0 and not self.config.drop_remainder)
    if epoch not in self._lengths:
      self._lengths[epoch] = len(self.epoch_batches(epoch))
    return self._lengths[epoch]

  def epoch_examples(self) -> int:
    if not self.config.balance_classes:
      return len(self.labels)
    return 2 * int(max(np.bincount(self.labels, minlength=2)))

  def total_batches(self) -> int | None:
    if self.config.num_epochs is None:
      return None
    return sum(self.epoch_length(e) for e in range(self.config.num_epochs))

  def _build(self, epoch: int) -> list[list[np.ndarray]]:
    c = self.config
    rng = np.random.default_rng([c.seed, epoch])
    order = self._sample(rng)
    if c.shuffle:
      order = rng.permutation(order)
    if c.packing:
      rows = self._pack(order)
    else:
      if c.length_grouping > 0:
        window = c.length_grouping * c.batch_size
        group = self._mixed_by_length if c.group_mixes_labels else self._by_length
        order = np.concatenate([group(order[i : i + window]) for i in range(0, len(order), window)])
      rows = [order[i : i + 1] for i in range(len(order))]
    batches = [rows[i : i + c.batch_size] for i in range(0, len(rows), c.batch_size)]
    if batches and len(batches[-1]) < c.batch_size:
      if c.drop_remainder:
        batches.pop()
      else:
        empty = np.zeros(0, np.int64)
        batches[-1] = batches[-1] + [empty] * (c.batch_size - len(batches[-1]))
    if c.length_grouping > 0 and not c.packing and c.shuffle:
      batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches

  def _by_length(self, chunk: np.ndarray) -> np.ndarray:
    return chunk[np.argsort(-self.lengths[chunk], kind="stable")]

  def _mixed_by_length(self, chunk: np.ndarray) -> np.ndarray:
    sides = [self._by_length(chunk[self.labels[chunk] == k]) for k in (0, 1)]
    n = min(len(sides[0]), len(sides[1]))
    mixed = np.empty(2 * n, chunk.dtype)
    mixed[0::2], mixed[1::2] = sides[0][:n], sides[1][:n]
    return np.concatenate([mixed, sides[0][n:], sides[1][n:]])

  def _sample(self, rng) -> np.ndarray:
    index = np.arange(len(self.labels))
    if not self.config.balance_classes:
      return index
    groups = [index[self.labels == k] for k in (0, 1)]
    if min(map(len, groups)) == 0:
      raise ValueError("balance_classes needs examples of both labels")
    minor, major = sorted(groups, key=len)
    reps, rest = divmod(len(major), len(minor))
    extra = rng.choice(minor, size=rest, replace=False)
    return np.concatenate([major, *([minor] * reps), extra])

  def _pack(self, order: np.ndarray) -> list[np.ndarray]:
    """First fit over a small window of open rows, so the shuffled order is roughly kept."""
    c = self.config
    open_rows: list[list[int]] = []
    room: list[int] = []
    rows = []
    for i in order:
      n = int(self.lengths[i])
      slot = next(
        (k for k in range(len(open_rows)) if room[k] >= n and len(open_rows[k]) < c.max_segments_per_row),
        None,
      )
      if slot is None:
        if len(open_rows) >= 2 * c.batch_size:
          rows.append(np.asarray(open_rows.pop(0)))
          room.pop(0)
        open_rows.append([])
        room.append(c.max_length)
        slot = len(open_rows) - 1
      open_rows[slot].append(int(i))
      room[slot] -= n
    rows += [np.asarray(r) for r in open_rows]
    return rows


# ----- assembling batches -------------------------------------------------------------------------


class _BatchFn:
  """Global step -> this process's slice of the global batch (picklable for grain workers)."""

  def __init__(self, corpus, config, pad_id, process_index, process_count):
    self.corpus, self.config, self.pad_id = corpus, config, pad_id
    self.process_index, self.process_count = process_index, process_count
    self.plan = _Plan(corpus.lengths, corpus.labels, config)
    buckets = sorted({b for b in config.bucket_lengths if b < config.max_length})
    self.buckets = np.asarray(buckets + [config.max_length])

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, k = self.plan.locate(int(step))
    rows = self.plan.epoch_batches(epoch)[k]
    per_process = len(rows) // self.process_count
    local = rows[self.process_index * per_process : (self.process_index + 1) * per_process]
    if self.config.packing:
      return self._packed(local)
    # The length comes from the global batch, so every process builds the same shape.
    longest = max((int(self.corpus.lengths[r].sum()) for r in rows), default=1)
    return self._padded(local, int(self.buckets[np.searchsorted(self.buckets, longest)]))

  def _padded(self, rows, length):
    c = self.corpus
    b = len(rows)
    out = _empty(b, length, self.pad_id)
    out["query_span"] = np.zeros((b, 2), np.int32)
    out["response_span"] = np.zeros((b, 2), np.int32)
    out["cls_label"] = np.full((b,), -1, np.int32)
    for r, idx in enumerate(rows):
      if len(idx) == 0:
        continue
      i = int(idx[0])
      self._place(out, r, 0, i, 1)
      out["query_span"][r] = c.query_span[i]
      out["response_span"][r] = c.response_span[i]
      out["cls_label"][r] = c.labels[i]
    return out

  def _packed(self, rows):
    c = self.corpus
    b, n = len(rows), self.config.max_segments_per_row
    out = _empty(b, self.config.max_length, self.pad_id)
    out["query_span"] = np.zeros((b, n, 2), np.int32)
    out["response_span"] = np.zeros((b, n, 2), np.int32)
    out["cls_label"] = np.full((b, n), -1, np.int32)
    out["cls_index"] = np.zeros((b, n), np.int32)
    for r, idx in enumerate(rows):
      offset = 0
      for s, i in enumerate(int(x) for x in idx):
        self._place(out, r, offset, i, s + 1)
        out["query_span"][r, s] = c.query_span[i] + offset
        out["response_span"][r, s] = c.response_span[i] + offset
        out["cls_label"][r, s] = c.labels[i]
        out["cls_index"][r, s] = offset
        offset += int(c.lengths[i])
    return out

  def _place(self, out, r, offset, i, segment):
    c = self.corpus
    toks = c.tokens[c.starts[i] : c.starts[i + 1]]
    end = offset + len(toks)
    out["tokens"][r, offset:end] = toks
    out["segment_ids"][r, offset:end] = segment
    out["positions"][r, offset:end] = np.arange(len(toks), dtype=np.int32)
    lo, hi = c.loss_span[i]
    out["loss_mask"][r, offset + lo : offset + hi] = 1


def _empty(b, length, pad_id):
  return {
    "tokens": np.full((b, length), pad_id, np.int32),
    "segment_ids": np.zeros((b, length), np.int32),
    "positions": np.zeros((b, length), np.int32),
    "loss_mask": np.zeros((b, length), np.int32),
  }


# ----- the pipeline -------------------------------------------------------------------------------


class Pipeline:
  """Batches over an `EncodedCorpus`. Iterate it for a checkpointable grain iterator."""

  def __init__(
    self,
    corpus: EncodedCorpus,
    config: PipelineConfig,
    *,
    pad_id: int,
    process_index: int | None = None,
    process_count: int | None = None,
  ):
    if process_index is None or process_count is None:
      import jax

      process_index, process_count = jax.process_index(), jax.process_count()
    if config.batch_size % process_count:
      raise ValueError(f"batch_size {config.batch_size} is not divisible by {process_count} processes")
    if len(corpus) == 0:
      raise ValueError("no examples to batch")
    self.corpus, self.config = corpus, config
    self.process_index, self.process_count = process_index, process_count
    self._fn = _BatchFn(corpus, config, pad_id, process_index, process_count)

  @property
  def stats(self) -> dict[str, int]:
    return self.corpus.stats

  @property
  def examples_per_epoch(self) -> int:
    """Examples an epoch draws (more than the corpus holds when classes are balanced)."""
    return self._fn.plan.epoch_examples()

  @property
  def num_batches(self) -> int | None:
    """Batches over all epochs; None when repeating forever."""
    return self._fn.plan.total_batches()

  def batches_in_epoch(self, epoch: int) -> int:
    return self._fn.plan.epoch_length(epoch)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's part of global batch `step` (random access, no iterator needed)."""
    return self._fn(step)

  def dataset(self) -> grain.MapDataset:
    total = self.num_batches
    return grain.MapDataset.range(sys.maxsize if total is None else total).map(self._fn)

  def __iter__(self) -> grain.DatasetIterator:
    # Assembling a batch takes well under a millisecond; grain's default read-ahead (16 threads,
    # 500 elements) would only hold memory.
    ds = self.dataset().to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
    if self.config.worker_count > 0:
      ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(
          num_workers=self.config.worker_count,
          per_worker_buffer_size=self.config.worker_buffer_size,
        )
      )
    return iter(ds)


def sft_pipeline(
  records: Sequence,
  tokenizer: Tokenizer,
  template: ChatTemplate,
  config: PipelineConfig = PipelineConfig(),
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Pipeline:
  """Records (SftRecords, dicts, or a `safety_mix` data source) -> SFT batches."""
  corpus = encode_sft(
    records,
    tokenizer,
    template,
    max_length=config.max_length,
    min_response_tokens=config.min_response_tokens,
    skip_bad_records=config.skip_bad_records,
  )
  return Pipeline(corpus, config, pad_id=tokenizer.pad_id, process_index=process_index, process_count=process_count)


def pretrain_pipeline(
  records: Sequence,
  tokenizer: Tokenizer,
  config: PipelineConfig = PipelineConfig(),
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Pipeline:
  """Labelled documents (TextRecords, dicts, or a `safety_pretrain_corpus` source) -> batches."""
  corpus = encode_documents(records, tokenizer, max_length=config.max_length, skip_bad_records=config.skip_bad_records)
  return Pipeline(corpus, config, pad_id=tokenizer.pad_id, process_index=process_index, process_count=process_count)
