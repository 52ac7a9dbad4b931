"""clsalign_jax.serve.engine (batching, bucketing, cancellation, streaming steps) without HTTP, and
clsalign_jax.serve.render (a row as the API returns it) on hand-built rows.

The engines here share the session server's decoder, so every shape they run was compiled by its
warm-up: each test also checks that nothing recompiles."""

import threading

import pytest
from serve_utils import BENIGN, HARMFUL, TEST_BUCKETS

from clsalign_jax.decode.loop import RowResult
from clsalign_jax.decode.sampling import Sampling
from clsalign_jax.serve import render
from clsalign_jax.serve.engine import Buckets, Engine
from clsalign_jax.serve.protocol import APIError


@pytest.fixture()
def engine(tiny_server):
  """A fresh, not yet started engine on the session server's model."""
  e = Engine(tiny_server[1].decoder, TEST_BUCKETS)
  yield e
  e.stop()


def test_buckets_are_checked(engine):
  with pytest.raises(ValueError, match="batch"):
    Buckets(batch=())
  with pytest.raises(ValueError, match="max_wait_ms"):
    Buckets(max_wait_ms=-1)
  with pytest.raises(ValueError, match="past the model's context of 256"):
    Engine(engine.decoder, Buckets(prompt=(250,), max_tokens=(16,)))
  assert Buckets(batch=(8, 1, 8)).batch == (1, 8)


def test_make_job_picks_the_max_tokens_bucket_and_refuses_what_does_not_fit(engine):
  enc = engine.encode(BENIGN)
  assert engine.make_job(enc, 3, Sampling()).m_bucket == 8
  assert engine.make_job(enc, 8, Sampling()).m_bucket == 8
  assert engine.make_job(enc, 9, Sampling()).m_bucket == 16
  for bad in (0, 17):
    with pytest.raises(APIError) as e:
      engine.make_job(enc, bad, Sampling())
    assert e.value.param == "max_tokens" and e.value.status == 400
  with pytest.raises(APIError) as e:
    engine.make_job(engine.encode("word " * 80), 8, Sampling())
  assert e.value.code == "context_length_exceeded"


def test_batches_group_by_bucket_and_match_single_rows(tiny_server, engine):
  jobs = [
    engine.submit(engine.make_job(engine.encode(q), m, Sampling(t, seed=s)))
    for q, m, t, s in [
      (BENIGN, 8, 0.0, 0),
      (HARMFUL, 12, 0.0, 0),
      (HARMFUL, 5, 0.8, 3),
      (BENIGN, 16, 1.0, 7),
      (BENIGN, 8, 0.7, 1),
    ]
  ]
  engine.start()
  rows = [j.wait(120) for j in jobs]
  # The oldest request's bucket goes first, with every waiting request of that bucket.
  assert [j.batch_shape for j in jobs] == [(4, 64, 8), (4, 64, 16), (4, 64, 8), (4, 64, 16), (4, 64, 8)]
  assert engine.batches_run == 2
  # Alone (batch 1, no padding rows) each request decodes to the same row.
  for job, row in zip(jobs, rows):
    alone = engine._decode_rows([job.encoded], [job.sampling], 64, job.m_bucket, 1)[0]
    assert alone.response_ids == row.response_ids and alone.insert_index == row.insert_index
    assert alone.p_initial == pytest.approx(row.p_initial, abs=1e-5)
  assert engine.compiles == 0


def test_stream_steps_end_with_the_finished_row(engine):
  job = engine.make_job(engine.encode(BENIGN), 16, Sampling())
  steps, lock = [], threading.Lock()

  def on_step(ev):
    with lock:
      steps.append(ev)

  job.on_step = on_step
  engine.start().submit(job)
  row = job.wait(120)
  assert [s.step for s in steps] == list(range(len(steps)))
  assert steps[0].p_malicious == pytest.approx(row.p_initial, abs=1e-6)
  assert steps[-1].done and steps[-1].stable_ids == row.response_ids
  for a, b in zip(steps, steps[1:]):  # stable tokens are never taken back
    assert b.stable_ids[: len(a.stable_ids)] == a.stable_ids
  streamed = {s.step - 1: s.p_malicious for s in steps[1:] if s.p_malicious == s.p_malicious}
  assert streamed == pytest.approx({step: p for step, _, p in row.trace}, abs=1e-6)


def test_cancelled_and_overflowing_requests(tiny_server):
  engine = Engine(tiny_server[1].decoder, Buckets(batch=(1, 4), prompt=(64,), max_tokens=(8, 16), max_queue=2))
  try:
    a = engine.submit(engine.make_job(engine.encode(BENIGN), 8, Sampling()))
    b = engine.submit(engine.make_job(engine.encode(HARMFUL), 8, Sampling()))
    with pytest.raises(APIError) as e:
      engine.submit(engine.make_job(engine.encode(BENIGN), 8, Sampling()))
    assert e.value.status == 503 and e.value.code == "queue_full"
    a.cancel()
    engine.start()
    assert b.wait(120).initial_malicious
    with pytest.raises(APIError) as e:
      a.wait(1)
    assert e.value.code == "cancelled"
  finally:
    engine.stop()
  waiting = Engine(tiny_server[1].decoder, TEST_BUCKETS)
  job = waiting.submit(waiting.make_job(waiting.encode(BENIGN), 8, Sampling()))
  waiting.stop()
  with pytest.raises(APIError, match="shutting down"):
    job.wait(1)


def _row(tokenizer, words, prefill_len, insert_index=-1, trigger_step=-1, trace=()):
  ids = [i for w in words for i in tokenizer.encode(w)]
  assert len(ids) == len(words)  # one token per word, so indices are word indices
  return RowResult(ids, prefill_len, 0.9, True, list(trace), trigger_step, insert_index, insert_index, 0)


def test_render_shifts_by_the_prefill_and_cuts(tiny_server):
  engine = tiny_server[1]
  tok, eos = engine.tokenizer, engine.eos_id
  words = [" Sure", " here", " is", " how", " No", " I", " cannot"]
  # Prefill of 2; a flip at step 3 rolled the row back to response index 4, where the refusal went in.
  trace = [(0, 2, 0.1), (1, 3, 0.7), (2, 4, 0.8), (3, 4, 0.9)]
  row = _row(tok, words, 2, insert_index=4, trigger_step=2, trace=trace)
  c = render.complete(row, 16, tok, eos, 0.5, with_trace=True)
  assert c.text == " is how No I cannot" and c.finish_reason == "stop"
  assert c.refusal_index == 2 and c.text[c.refusal_char :] == " No I cannot"
  assert c.clsalign["refusal_cause"] == "flip" and c.clsalign["flip_index"] == 2
  assert [e["index"] for e in c.clsalign["trace"]] == [0, 1, 2, 2]
  cut = render.complete(row, 2, tok, eos, 0.5)
  assert cut.text == " is how" and cut.finish_reason == "length" and not cut.clsalign["refusal_inserted"]
  stopped = render.complete(row, 16, tok, eos, 0.5, stops=[" No", "xyz"])
  assert stopped.text == " is how" and stopped.finish_reason == "stop" and stopped.refusal_index == -1
  ended = render.complete(
    _row(tok, [" Hi", " there"], 0)._replace(response_ids=tok.encode(" Hi there") + [eos]), 3, tok, eos, 0.5
  )
  assert ended.text == " Hi there" and ended.finish_reason == "stop" and len(ended.ids) == 3
