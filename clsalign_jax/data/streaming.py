"""Streaming pretraining input: documents are read, tokenised and packed lazily, per host shard.

    stream = DocumentStream(records, tokenizer, PipelineConfig(...), process_index=i, process_count=n)
    it = iter(stream)            # grain DatasetIterator; get_state() / set_state() are exact
    batch = next(it)             # this host's rows, the batch format of data/pipeline.py

`records` is any random-access source of {"id", "text", "label"} records (a `safety_pretrain_corpus`
ArrayRecord data source, a list of dicts or TextRecords); nothing is read before it is needed, so
memory does not grow with the corpus. The stages:

  1. document order: grain's index shuffle of range(len(records)) (a new permutation every epoch,
     O(1) memory), repeated, and sliced [process_index::process_count]: each host reads and
     tokenises only its own documents, and the hosts together read every document once per epoch;
  2. encoding: groups of `ENCODE_GROUP` documents go through the HF `tokenizers` batch API (Rust
     threads, no GIL) on grain's read threads, or in grain worker processes when
     `worker_count > 0`; each document becomes [CLS, BOS, text..., EOS] chunks exactly as
     `templates.encode_document` cuts them;
  3. rows: with `packing`, chunks go into rows by the same first fit over 2·(rows per host batch)
     open rows as the eager `_Plan._pack`; without it every chunk is its own row. Rows are always
     `max_length` long: hosts pack independently, and a common shape must not depend on them.

For the same documents in the same order the batches are bit-identical to the eager
`pretrain_pipeline` (one process, one epoch, `bucket_lengths=()`); what differs is the order
(documents are shuffled, not chunks) and that packing runs on across epoch boundaries.

Checkpointing: the iterator state holds grain's state of the encoded-group stream, how far into the
current group packing has gone, and the rows still open or waiting for a batch as (record index,
chunk) pairs. Restoring re-encodes just those documents, so a state stays small (at most
3·rows·max_segments_per_row pairs) and resuming yields exactly the batches an uninterrupted run
would have. With worker processes the batches are the same, but grain's part of the state has another
form: a state restores into a stream with the same `worker_count` (0 or not).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import grain
import numpy as np

from clsalign_jax.data.pipeline import PipelineConfig, _empty, _field
from clsalign_jax.data.records import DataError, parse_label
from clsalign_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Documents per tokenizer call: large enough that the batch API keeps every core busy, small enough
# that re-encoding one group on restore is cheap.
ENCODE_GROUP = 256


@dataclasses.dataclass
class _Chunk:
  source: int  # index of the document in `records`
  chunk: int  # which max_length piece of it
  tokens: np.ndarray  # int32 [CLS, BOS, text..., (EOS on the last chunk)]
  label: int


class _EncodeGroup:
  """Record indices -> their chunks (picklable, so grain worker processes can run it)."""

  def __init__(self, records, tokenizer: Tokenizer, max_length: int, skip_bad_records: bool):
    if max_length < 3:
      raise ValueError("max_length must leave room for [CLS], BOS and one token")
    self.records, self.tokenizer = records, tokenizer
    self.max_length, self.skip_bad_records = max_length, skip_bad_records

  def __call__(self, indices) -> dict[str, np.ndarray]:
    indices = [int(i) for i in np.atleast_1d(indices)]
    # An ArrayRecord data source reads a batch of keys in one call, faster than one at a time.
    getitems = getattr(self.records, "__getitems__", None)
    records = getitems(indices) if getitems else [self.records[i] for i in indices]
    kept, texts, labels = [], [], []
    for i, rec in zip(indices, records):
      rid = _field(rec, "id") or f"record {i}"
      try:
        text = _field(rec, "text")
        if text is None or not text.strip():
          raise DataError(f"{rid}: empty text")
        label = parse_label(_field(rec, "label"), rid)
      except DataError:
        if not self.skip_bad_records:
          raise
        continue
      kept.append(i)
      texts.append(text)
      labels.append(label)
    t = self.tokenizer
    width = self.max_length - 2
    pieces, starts, out_labels, sources, chunks = [], [0], [], [], []
    head = np.asarray([t.cls_id, t.bos_id], np.int32)
    eos = np.asarray([t.eos_id], np.int32)
    for i, ids, label in zip(kept, t.encode_batch(texts), labels):
      body = np.concatenate([np.asarray(ids, np.int32), eos])
      for k, start in enumerate(range(0, len(body), width)):
        piece = body[start : start + width]
        pieces += [head, piece]
        starts.append(starts[-1] + 2 + len(piece))
        out_labels.append(label)
        sources.append(i)
        chunks.append(k)
    return {
      "read": np.asarray(len(indices), np.int64),
      "tokens": np.concatenate(pieces) if pieces else np.zeros(0, np.int32),
      "starts": np.asarray(starts, np.int64),
      "labels": np.asarray(out_labels, np.int32),
      "sources": np.asarray(sources, np.int64),
      "chunks": np.asarray(chunks, np.int64),
    }

  def chunks(self, group: dict[str, np.ndarray]) -> list[_Chunk]:
    s = group["starts"]
    return [
      _Chunk(
        int(group["sources"][j]), int(group["chunks"][j]), group["tokens"][s[j] : s[j + 1]], int(group["labels"][j])
      )
      for j in range(len(group["labels"]))
    ]

  def lookup(self, refs: Sequence[Sequence[int]]) -> list[_Chunk]:
    """The chunks named by (record index, chunk) pairs, re-encoded (for restoring a state)."""
    sources = list(dict.fromkeys(int(r[0]) for r in refs))
    by_ref = {(c.source, c.chunk): c for c in self.chunks(self(sources))} if sources else {}
    return [by_ref[int(s), int(k)] for s, k in refs]


class _Rows:
  """Rows of one host's batches, built chunk by chunk (the eager `_Plan._pack` as a stream)."""

  def __init__(self, config: PipelineConfig, rows_per_batch: int):
    self.config, self.rows_per_batch = config, rows_per_batch
    self.open: list[list[_Chunk]] = []
    self.room: list[int] = []
    self.closed: list[list[_Chunk]] = []

  def add(self, c: _Chunk):
    if not self.config.packing:
      self.closed.append([c])
      return
    n = len(c.tokens)
    slot = next(
      (k for k in range(len(self.open)) if self.room[k] >= n and len(self.open[k]) < self.config.max_segments_per_row),
      None,
    )
    if slot is None:
      if len(self.open) >= 2 * self.rows_per_batch:
        self.closed.append(self.open.pop(0))
        self.room.pop(0)
      self.open.append([])
      self.room.append(self.config.max_length)
      slot = len(self.open) - 1
    self.open[slot].append(c)
    self.room[slot] -= n

  def flush(self):
    self.closed += self.open
    self.open, self.room = [], []

  def take(self, final: bool) -> list[list[_Chunk]] | None:
    """A batch of rows when one is full; at the end, the remainder as `drop_remainder` says."""
    b = self.rows_per_batch
    if len(self.closed) >= b:
      rows, self.closed = self.closed[:b], self.closed[b:]
      return rows
    if final and self.closed and not self.config.drop_remainder:
      rows, self.closed = self.closed + [[]] * (b - len(self.closed)), []
      return rows
    return None

  def refs(self) -> dict[str, list]:
    def ref(rows):
      return [[[c.source, c.chunk] for c in row] for row in rows]

    return {"open": ref(self.open), "closed": ref(self.closed)}

  def restore(self, refs: dict[str, list], encoder: _EncodeGroup):
    flat = [pair for key in ("open", "closed") for row in refs[key] for pair in row]
    chunks = iter(encoder.lookup(flat))
    self.open = [[next(chunks) for _ in row] for row in refs["open"]]
    self.closed = [[next(chunks) for _ in row] for row in refs["closed"]]
    self.room = [self.config.max_length - sum(len(c.tokens) for c in row) for row in self.open]


