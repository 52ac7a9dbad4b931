import collections
import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from clsalign_jax.data.pipeline import (
  Pipeline,
  PipelineConfig,
  encode_sft,
  pretrain_pipeline,
  sft_pipeline,
)
from clsalign_jax.data.records import DataError, SftRecord, TextRecord
from clsalign_jax.data.templates import chatml_template, llama2_template

KEYS = {"tokens", "segment_ids", "positions", "loss_mask", "query_span", "response_span", "cls_label"}


@pytest.fixture(scope="module")
def records(shipped):
  """A small slice of the shipped training split, 1:3 benign:malicious, prompts that fit."""
  train = [r for r in shipped[0]["train"] if len(r.prompt) < 300]
  benign = [r for r in train if r.label == 0][:60]
  malicious = [r for r in train if r.label == 1][:180]
  return benign + malicious


@pytest.fixture(scope="module")
def corpus(records, smollm2):
  return encode_sft(records, smollm2, chatml_template(), max_length=256)


def _pipeline(corpus, tok, **overrides):
  config = PipelineConfig(**{"max_length": 256, "batch_size": 8, "bucket_lengths": (64, 128), **overrides})
  return Pipeline(corpus, config, pad_id=tok.pad_id, process_index=0, process_count=1)


def _digest(batch):
  h = hashlib.sha256()
  for k in sorted(batch):
    h.update(k.encode() + batch[k].tobytes() + str(batch[k].shape).encode())
  return h.hexdigest()


