"""The streaming document input (data/streaming.py) against the eager pipeline and brute force."""

import collections
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from clsalign_jax.data.pipeline import PipelineConfig, pretrain_pipeline
from clsalign_jax.data.records import DataError, TextRecord
from clsalign_jax.data.streaming import DocumentStream
from clsalign_jax.data.templates import encode_document

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def docs():
  """Documents from one word to several max_length chunks, labels uneven, every text distinct."""
  rng = np.random.default_rng(3)
  words = ["garden", "river", "1887", "Université", "the", "of", "emoji 😀", "日本語", "—", "\n"]
  out = []
  for i in range(97):
    n = int(rng.choice([1, 5, 20, 40, 90, 200]))
    text = f"Doc {i}: " + " ".join(rng.choice(words, size=n))
    out.append({"id": f"d{i}", "text": text, "label": int(rng.random() < 0.3)})
  return out


def _config(**overrides):
  return PipelineConfig(**{"max_length": MAX_LENGTH, "batch_size": 4, "bucket_lengths": (), **overrides})


def _stream(docs, tok, index=0, count=1, encode_group=7, **overrides):
  return DocumentStream(
    docs, tok, _config(**overrides), process_index=index, process_count=count, encode_group=encode_group
  )


def _equal(a, b):
  return set(a) == set(b) and all(a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a)


def _segments(batches):
  """Every (label, tokens) segment the batches hold, as a multiset."""
  out = collections.Counter()
  for batch in batches:
    labels = batch["cls_label"].reshape(len(batch["tokens"]), -1)
    for r, row in enumerate(batch["segment_ids"]):
      for s in range(1, row.max() + 1):
        out[(int(labels[r, s - 1]), tuple(batch["tokens"][r][row == s].tolist()))] += 1
  return out


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_same_documents_same_order_as_the_eager_pipeline(docs, smollm2, packing, drop_remainder):
  settings = dict(packing=packing, drop_remainder=drop_remainder, max_segments_per_row=3)
  eager = list(pretrain_pipeline(docs, smollm2, _config(shuffle=False, **settings), process_index=0, process_count=1))
  streamed = list(_stream(docs, smollm2, shuffle=False, **settings))
  assert len(streamed) == len(eager) > 10
  assert all(_equal(s, e) for s, e in zip(streamed, eager))
  # Shuffled, the stream reads documents in grain's order; the eager pipeline given that order
  # (unshuffled) packs them into the same bytes.
  stream = _stream(docs, smollm2, seed=5, **settings)
  order = [int(i) for i in stream.document_order()]
  assert sorted(order) == list(range(len(docs))) and order != sorted(order)
  eager = pretrain_pipeline(
    [docs[i] for i in order], smollm2, _config(shuffle=False, **settings), process_index=0, process_count=1
  )
  assert all(_equal(s, e) for s, e in zip(list(stream), list(eager), strict=True))


def _repack(chunks, config, rows_per_batch):
  """Brute-force first fit: each chunk into the first open row (of at most 2·rows) with room."""
  rows, open_rows = [], []
  for c in chunks:
    fits = [
      r for r in open_rows if sum(map(len, r)) + len(c) <= config.max_length and len(r) < config.max_segments_per_row
    ]
    if fits:
      fits[0].append(c)
      continue
    if len(open_rows) == 2 * rows_per_batch:
      rows.append(open_rows.pop(0))
    open_rows.append([c])
  return rows + open_rows


