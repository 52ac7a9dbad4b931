"""Request queue and batching in front of the jitted decode loop; no HTTP here.

Shapes: the decode loop compiles once per (batch rows B, padded prompt length P, max_new_tokens M)
(every other input, sampling settings included, is traced). The engine picks each from a fixed
bucket list, so after `warmup()` has run every combination once no request ever recompiles:
* M: the smallest max-tokens bucket >= the request's max_tokens. Requests are grouped by M, so no
  row is decoded for longer than its own bucket allows; a row stops at its bucket and its response
  is cut at its own max_tokens (see `finish_row`).
* P: the smallest prompt bucket >= the longest prompt (with [CLS], template and prefill) in the batch.
* B: the smallest batch bucket >= the number of requests; the free rows repeat the first request
  (same prompt, same seed), so they finish with it and never lengthen the loop.

Scheduling: one worker thread decodes one batch at a time. It takes the oldest waiting request,
then waits at most `max_wait_ms` for more requests of the same M bucket to fill the largest batch
bucket, and decodes them together. A request therefore waits for at most the batch in flight plus
`max_wait_ms` before its own batch starts.

Cut at max_tokens: a row decoded with a longer budget than its request's max_tokens gives the same
first max_tokens tokens, with one difference: a flip first seen within tau re-classifications of
the row's own end can be confirmed (and the refusal inserted at S_t < max_tokens) where a decode
with exactly max_tokens would have stopped before confirming it.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

from clsalign_jax.data.templates import SpanError
from clsalign_jax.decode.loop import (
  RowResult,
  StreamEvent,
  decode,
  pack_inputs,
  register_stream,
  row_results,
  unregister_stream,
)
from clsalign_jax.decode.sampling import Sampling
from clsalign_jax.decode.text import Decoder, Encoded, refusal_ids
from clsalign_jax.serve.metrics import Metrics
from clsalign_jax.serve.protocol import APIError

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass(frozen=True)
class Buckets:
  """The shapes the decode loop is compiled for (module docstring) and the batching window."""

  batch: tuple[int, ...] = (1, 4, 8)
  prompt: tuple[int, ...] = (256, 1024)
  max_tokens: tuple[int, ...] = (64, 256)
  # How long the oldest waiting request may wait for others to join its batch.
  # Long enough for clients answered by one batch to come back together (docs/performance.md).
  max_wait_ms: float = 30.0
  # Requests waiting beyond this are refused (503) instead of queued.
  max_queue: int = 256

  def __post_init__(self):
    for name in ("batch", "prompt", "max_tokens"):
      values = tuple(int(v) for v in getattr(self, name))
      if not values or any(v < 1 for v in values):
        raise ValueError(f"buckets.{name}={values}: give positive sizes")
      object.__setattr__(self, name, tuple(sorted(set(values))))
    if self.max_wait_ms < 0:
      raise ValueError(f"buckets.max_wait_ms={self.max_wait_ms} must be >= 0")
    if self.max_queue < 1:
      raise ValueError(f"buckets.max_queue={self.max_queue} must be >= 1")

  def shapes(self) -> list[tuple[int, int, int]]:
    return [(b, p, m) for m in self.max_tokens for p in self.prompt for b in self.batch]


def _ceil(values: Sequence[int], n: int) -> int | None:
  return next((v for v in values if v >= n), None)


class StepEvent(NamedTuple):
  """One row's view of a decode-loop step (`decode.loop.StreamEvent`), in response coordinates
  (index 0 = the first response token, an attacker prefill's first token when there is one)."""

  step: int  # 0: after the prompt pass; s + 1: after loop step s
  stable_ids: list[int]  # response tokens no later rollback can change
  done: bool
  p_malicious: float  # NaN where the row was not re-classified at this step
  insert_index: int  # where the refusal prefix starts; -1 while none was inserted


class Job:
  """One request's way through the engine. `on_done(job)` is called from the worker thread and
  `on_step(event)` from XLA's callback thread (neither may block); `wait()` blocks for the result."""

  def __init__(self, encoded: Encoded, max_tokens: int, sampling: Sampling, m_bucket: int):
    self.encoded = encoded
    self.max_tokens = max_tokens
    self.sampling = sampling
    self.m_bucket = m_bucket
    self.result: RowResult | None = None
    self.error: BaseException | None = None
    self.cancelled = False
    self.submitted_at = time.perf_counter()
    self.started_at: float | None = None
    self.finished_at: float | None = None
    self.batch_shape: tuple[int, int, int] | None = None
    self.on_done: Callable[[Job], None] | None = None
    self.on_step: Callable[[StepEvent], None] | None = None
    self._done = threading.Event()

  @property
  def input_len(self) -> int:
    return len(self.encoded.prompt) + len(self.encoded.prefill)

  def cancel(self) -> None:
    """The client went away: drop it from the queue, or discard its row when it is decoded."""
    self.cancelled = True

  def wait(self, timeout: float | None = None) -> RowResult:
    if not self._done.wait(timeout):
      raise TimeoutError("generation did not finish in time")
    if self.error is not None:
      raise self.error
    return self.result

  def _finish(self, result: RowResult | None, error: BaseException | None = None) -> None:
    self.result, self.error = result, error
    self.finished_at = time.perf_counter()
    self._done.set()
    if self.on_done is not None:
      try:
        self.on_done(self)
      except Exception:  # noqa: BLE001 - e.g. the server's event loop already closed: the client is gone
        logging.exception("a finished request could not be handed back")


class Engine:
  """Batches requests into the decode loop (module docstring).

  `decoder` holds the loaded checkpoint (placed params, tokenizer, template, decode settings);
  its dcfg.max_new_tokens is replaced by each batch's bucket. Each step of a batch is handed to
  its jobs' `on_step` while the batch decodes (the loop's streaming hook).
  """

  def __init__(self, decoder: Decoder, buckets: Buckets = Buckets(), metrics: Metrics | None = None):
    cfg = decoder.cfg
    longest = buckets.prompt[-1] + buckets.max_tokens[-1]
    if longest > cfg.max_seq_len:
      raise ValueError(
        f"buckets: the longest prompt bucket ({buckets.prompt[-1]}) plus the longest max-tokens bucket "
        f"({buckets.max_tokens[-1]}) is {longest}, past the model's context of {cfg.max_seq_len} tokens"
      )
    self.decoder, self.buckets = decoder, buckets
    self.cfg, self.tokenizer, self.template, self.dcfg = cfg, decoder.tokenizer, decoder.template, decoder.dcfg
    self.refusal_R = jnp.asarray(refusal_ids(self.tokenizer, self.dcfg), jnp.int32)
    self.eos_id = decoder.eos_id
    self.metrics = metrics or Metrics()
    self.shapes_run: set[tuple[int, int, int]] = set()
    self.compiles = 0  # backend compilations on the worker thread (the decode loop's)
    self.batches_run = 0
    self._queue: collections.deque[Job] = collections.deque()
    self._cond = threading.Condition()
    self._worker: threading.Thread | None = None
    self._stopping = False
    self._local = threading.local()  # .decoding: this thread is inside this engine's decode call
    jax.monitoring.register_event_duration_secs_listener(self._on_jax_event)

  # ----- requests -----

  def encode(self, query: str, prefill: str = "") -> Encoded:
    try:
      return self.decoder.encode(query, prefill)
    except SpanError as err:
      raise APIError(f"the query cannot be tokenised losslessly: {err}", param="messages") from None

  @property
  def max_prompt_tokens(self) -> int:
    return self.buckets.prompt[-1]

  @property
  def max_tokens_limit(self) -> int:
    return self.buckets.max_tokens[-1]

  def make_job(self, encoded: Encoded, max_tokens: int, sampling: Sampling) -> Job:
    """A job for `encoded`, or an APIError naming what does not fit."""
    if not 1 <= max_tokens <= self.max_tokens_limit:
      raise APIError(
        f"max_tokens={max_tokens}: must lie in [1, {self.max_tokens_limit}] (this server's budget)",
        param="max_tokens",
        code="invalid_value",
      )
    n = len(encoded.prompt) + len(encoded.prefill)
    if n > self.max_prompt_tokens or n + max_tokens > self.cfg.max_seq_len:
      raise APIError(
        f"the prompt is {n} tokens ([CLS], chat template and prefill included); this server takes at most "
        f"{self.max_prompt_tokens}, and with max_tokens={max_tokens} at most {self.cfg.max_seq_len} in all",
        param="messages",
        code="context_length_exceeded",
      )
    return Job(encoded, max_tokens, sampling, _ceil(self.buckets.max_tokens, max_tokens))

  def submit(self, job: Job) -> Job:
    with self._cond:
      if self._stopping:
        raise APIError("the server is shutting down", status=503, code="shutting_down")
      if len(self._queue) >= self.buckets.max_queue:
        raise APIError(
          f"{len(self._queue)} requests are waiting; try again later",
          status=503,
          code="queue_full",
          type="server_error",
        )
      self._queue.append(job)
      self.metrics.queue_depth.set(len(self._queue))
      self._cond.notify_all()
    return job

  def generate(self, query: str, prefill: str = "", max_tokens: int = 16, sampling: Sampling = Sampling()) -> Job:
    """Encode, submit and wait: the blocking convenience (tests, warm-up)."""
    job = self.submit(self.make_job(self.encode(query, prefill), max_tokens, sampling))
    job.wait()
    return job

  # ----- worker -----

  def start(self) -> Engine:
    if self._worker is None:
      self._worker = threading.Thread(target=self._loop, name="clsalign-decode", daemon=True)
      self._worker.start()
    return self

  def stop(self, timeout: float = 30.0) -> None:
    with self._cond:
      self._stopping = True
      pending = list(self._queue)
      self._queue.clear()
      self._cond.notify_all()
    for job in pending:
      job._finish(None, APIError("the server is shutting down", status=503, code="shutting_down"))
    if self._worker is not None:
      self._worker.join(timeout)

  def warmup(self, query: str = "Hello") -> None:
    """Compile every bucket combination once (the first request of a shape would otherwise pay it).

    Only the first combination decodes in full; the others stop at their first token: the stop
    token is a traced input (no recompile), set to the token that greedy decoding picks first."""
    enc = self.encode(query)
    first = None
    for B, P, M in self.buckets.shapes():
      start = time.perf_counter()
      rows = self._decode_rows([enc] * B, [Sampling()] * B, P, M, eos_override=first)
      logging.info("warm-up: batch %d x prompt %d x max_tokens %d in %.1f s", B, P, M, time.perf_counter() - start)
      if first is None and rows[0].response_ids and rows[0].insert_index < 0:
        first = rows[0].response_ids[0]

  def queue_depth(self) -> int:
    with self._cond:
      return len(self._queue)

  def _on_jax_event(self, event: str, duration: float, **kwargs) -> None:
    if event == _COMPILE_EVENT and getattr(self._local, "decoding", False):
      self.compiles += 1
      self.metrics.compiles.set(self.compiles)

  def _take_batch(self) -> list[Job] | None:
    """The next batch (module docstring), or None when stopping."""
    most = self.buckets.batch[-1]
    with self._cond:
      while True:
        while not self._stopping and not self._queue:
          self._cond.wait()
        if self._stopping:
          return None
        self._drop_cancelled()
        if not self._queue:
          continue
        m = self._queue[0].m_bucket
        deadline = self._queue[0].submitted_at + self.buckets.max_wait_ms / 1000
        while not self._stopping:
          same = [j for j in self._queue if j.m_bucket == m]
          left = deadline - time.perf_counter()
          if len(same) >= most or left <= 0:
            break
          self._cond.wait(left)
        self._drop_cancelled()
        batch = [j for j in self._queue if j.m_bucket == m][:most]
        if not batch:
          continue
        for j in batch:
          self._queue.remove(j)
        self.metrics.queue_depth.set(len(self._queue))
        return batch

  def _drop_cancelled(self) -> None:
    for j in [j for j in self._queue if j.cancelled]:
      self._queue.remove(j)
      j._finish(None, APIError("the client disconnected", status=499, code="cancelled"))

  def _loop(self) -> None:
    while True:
      batch = self._take_batch()
      if batch is None:
        return
      try:
        self._run(batch)
      except Exception as e:  # noqa: BLE001 - one failed batch must not end the worker
        for job in batch:
          if job.finished_at is None:
            job._finish(None, APIError(f"decoding failed: {type(e).__name__}: {e}", status=500))

  def _run(self, jobs: list[Job]) -> None:
    now = time.perf_counter()
    for j in jobs:
      j.started_at = now
      self.metrics.queue_wait.observe(now - j.submitted_at)
    self.metrics.running.set(len(jobs))
    M = jobs[0].m_bucket
    P = _ceil(self.buckets.prompt, max(j.input_len for j in jobs))
    B = _ceil(self.buckets.batch, len(jobs))
    rows = self._decode_rows(
      [j.encoded for j in jobs], [j.sampling for j in jobs], P, M, B, stepped=[j.on_step for j in jobs]
    )
    self.metrics.running.set(0)
    self.metrics.batches.labels(batch=str(B)).inc()
    for job, row in zip(jobs, rows):
      job.batch_shape = (B, P, M)
      self.metrics.latency.observe(time.perf_counter() - job.submitted_at)
      job._finish(row)

  def _decode_rows(
    self,
    encoded: list[Encoded],
    sampling: list[Sampling],
    P: int,
    M: int,
    B: int | None = None,
    stepped: list | None = None,
    eos_override: int | None = None,
  ) -> list[RowResult]:
    """Decode `encoded` padded to B rows (the free rows repeat row 0); the real rows' results."""
    n = len(encoded)
    B = B or n
    pad = lambda xs: list(xs) + [xs[0]] * (B - n)
    encoded, sampling = pad(encoded), pad(sampling)
    inputs = pack_inputs(
      [e.prompt for e in encoded], [e.query_span for e in encoded], [e.prefill for e in encoded], pad_to=P
    )
    start_B = [len(e.prompt) for e in encoded]
    listeners = list(stepped or [])

    def on_event(ev: StreamEvent) -> None:  # on XLA's thread: hand over, never block
      for b, fn in enumerate(listeners):
        if fn is None:
          continue
        step = StepEvent(
          ev.step,
          ev.seq_BS[b, start_B[b] : max(int(ev.stable_B[b]), start_B[b])].tolist(),
          bool(ev.done_B[b]),
          float(ev.p_B[b]),
          int(ev.insert_pos_B[b]) - start_B[b] if ev.insert_pos_B[b] >= 0 else -1,
        )
        try:
          fn(step)
        except Exception:  # noqa: BLE001 - a listener's bug must not fail the other rows' batch
          logging.exception("stream listener of row %d failed", b)

    dcfg = self.dcfg.replace(max_new_tokens=M)
    # Every batch streams (one compiled program per bucket whether a client streams or not).
    sid = register_stream(on_event)
    self._local.decoding = True
    try:
      out = decode(
        self.decoder.params,
        inputs,
        self.refusal_R,
        Sampling.batch(sampling),
        cfg=self.cfg,
        dcfg=dcfg,
        eos_id=self.eos_id if eos_override is None else eos_override,
        stream_to=sid,
      )
      rows = row_results(out, inputs)[:n]
    finally:
      self._local.decoding = False
      unregister_stream(sid)
    self.shapes_run.add((B, P, M))
    self.batches_run += 1
    return rows