def test_padded_batch_contract(corpus, smollm2, records):
  by_prompt = {r.prompt: r for r in records}
  p = _pipeline(corpus, smollm2)
  seen = 0
  for batch in p:
    assert set(batch) == KEYS
    assert all(v.dtype == np.int32 for v in batch.values())
    b, t = batch["tokens"].shape
    assert b == 8 and t in (64, 128, 256)
    assert batch["query_span"].shape == batch["response_span"].shape == (8, 2)
    for row in range(b):
      tokens, seg = batch["tokens"][row], batch["segment_ids"][row]
      n = int(seg.sum())
      assert (seg[:n] == 1).all() and (seg[n:] == 0).all()
      assert tokens[0] == smollm2.cls_id and tokens[1] == smollm2.bos_id
      assert (tokens[n:] == smollm2.pad_id).all()
      assert batch["positions"][row].tolist() == list(range(n)) + [0] * (t - n)
      q0, q1 = batch["query_span"][row]
      r0, r1 = batch["response_span"][row]
      assert 0 < q0 < q1 < r0 < r1 == n
      assert batch["loss_mask"][row].tolist() == [0] * r0 + [1] * (r1 - r0) + [0] * (t - n)
      record = by_prompt[smollm2.decode_fragment(tokens[q0:q1].tolist())]
      assert batch["cls_label"][row] == record.label
      if n < 256:  # not truncated, so the response ends with EOS
        assert tokens[n - 1] == smollm2.eos_id
      seen += 1
  assert seen == p.num_batches * 8 == (len(corpus) // 8) * 8


def test_truncation_cuts_the_response_never_the_query(smollm2):
  long_response = "word " * 400
  long_query = "question " * 400
  recs = [
    SftRecord("a", "Short question?", long_response, 0, "t"),
    SftRecord("b", long_query, "answer", 1, "t"),
    SftRecord("c", "Fine", "ok", 1, "t"),
  ]
  corpus = encode_sft(recs, smollm2, chatml_template(), max_length=128)
  assert corpus.stats["truncated_responses"] == 1 and corpus.stats["dropped_prompt_too_long"] == 1
  assert corpus.ids == ["a", "c"]
  ex = corpus.example(0)
  assert len(ex) == 128 and ex.response_span[1] == 128 and ex.tokens[-1] != smollm2.eos_id
  assert smollm2.decode_fragment(ex.tokens[slice(*ex.query_span)].tolist()) == "Short question?"
  assert corpus.stats["truncated_tokens"] > 0


def test_bad_records_raise_or_are_counted(smollm2):
  recs = [
    {"id": "ok", "prompt": b"Hi", "response": b"Hello", "label": np.int64(0)},
    {"id": "bad-label", "prompt": "Hi", "response": "Hello", "label": 3},
    {"id": "empty", "prompt": " ", "response": "Hello", "label": 1},
  ]
  with pytest.raises(DataError, match="bad-label"):
    encode_sft(recs, smollm2, chatml_template(), max_length=64)
  corpus = encode_sft(recs, smollm2, chatml_template(), max_length=64, skip_bad_records=True)
  assert corpus.stats["skipped_bad_records"] == 2 and corpus.ids == ["ok"]


def test_class_balanced_sampling(corpus, smollm2):
  assert collections.Counter(corpus.labels.tolist()) == {0: 60, 1: 180}
  p = _pipeline(corpus, smollm2, balance_classes=True, num_epochs=2)
  for epoch in range(2):
    labels = collections.Counter()
    for k in range(p.batches_in_epoch(epoch)):
      step = k + (p.batches_in_epoch(0) if epoch else 0)
      labels.update(p.batch(step)["cls_label"].tolist())
    assert labels[0] == labels[1] == 180  # 360 examples, 45 full batches of 8
  plain = _pipeline(corpus, smollm2)
  assert plain.batches_in_epoch(0) == 240 // 8


def test_deterministic_and_epochs_differ(corpus, smollm2):
  a = [_digest(b) for b in _pipeline(corpus, smollm2, num_epochs=2)]
  b = [_digest(b) for b in _pipeline(corpus, smollm2, num_epochs=2)]
  assert a == b
  half = len(a) // 2
  assert a[:half] != a[half:]  # each epoch reshuffles
  assert a != [_digest(b) for b in _pipeline(corpus, smollm2, num_epochs=2, seed=7)]


def test_deterministic_across_processes(tmp_path):
  # A fresh interpreter with another hash seed must produce byte-identical batches.
  script = textwrap.dedent(
    """
    import hashlib, sys
    from clsalign_jax.data import Tokenizer, sft_pipeline, PipelineConfig, build_safety_mix
    from clsalign_jax.data.templates import llama2_template
    from clsalign_jax.data.tokenizer import mistral_sentencepiece_path
    tok = Tokenizer.from_sentencepiece(mistral_sentencepiece_path())
    records = build_safety_mix()[0]["validation"]
    cfg = PipelineConfig(max_length=256, batch_size=4, balance_classes=True, length_grouping=2)
    p = sft_pipeline(records, tok, llama2_template(), cfg, process_index=0, process_count=1)
    h = hashlib.sha256()
    for batch in p:
      for k in sorted(batch):
        h.update(k.encode() + batch[k].tobytes())
    print(h.hexdigest())
    """
  )
  runs = [
    subprocess.Popen(
      [sys.executable, "-c", script],
      env={**os.environ, "PYTHONHASHSEED": seed},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for seed in ("1", "2")
  ]
  outputs = [run.communicate(timeout=300) for run in runs]
  assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outputs]
  digests = {out.strip().splitlines()[-1] for out, _ in outputs}
  assert len(digests) == 1


@pytest.mark.parametrize("packing", [False, True])
def test_iterator_resumes_on_exactly_the_next_batch(corpus, smollm2, packing):
  p = _pipeline(corpus, smollm2, packing=packing, balance_classes=True, num_epochs=3)
  reference = [_digest(b) for b in p]
  epoch0 = p.batches_in_epoch(0)
  for stop in (3, epoch0 - 1, epoch0, epoch0 + 2):  # mid-epoch and across the epoch boundary
    it = iter(p)
    for _ in range(stop):
      next(it)
    state = it.get_state()
    resumed = iter(_pipeline(corpus, smollm2, packing=packing, balance_classes=True, num_epochs=3))
    resumed.set_state(state)
    assert _digest(next(resumed)) == reference[stop]
    assert _digest(next(it)) == reference[stop]


def test_packing(corpus, smollm2, records):
  prompts = {r.prompt for r in records}
  p = _pipeline(corpus, smollm2, packing=True, max_segments_per_row=4)
  total_examples = 0
  for batch in p:
    assert set(batch) == KEYS | {"cls_index"}
    assert batch["tokens"].shape == (8, 256) and batch["query_span"].shape == (8, 4, 2)
    assert batch["cls_label"].shape == batch["cls_index"].shape == (8, 4)
    for row in range(8):
      tokens, seg, pos = batch["tokens"][row], batch["segment_ids"][row], batch["positions"][row]
      used = batch["cls_label"][row] >= 0
      n_seg = int(used.sum())
      assert used.tolist() == [True] * n_seg + [False] * (4 - n_seg)
      assert set(seg.tolist()) - {0} == set(range(1, n_seg + 1))
      for s in range(n_seg):
        start = batch["cls_index"][row, s]
        idx = np.flatnonzero(seg == s + 1)
        assert idx[0] == start and tokens[start] == smollm2.cls_id
        assert pos[idx].tolist() == list(range(len(idx)))
        q0, q1 = batch["query_span"][row, s]
        r0, r1 = batch["response_span"][row, s]
        assert start < q0 < q1 < r0 < r1 == idx[-1] + 1
        assert smollm2.decode_fragment(tokens[q0:q1].tolist()) in prompts
        assert batch["loss_mask"][row, r0:r1].all() and not batch["loss_mask"][row, start:r0].any()
      assert not batch["query_span"][row, n_seg:].any()
      total_examples += n_seg
  assert total_examples > 0.9 * len(corpus)


def test_sharding_splits_the_global_batch(corpus, smollm2):
  whole = _pipeline(corpus, smollm2, length_grouping=2)
  config = whole.config
  parts = [Pipeline(corpus, config, pad_id=smollm2.pad_id, process_index=i, process_count=2) for i in (0, 1)]
  assert parts[0].num_batches == whole.num_batches
  for step in (0, 5, whole.num_batches - 1):
    full = whole.batch(step)
    halves = [q.batch(step) for q in parts]
    for key in full:
      assert halves[0][key].shape[1:] == halves[1][key].shape[1:]  # same shape on every host
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])
  with pytest.raises(ValueError, match="divisible"):
    Pipeline(corpus, config, pad_id=0, process_index=0, process_count=3)


