"""Prometheus metrics of one server (its own registry, so servers in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
  def __init__(self):
    r = self.registry = CollectorRegistry()
    self.requests = Counter(
      "clsalign_requests", "HTTP API requests by endpoint and status code.", ["endpoint", "status"], registry=r
    )
    self.prompt_tokens = Counter("clsalign_prompt_tokens", "Prompt tokens ([CLS] and template included).", registry=r)
    self.completion_tokens = Counter("clsalign_completion_tokens", "Generated tokens returned.", registry=r)
    self.refusals = Counter(
      "clsalign_refusals_inserted", "Responses with an inserted refusal prefix.", ["rule"], registry=r
    )
    self.malicious_prompts = Counter(
      "clsalign_malicious_prompts", "Prompts judged malicious at prompt time (p above the threshold).", registry=r
    )
    self.queue_depth = Gauge("clsalign_queue_depth", "Requests waiting for a batch.", registry=r)
    self.running = Gauge("clsalign_running_rows", "Requests in the batch being decoded.", registry=r)
    self.batches = Counter("clsalign_batches", "Decode batches run, by batch-size bucket.", ["batch"], registry=r)
    self.compiles = Gauge("clsalign_compiles", "Decode-loop compilations so far (warm-up included).", registry=r)
    self.latency = Histogram(
      "clsalign_request_seconds",
      "Time from submission to the finished generation.",
      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
      registry=r,
    )
    self.queue_wait = Histogram(
      "clsalign_queue_wait_seconds",
      "Time a request waited before its batch started.",
      buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
      registry=r,
    )

  def exposition(self) -> bytes:
    return generate_latest(self.registry)
