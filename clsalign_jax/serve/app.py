"""HTTP routes: the OpenAI-compatible API, health, Prometheus metrics and the playground page.

Every error is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}` with a 4xx
(5xx only for a failure of the server itself), and no request can end the process: the decode
worker catches a failed batch, and a client that disconnects only has its request dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.resources
import json
import math
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clsalign_jax.serve import render
from clsalign_jax.serve.engine import Engine, Job, Sampling
from clsalign_jax.serve.protocol import (
  APIError,
  ChatCompletionRequest,
  CompletionRequest,
  chat_query,
  check_unsupported,
  completion_query,
  error_body,
)

_SEED_RANGE = 2**31
_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/clsalign/settings")


@dataclasses.dataclass(frozen=True)
class Defaults:
  """What a request that leaves a sampling field out gets (the server's command-line flags)."""

  max_tokens: int = 128
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0


def _static(name: str) -> str:
  return importlib.resources.files("clsalign_jax.serve").joinpath("static", name).read_text(encoding="utf-8")


def _sampling(req, defaults: Defaults) -> tuple[int, Sampling]:
  """(max_tokens, sampling) of a request, each value checked."""
  check_unsupported(req)
  max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
  param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
  max_tokens = defaults.max_tokens if max_tokens is None else max_tokens
  if max_tokens < 1:
    raise APIError(f"{param}={max_tokens}: must be >= 1", param=param, code="invalid_value")
  t = defaults.temperature if req.temperature is None else req.temperature
  if not (math.isfinite(t) and 0 <= t <= 2):
    raise APIError(f"temperature={t}: must lie in [0, 2]", param="temperature", code="invalid_value")
  top_p = defaults.top_p if req.top_p is None else req.top_p
  if not (math.isfinite(top_p) and 0 < top_p <= 1):
    raise APIError(f"top_p={top_p}: must lie in (0, 1]", param="top_p", code="invalid_value")
  top_k = defaults.top_k if req.top_k is None else req.top_k
  if top_k < 0:
    raise APIError(f"top_k={top_k}: must be >= 0 (0: off)", param="top_k", code="invalid_value")
  seed = defaults.seed if req.seed is None else req.seed
  return max_tokens, Sampling(float(t), int(top_k), float(top_p), int(seed) % _SEED_RANGE)


def _param_of(loc) -> str | None:
  parts = [str(x) for x in loc if x != "body"]
  out = ""
  for p in parts:
    out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
  return out or None


def create_app(engine: Engine, model_id: str, defaults: Defaults = Defaults(), info: dict | None = None) -> FastAPI:
  """The server's routes around a started `engine`. `info`: what /v1/clsalign/settings reports
  about the checkpoint (its spec, step)."""
  app = FastAPI(title="clsalign-jax", docs_url=None, redoc_url=None, openapi_url=None)
  metrics = engine.metrics
  tokenizer = engine.tokenizer
  created = int(time.time())
  threshold = engine.dcfg.threshold
  if defaults.max_tokens > engine.max_tokens_limit:
    raise ValueError(f"default max_tokens={defaults.max_tokens} exceeds the budget {engine.max_tokens_limit}")

  # ----- errors -----

  @app.exception_handler(APIError)
  async def _api_error(request: Request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request: Request, e: RequestValidationError):
    errs = e.errors()
    first = errs[0] if errs else {}
    if first.get("type") == "json_invalid":
      return JSONResponse(
        error_body(
          f"the body is not valid JSON: {first.get('msg', '')}", "invalid_request_error", None, "invalid_json"
        ),
        status_code=400,
      )
    param = _param_of(first.get("loc", ()))
    message = "; ".join(f"{_param_of(x.get('loc', ())) or 'body'}: {x.get('msg')}" for x in errs[:3])
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=400)

  @app.exception_handler(StarletteHTTPException)
  async def _http(request: Request, e: StarletteHTTPException):
    kind = "not_found" if e.status_code == 404 else None
    return JSONResponse(
      error_body(f"{request.method} {request.url.path}: {e.detail}", "invalid_request_error", None, kind),
      status_code=e.status_code,
    )

  @app.exception_handler(Exception)
  async def _unexpected(request: Request, e: Exception):
    return JSONResponse(error_body(f"unexpected {type(e).__name__}: {e}", "server_error", None, None), status_code=500)

  @app.middleware("http")
  async def _count(request: Request, call_next):
    response = await call_next(request)
    path = request.url.path
    if path.startswith("/v1/"):
      # Known routes only: a label per arbitrary path would grow the metrics without bound.
      endpoint = "/v1/models/{id}" if path.startswith("/v1/models/") else path if path in _ROUTES else "other"
      metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
    return response

  # ----- plain routes -----

  @app.get("/", response_class=HTMLResponse)
  async def playground():
    return HTMLResponse(_static("index.html"))

  @app.get("/playground.js")
  async def playground_js():
    return Response(_static("playground.js"), media_type="text/javascript")

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model_id, "queue_depth": engine.queue_depth()}

  @app.get("/metrics")
  async def prometheus():
    return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

  def model_card() -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "clsalign-jax"}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [model_card()]}

  @app.get("/v1/models/{name:path}")
  async def model(name: str):
    check_model(name)
    return model_card()

  @app.get("/v1/clsalign/settings")
  async def settings():
    d = engine.dcfg
    return {
      "model": model_id,
      "defaults": dataclasses.asdict(defaults),
      "max_tokens_limit": engine.max_tokens_limit,
      "max_prompt_tokens": engine.max_prompt_tokens,
      "decode": {
        k: getattr(d, k)
        for k in (
          "threshold",
          "schedule",
          "tau",
          "r1",
          "r2",
          "r3",
          "refusal_text",
          "strategic_attention",
          "strategic_decoding",
          "response_sees_cls",
          "end_after_refusal",
        )
      },
      "buckets": dataclasses.asdict(engine.buckets),
      "checkpoint": info or {},
    }

  def check_model(name: str) -> None:
    if name != model_id:
      raise APIError(
        f"model {name!r} does not exist; this server serves {model_id!r} (GET /v1/models)",
        status=404,
        param="model",
        code="model_not_found",
      )

  # ----- generation -----

  async def run_job(job: Job) -> Job:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    job.on_done = lambda j: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(j))
    engine.submit(job)
    try:
      await done
    except asyncio.CancelledError:
      job.cancel()
      raise
    if job.error is not None:
      raise job.error
    return job

  def finish(job: Job, req) -> render.Completion:
    c = render.complete(
      job.result, job.max_tokens, tokenizer, engine.eos_id, engine.dcfg.threshold, req.stop, req.clsalign.trace
    )
    metrics.prompt_tokens.inc(job.input_len)
    metrics.completion_tokens.inc(len(c.ids))
    if c.clsalign["malicious"]:
      metrics.malicious_prompts.inc()
    if c.refusal_index >= 0:
      metrics.refusals.labels(rule=c.clsalign["refusal_cause"]).inc()
    return c

  def usage(job: Job, c: render.Completion) -> dict:
    return {"prompt_tokens": job.input_len, "completion_tokens": len(c.ids), "total_tokens": job.input_len + len(c.ids)}

  def prepare(req, query: str, prefill: str) -> Job:
    """The engine's job for a request whose model the route has checked first (its error comes
    before any about the messages)."""
    max_tokens, sampling = _sampling(req, defaults)
    return engine.make_job(engine.encode(query, prefill), max_tokens, sampling)

  @app.post("/v1/chat/completions")
  async def chat(req: ChatCompletionRequest, request: Request):
    check_model(req.model)
    query, prefill = chat_query(req)
    job = prepare(req, query, prefill)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    if req.stream:
      return sse(job, req, request, rid, chat=True)
    await run_job(job)
    c = finish(job, req)
    return {
      "id": rid,
      "object": "chat.completion",
      "created": int(time.time()),
      "model": model_id,
      "choices": [
        {
          "index": 0,
          "message": {"role": "assistant", "content": c.text},
          "finish_reason": c.finish_reason,
          "logprobs": None,
          "clsalign": c.clsalign,
        }
      ],
      "usage": usage(job, c),
    }

  @app.post("/v1/completions")
  async def completions(req: CompletionRequest, request: Request):
    check_model(req.model)
    job = prepare(req, completion_query(req), "")
    rid = f"cmpl-{uuid.uuid4().hex}"
    if req.stream:
      return sse(job, req, request, rid, chat=False)
    await run_job(job)
    c = finish(job, req)
    return {
      "id": rid,
      "object": "text_completion",
      "created": int(time.time()),
      "model": model_id,
      "choices": [
        {"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None, "clsalign": c.clsalign}
      ],
      "usage": usage(job, c),
    }

  def sse(job: Job, req, request: Request, rid: str, chat: bool) -> StreamingResponse:
    obj = "chat.completion.chunk" if chat else "text_completion"
    created_at = int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(text: str | None, finish_reason=None, extra: dict | None = None, first: bool = False) -> str:
      if chat:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
      else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
      if extra is not None:
        choice["clsalign"] = extra
      body = {"id": rid, "object": obj, "created": created_at, "model": model_id, "choices": [choice]}
      return f"data: {json.dumps(body)}\n\n"

    async def events():
      loop = asyncio.get_running_loop()
      queue: asyncio.Queue = asyncio.Queue()
      job.on_step = lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)
      job.on_done = lambda j: loop.call_soon_threadsafe(queue.put_nowait, None)
      pre = len(job.encoded.prefill)
      hold = max((len(x) for x in req.stop), default=1) - 1  # a stop sequence may still be completing
      sent, last_step = "", -1
      try:
        if chat:
          yield chunk(None, first=True)
        try:
          engine.submit(job)
        except APIError as e:
          yield f"data: {json.dumps(e.body())}\n\n"
          return
        while (ev := await queue.get()) is not None:
          if ev.step <= last_step:
            continue  # out of order (a mesh): the newer step already said more
          last_step = ev.step
          p = None if math.isnan(ev.p_malicious) else ev.p_malicious
          if ev.step == 0:
            extra = {"event": "prompt", "step": 0, "p_malicious": p, "malicious": p is not None and p > threshold}
            yield chunk(None if chat else "", extra=extra)
            continue
          ids = ev.stable_ids[pre:][: job.max_tokens]
          text = tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
          cut = render.first_stop(text, req.stop)
          text = text[:cut] if cut >= 0 else text[: len(text) - hold] if hold else text
          delta = text[len(sent) :] if text.startswith(sent) else ""
          refusal = ev.insert_index - pre if 0 <= ev.insert_index - pre < job.max_tokens else None
          if delta or p is not None or refusal is not None:
            extra = {"event": "step", "step": ev.step, "p_malicious": p, "tokens": len(ids), "refusal_index": refusal}
            yield chunk(delta if chat or delta else "", extra=extra)
            sent += delta
        if job.error is not None:
          err = job.error if isinstance(job.error, APIError) else APIError(str(job.error), status=500)
          yield f"data: {json.dumps(err.body())}\n\n"
          return
        c = finish(job, req)  # the finished row is the authority; the stream only ran ahead of it
        rest = c.text[len(sent) :] if c.text.startswith(sent) else ""
        yield chunk(
          rest if rest else (None if chat else ""), finish_reason=c.finish_reason, extra={"event": "done", **c.clsalign}
        )
        if include_usage:
          body = {
            "id": rid,
            "object": obj,
            "created": created_at,
            "model": model_id,
            "choices": [],
            "usage": usage(job, c),
          }
          yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
      finally:
        if job.finished_at is None:
          job.cancel()  # the client went away before its row was decoded

    return StreamingResponse(
      events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )

  return app