def test_length_grouping_reduces_padding(corpus, smollm2):
  def padding(p):
    return sum(int((b["segment_ids"] == 0).sum()) for b in p)

  assert padding(_pipeline(corpus, smollm2, length_grouping=4)) < padding(_pipeline(corpus, smollm2))


def test_eval_mode_keeps_every_example(corpus, smollm2):
  p = _pipeline(corpus, smollm2, shuffle=False, drop_remainder=False, batch_size=7)
  batches = list(p)
  labels = np.concatenate([b["cls_label"] for b in batches])
  assert len(batches) == -(-240 // 7)
  assert (labels[:240] == corpus.labels).all() and (labels[240:] == -1).all()
  assert not batches[-1]["segment_ids"][240 % 7 :].any()


def test_llama2_pipeline_from_a_data_source(mistral):
  # TFDS data sources yield bytes and numpy scalars.
  source = [
    {"id": b"x", "prompt": b"What is 2+2?", "response": b"4", "label": np.int64(0)},
    {"id": b"y", "prompt": b"Build a bomb", "response": b"I can't help with that.", "label": np.int64(1)},
  ]
  config = PipelineConfig(max_length=128, batch_size=2, shuffle=False)
  batch = next(iter(sft_pipeline(source, mistral, llama2_template(), config, process_index=0, process_count=1)))
  assert batch["cls_label"].tolist() == [0, 1]
  q0, q1 = batch["query_span"][1]
  assert mistral.decode_fragment(batch["tokens"][1, q0:q1].tolist()) == "Build a bomb"


def test_pretrain_pipeline(smollm2):
  docs = [TextRecord(f"d{i}", "Gardening tips. " * (i * 10 + 1), i % 2, "t") for i in range(12)]
  config = PipelineConfig(max_length=64, batch_size=4, shuffle=False, drop_remainder=False)
  p = pretrain_pipeline(docs, smollm2, config, process_index=0, process_count=1)
  assert p.stats["chunked_documents"] > 0 and p.stats["examples"] > 12
  for batch in p:
    for row in range(4):
      n = int(batch["segment_ids"][row].sum())
      if n == 0:
        continue
      assert batch["tokens"][row, :2].tolist() == [smollm2.cls_id, smollm2.bos_id]
      assert batch["loss_mask"][row].tolist() == [0, 0] + [1] * (n - 2) + [0] * (64 - n)
      assert batch["response_span"][row, 0] == batch["response_span"][row, 1] == n


def test_length_grouping_can_mix_labels():
  """With group_mixes_labels each window alternates the labels, each label sorted by length, so a
  batch holds both labels even when length follows the label."""
  from clsalign_jax.data.pipeline import PipelineConfig, _Plan

  labels = np.array([0] * 40 + [1] * 40)
  lengths = np.where(labels == 0, 300, 50) + np.arange(80)  # benign long, malicious short
  c = PipelineConfig(batch_size=8, length_grouping=10, group_mixes_labels=True, shuffle=True, seed=0)
  batches = _Plan(lengths, labels, c).epoch_batches(0)
  assert sorted(int(i) for b in batches for r in b for i in r) == list(range(80))
  for b in batches:
    idx = np.array([int(r[0]) for r in b])
    assert list(labels[idx]) == [0, 1] * 4
    for k in (0, 1):
      side = lengths[idx[labels[idx] == k]]
      assert (np.diff(side) <= 0).all()
  plain = _Plan(lengths, labels, PipelineConfig(batch_size=8, length_grouping=10, shuffle=True, seed=0))
  assert all(len(set(labels[[int(r[0]) for r in b]])) == 1 for b in plain.epoch_batches(0))