def assemble(rows: list[list[_Chunk]], config: PipelineConfig, pad_id: int) -> dict[str, np.ndarray]:
  """Rows of chunks -> the batch arrays of data/pipeline.py (packed or one example per row)."""
  b, length = len(rows), config.max_length
  out = _empty(b, length, pad_id)
  if config.packing:
    n = config.max_segments_per_row
    shape = (b, n)
  else:
    n, shape = 1, (b,)
  query = np.zeros((b, n, 2), np.int32)
  response = np.zeros((b, n, 2), np.int32)
  label = np.full((b, n), -1, np.int32)
  cls_index = np.zeros((b, n), np.int32)
  for r, row in enumerate(rows):
    offset = 0
    for s, c in enumerate(row):
      k = len(c.tokens)
      end = offset + k
      out["tokens"][r, offset:end] = c.tokens
      out["segment_ids"][r, offset:end] = s + 1
      out["positions"][r, offset:end] = np.arange(k, dtype=np.int32)
      # A document chunk: the CLS reads the text, the LM learns every text token (and the EOS).
      out["loss_mask"][r, offset + 2 : end] = 1
      query[r, s] = (offset + 2, end)
      response[r, s] = (end, end)
      label[r, s] = c.label
      cls_index[r, s] = offset
      offset = end
  out["query_span"] = query.reshape(*shape, 2)
  out["response_span"] = response.reshape(*shape, 2)
  out["cls_label"] = label.reshape(shape)
  if config.packing:
    out["cls_index"] = cls_index
  return out