def test_packed_stream_against_brute_force_repacking(docs, smollm2):
  """Two shuffled epochs packed as one stream: every row equals a brute-force re-packing of the
  brute-force token stream (each document through templates.encode_document, in stream order)."""
  config = _config(packing=True, max_segments_per_row=4, num_epochs=2, seed=11, drop_remainder=False)
  stream = DocumentStream(docs, smollm2, config, process_index=0, process_count=1, encode_group=5)
  order = [int(i) for i in stream.document_order()]
  assert len(order) == 2 * len(docs) and order[: len(docs)] != order[len(docs) :]
  chunks = [e for i in order for e in encode_document(smollm2, docs[i]["text"], docs[i]["label"], MAX_LENGTH)]
  rows = _repack(chunks, config, 4)
  rows += [[]] * (-len(rows) % 4)
  batches = list(stream)
  assert len(batches) == len(rows) // 4
  for b, batch in enumerate(batches):
    for r in range(4):
      want = rows[4 * b + r]
      tokens = np.concatenate([e.tokens for e in want]) if want else np.zeros(0, np.int32)
      n = len(tokens)
      assert batch["tokens"][r].tolist() == tokens.tolist() + [smollm2.pad_id] * (MAX_LENGTH - n)
      seg = [s + 1 for s, e in enumerate(want) for _ in e.tokens]
      assert batch["segment_ids"][r].tolist() == seg + [0] * (MAX_LENGTH - n)
      assert batch["positions"][r].tolist() == [p for e in want for p in range(len(e))] + [0] * (MAX_LENGTH - n)
      # Loss on every text token and the EOS, never on [CLS], BOS or padding.
      assert batch["loss_mask"][r].tolist() == [int(p >= 2) for e in want for p in range(len(e))] + [0] * (
        MAX_LENGTH - n
      )
      starts = np.cumsum([0] + [len(e) for e in want])
      k = len(want)
      assert batch["cls_index"][r].tolist() == starts[:-1].tolist() + [0] * (4 - k)
      assert batch["cls_label"][r].tolist() == [e.label for e in want] + [-1] * (4 - k)
      assert batch["query_span"][r].tolist() == [[a + 2, z] for a, z in zip(starts, starts[1:])] + [[0, 0]] * (4 - k)
      assert batch["response_span"][r].tolist() == [[z, z] for z in starts[1:]] + [[0, 0]] * (4 - k)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_gives_exactly_the_uninterrupted_batches(docs, smollm2, packing):
  settings = dict(packing=packing, num_epochs=2, seed=2, drop_remainder=False)
  reference = list(_stream(docs, smollm2, **settings))
  n = len(reference)
  # Mid-group, group and epoch boundaries, the last batch, after the end.
  for stop in sorted({0, 1, 3, 7, n // 2 - 1, n // 2, n // 2 + 1, n - 1, n}):
    it = iter(_stream(docs, smollm2, **settings))
    for _ in range(stop):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = iter(_stream(docs, smollm2, **settings))
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == n - stop
    assert all(_equal(a, b) for a, b in zip(rest, reference[stop:]))
    # Saving does not disturb the saved iterator.
    assert all(_equal(a, b) for a, b in zip(it, reference[stop:], strict=True))


def test_a_state_stays_small(docs, smollm2):
  it = iter(_stream(docs, smollm2, packing=True, num_epochs=None, max_segments_per_row=4))
  sizes = []
  for _ in range(120):  # several epochs
    next(it)
    sizes.append(len(json.dumps(it.get_state())))
  # Open and waiting rows, as (record, chunk) pairs: bounded by 3 batches of rows, whatever the step.
  assert max(sizes) < 2500, max(sizes)


@pytest.mark.parametrize("packing", [False, True])
def test_two_shards_read_the_documents_of_one(docs, smollm2, packing):
  settings = dict(packing=packing, seed=4, drop_remainder=False, max_segments_per_row=3)
  whole = _stream(docs, smollm2, **settings)
  shards = [_stream(docs, smollm2, index=i, count=2, **settings) for i in (0, 1)]
  order = [int(i) for i in whole.document_order()]
  assert [int(i) for i in shards[0].document_order()] == order[0::2]
  assert [int(i) for i in shards[1].document_order()] == order[1::2]
  halves = [list(s) for s in shards]
  assert all(b["tokens"].shape == (2, MAX_LENGTH) for h in halves for b in h)
  assert _segments(halves[0]) + _segments(halves[1]) == _segments(list(whole))
  expected = collections.Counter(
    (d["label"], tuple(e.tokens.tolist()))
    for d in docs
    for e in encode_document(smollm2, d["text"], d["label"], MAX_LENGTH)
  )
  assert _segments(list(whole)) == expected


class _CountingSource:
  def __init__(self, docs):
    self.docs, self.read = docs, set()

  def __len__(self):
    return len(self.docs)

  def __getitem__(self, i):
    self.read.add(i)
    return self.docs[i]


def test_documents_are_read_only_when_needed(docs, smollm2):
  source = _CountingSource(docs)
  stream = DocumentStream(source, smollm2, _config(num_epochs=None), process_index=0, process_count=1, encode_group=4)
  it = iter(stream)
  assert not source.read
  next(it)
  # One batch of 4 rows needs a group or two; read-ahead adds at most the prefetch buffer's groups.
  assert 4 <= len(source.read) <= 4 * 6


def test_bad_documents_raise_or_are_skipped(smollm2):
  docs = [
    TextRecord("ok", "Fine text.", 0, "t"),
    {"id": "empty", "text": " ", "label": 1},
    {"id": "bad-label", "text": "x", "label": 7},
    TextRecord("ok2", "More text.", 1, "t"),
  ]
  with pytest.raises(DataError, match="empty"):
    next(iter(DocumentStream(docs, smollm2, _config(batch_size=2, shuffle=False), process_index=0, process_count=1)))
  stream = DocumentStream(
    docs, smollm2, _config(batch_size=2, shuffle=False, skip_bad_records=True), process_index=0, process_count=1
  )
  (batch,) = list(stream)
  assert batch["cls_label"].tolist() == [0, 1]
  bad = [{"id": f"b{i}", "text": "", "label": 0} for i in range(9)]
  forever = DocumentStream(
    bad, smollm2, _config(num_epochs=None, skip_bad_records=True), process_index=0, process_count=1, encode_group=4
  )
  with pytest.raises(DataError, match="none of the 9 documents"):
    next(iter(forever))
  with pytest.raises(ValueError, match="balance_classes"):
    DocumentStream(docs, smollm2, _config(balance_classes=True), process_index=0, process_count=1)
  with pytest.raises(ValueError, match="divisible"):
    DocumentStream(docs, smollm2, _config(), process_index=0, process_count=3)


def test_worker_processes_give_the_same_batches_and_resume(tmp_path):
  # grain worker processes (spawned) need absl flags parsed and a main guard: a fresh interpreter.
  script = tmp_path / "workers.py"
  script.write_text(
    textwrap.dedent(
      """
    import json
    import numpy as np
    from absl import flags
    from clsalign_jax.data.pipeline import PipelineConfig
    from clsalign_jax.data.streaming import DocumentStream
    from clsalign_jax.data.tokenizer import Tokenizer, smollm2_gguf_path

    def stream(docs, tok, workers):
      config = PipelineConfig(max_length=64, batch_size=4, bucket_lengths=(), packing=True, num_epochs=2,
                              worker_count=workers)
      return DocumentStream(docs, tok, config, process_index=0, process_count=1, encode_group=16)

    def same(a, b):
      return len(a) == len(b) and all(all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))

    if __name__ == "__main__":
      flags.FLAGS(["workers"])
      tok = Tokenizer.from_gguf(smollm2_gguf_path())
      docs = [{"id": f"d{i}", "text": f"Doc {i} " + "word " * (i * 7 % 150), "label": i % 2} for i in range(200)]
      reference = list(stream(docs, tok, 0))
      it = iter(stream(docs, tok, 2))
      for _ in range(21):
        next(it)
      state = json.loads(json.dumps(it.get_state()))
      rest = list(it)
      resumed = iter(stream(docs, tok, 2))
      resumed.set_state(state)
      print("RESULT", len(reference), same(rest, reference[21:]), same(list(resumed), reference[21:]))
    """
    )
  )
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
  result = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
  assert out.returncode == 0 and result, out.stderr[-3000:]
  n, plain, resumed = result[0].split()[1:]
  assert int(n) > 21 and plain == resumed == "True"


def test_training_hook_streams_the_pretraining_corpus(tmp_path, monkeypatch):
  """make_data_iterator's pretraining train split: built once to ArrayRecord, then streamed; its state
  survives JSON and resumes on exactly the next batches; the eval split stays one ordered pass."""
  from clsalign_jax import config as config_lib
  from clsalign_jax.data import sources

  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  docs = tmp_path / "wiki.jsonl"
  docs.write_text(
    "".join(
      json.dumps({"text": f"Article {i}. " + "Some words here. " * (i % 40), "label": int(i % 3 == 0)}) + "\n"
      for i in range(300)
    )
  )
  c = config_lib.default_config()
  with c.unlocked():
    c.model.preset = "smollm2_135m"
    c.init_from = "gguf:smollm2"
    c.train.mode = "pretrain"
    c.data.update(source="wiki_pretrain", files=(str(docs),), tokenizer="smollm2", seq_len=64, global_batch_size=4)
  it = sources.make_data_iterator(c, "train", 0, 1)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(40)]  # past the first epoch's ~100 documents
  resumed = sources.make_data_iterator(c, "train", 0, 1)
  resumed.set_state(state)
  assert all(_equal(next(resumed), e) for e in expected)
  batch = expected[0]
  assert batch["tokens"].shape == (4, 64) and (batch["tokens"][:, :2] == [49152, 1]).all()
  assert (batch["loss_mask"][:, :2] == 0).all() and batch["loss_mask"][:, 2:].any()
  half = next(sources.make_data_iterator(c, "train", 1, 2))
  assert half["tokens"].shape == (2, 64)
  labels = np.concatenate([b["cls_label"] for b in sources.make_data_iterator(c, "validation", 0, 1)])
  assert 0 < (labels >= 0).sum() < 300 * 0.05
