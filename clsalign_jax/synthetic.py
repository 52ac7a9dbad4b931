"""A deterministic stand-in for the safety-mix pipeline, with the same batch format.

Each example is a pure function of (seed, split, global example index), so a run resumes
exactly from `{"batches": n}` and any split of the global batch over processes loads the
same rows. The task is learnable: an example is malicious (label 1) iff its query holds the
MARKER token, and malicious responses start with a fixed refusal.

SFT row:      [CLS, BOS, PREFIX.., query.., SUFFIX.., response.., EOS, PAD..]
pretrain row: [CLS, BOS, text.., PAD..] with one label per chunk
"""

from __future__ import annotations

import numpy as np

from clsalign_jax import config as config_lib

PAD = 0
PREFIX = (3, 4, 5)
SUFFIX = (6, 7)
MARKER = 8
REFUSAL = (9, 10, 11, 12)
FIRST_FREE_ID = 16
SPLITS = {"train": 0, "validation": 1, "test": 2}


class SyntheticIterator:
  """Yields dicts of numpy arrays: this shard's rows of one global batch per call."""

  def __init__(
    self,
    *,
    split: str,
    seed: int,
    mode: str,
    seq_len: int,
    global_batch_size: int,
    shard_index: int,
    shard_count: int,
    vocab_size: int,
    bos_id: int,
    eos_id: int,
  ):
    if split not in SPLITS:
      raise ValueError(f"synthetic data has no split {split!r}; known: {sorted(SPLITS)}")
    if global_batch_size % shard_count:
      raise ValueError(f"global batch {global_batch_size} does not split into {shard_count} shards")
    if vocab_size <= FIRST_FREE_ID + 8 or seq_len < 24:
      raise ValueError("synthetic data needs vocab_size > 24 and seq_len >= 24")
    self.split, self.seed, self.mode, self.seq_len = split, seed, mode, seq_len
    self.global_batch_size, self.local_batch_size = global_batch_size, global_batch_size // shard_count
    self.shard_index = shard_index
    self.vocab_size, self.bos_id, self.eos_id, self.cls_id = vocab_size, bos_id, eos_id, vocab_size
    self.batches = 0

  def get_state(self) -> dict:
    return {"batches": self.batches}

  def set_state(self, state: dict) -> None:
    self.batches = int(state["batches"])

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    first = self.batches * self.global_batch_size + self.shard_index * self.local_batch_size
    rows = [self._example(first + r) for r in range(self.local_batch_size)]
    self.batches += 1
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

  def _random_text(self, rng, n):
    return rng.integers(FIRST_FREE_ID, self.vocab_size, size=n).tolist()

  def _example(self, index: int) -> dict:
    rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
    T = self.seq_len
    label = int(rng.integers(2))
    tokens = [self.cls_id, self.bos_id]
    query_span = response_span = (0, 0)
    if self.mode == "pretrain":
      text = self._random_text(rng, int(rng.integers(T // 2, T - 2)))
      if label:
        text[int(rng.integers(len(text)))] = MARKER
      tokens += text
      supervised = range(2, len(tokens))
    else:
      query = self._random_text(rng, int(rng.integers(2, T // 4)))
      if label:
        query[int(rng.integers(len(query)))] = MARKER
      tokens += PREFIX
      query_span = (len(tokens), len(tokens) + len(query))
      tokens += query + list(SUFFIX)
      room = T - len(tokens) - 1
      response = list(REFUSAL) if label else []
      response += self._random_text(rng, int(rng.integers(1, room - len(response) + 1)))
      response_span = (len(tokens), len(tokens) + len(response) + 1)  # EOS is part of the response
      tokens += response + [self.eos_id]
      supervised = range(*response_span)
    n = len(tokens)
    loss_mask = np.zeros(T, np.int32)
    loss_mask[list(supervised)] = 1
    return {
      "tokens": np.array(tokens + [PAD] * (T - n), np.int32),
      "segment_ids": (np.arange(T) < n).astype(np.int32),
      "positions": np.where(np.arange(T) < n, np.arange(T), 0).astype(np.int32),
      "query_span": np.array(query_span, np.int32),
      "response_span": np.array(response_span, np.int32),
      "loss_mask": loss_mask,
      "cls_label": np.int32(label),
    }


def make_data_iterator(config, split: str, shard_index: int, shard_count: int) -> SyntheticIterator:
  cfg = config_lib.model_config(config)
  return SyntheticIterator(
    split=split,
    seed=config.seed,
    mode=config.train.mode,
    seq_len=config.data.seq_len,
    global_batch_size=config.data.global_batch_size,
    shard_index=shard_index,
    shard_count=shard_count,
    vocab_size=cfg.vocab_size,
    bos_id=cfg.bos_id,
    eos_id=cfg.eos_id,
  )