class _PackedIterator(grain.DatasetIterator):
  def __init__(self, parent, encoder, config, rows_per_batch, pad_id):
    super().__init__(parent)
    self._encoder, self._config, self._pad_id = encoder, config, pad_id
    self._rows = _Rows(config, rows_per_batch)
    self._group: list[_Chunk] | None = None  # the encoded group being packed
    self._group_state = None  # the parent's state before that group
    self._pos = 0  # chunks of the group already packed
    self._skip = 0  # after set_state: chunks of the next group that were packed before the save
    self._ended = False
    self._barren = 0  # documents read since the last one that gave a chunk

  def __next__(self):
    while True:
      rows = self._rows.take(final=self._ended)
      if rows is not None:
        return assemble(rows, self._config, self._pad_id)
      if self._ended:
        raise StopIteration
      if self._group is None or self._pos == len(self._group):
        state = self._parent.get_state()
        try:
          group = next(self._parent)
        except StopIteration:
          self._group, self._ended = None, True
          self._rows.flush()
          continue
        self._group, self._group_state = self._encoder.chunks(group), state
        self._pos, self._skip = self._skip, 0
        # Repeating forever over documents that are all skipped would never yield a batch.
        self._barren = 0 if self._group else self._barren + int(group["read"])
        if self._barren >= len(self._encoder.records):
          raise DataError(
            f"none of the {len(self._encoder.records)} documents could be encoded (every one skipped as a bad record)"
          )
        continue
      self._rows.add(self._group[self._pos])
      self._pos += 1

  def get_state(self):
    if self._group is not None and self._pos < len(self._group):
      parent, pos = self._group_state, self._pos
    else:
      parent, pos = self._parent.get_state(), self._skip
    return {"parent": parent, "pos": pos, "ended": self._ended, **self._rows.refs()}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._group, self._group_state = None, None
    self._pos, self._skip, self._ended = 0, int(state["pos"]), bool(state["ended"])
    self._rows = _Rows(self._config, self._rows.rows_per_batch)
    self._rows.restore(state, self._encoder)


class _PackedDataset(grain.IterDataset):
  def __init__(self, parent, encoder, config, rows_per_batch, pad_id):
    super().__init__(parent)
    self._args = (encoder, config, rows_per_batch, pad_id)

  def __iter__(self):
    return _PackedIterator(self._parent.__iter__(), *self._args)


class DocumentStream:
  """This host's batches of a document corpus, read and packed as they are needed."""

  def __init__(
    self,
    records,
    tokenizer: Tokenizer,
    config: PipelineConfig,
    *,
    process_index: int,
    process_count: int,
    encode_group: int = ENCODE_GROUP,
  ):
    if config.batch_size % process_count:
      raise ValueError(f"batch_size {config.batch_size} is not divisible by {process_count} processes")
    if len(records) == 0:
      raise ValueError("no documents to stream")
    if config.balance_classes:
      raise ValueError("balance_classes is not supported when streaming documents (it needs every label up front)")
    if tuple(b for b in config.bucket_lengths if b < config.max_length):
      log.info("streamed rows are max_length=%d long; bucket_lengths do not apply", config.max_length)
    self.records, self.config = records, config
    self.process_index, self.process_count = process_index, process_count
    self.rows_per_batch = config.batch_size // process_count
    self.pad_id = tokenizer.pad_id
    self.encoder = _EncodeGroup(records, tokenizer, config.max_length, config.skip_bad_records)
    self.encode_group = encode_group

  def document_order(self) -> grain.MapDataset:
    """Record indices in the order this host reads them (all epochs)."""
    c = self.config
    order = grain.MapDataset.range(len(self.records))
    if c.shuffle:
      order = order.shuffle(seed=c.seed)
    order = order.repeat(c.num_epochs)
    return order[self.process_index :: self.process_count]

  def dataset(self) -> grain.IterDataset:
    c = self.config
    groups = self.document_order().batch(self.encode_group).map(self.encoder)
    # Each group is a tokenizer call of `encode_group` documents; a few in flight keep the cores
    # busy without holding much of the corpus.
    ds = groups.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if c.worker_count > 0:
      ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=c.worker_count, per_worker_buffer_size=c.worker_buffer_size)
      )
    return _PackedDataset(ds, self.encoder, c, self.rows_per_batch, self.pad_id)

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.dataset())


def streaming_pretrain_pipeline(
  records,
  tokenizer: Tokenizer,
  config: PipelineConfig = PipelineConfig(),
  *,
  process_index: int | None = None,
  process_count: int | None = None,
) -> DocumentStream:
  """Labelled documents -> this host's batches, streamed (see the module docstring)."""
  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  return DocumentStream(records, tokenizer, config, process_index=process_index, process_count=process_count)


__all__ = ["DocumentStream", "ENCODE_GROUP", "assemble", "streaming_pretrain_pipeline"]
