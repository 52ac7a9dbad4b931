"""`python -m clsalign_jax.serve --checkpoint=runs/smollm2_135m` (installed: `clsalign-serve`).

Serves one checkpoint over the OpenAI chat and completions API (docs/serving.md), with the
playground at `/`. Decode settings follow clsalign_jax.generate: a flag given on the command line
wins, else the run's facts, else the plain model's. Sampling flags are the defaults of a request
that leaves the field out. The decode loop is compiled for every bucket combination before the
port opens (`--warmup`), so no request pays a compile.
"""

from __future__ import annotations

import os

from absl import flags, logging

from clsalign_jax import artifacts, cli
from clsalign_jax.decode.text import Decoder
from clsalign_jax.errors import UsageError

try:
  from clsalign_jax.serve.app import Defaults, create_app
  from clsalign_jax.serve.engine import Buckets, Engine
except ModuleNotFoundError as e:  # fastapi, uvicorn, prometheus_client, pydantic: the `serve` extra
  if e.name is None or e.name.startswith("clsalign_jax"):
    raise
  raise SystemExit(
    f"error: serving needs the serve extra: pip install 'clsalign-jax[serve]' ({e.name} is missing)"
  ) from None


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv
  d = dict(flag_values=fv)
  flags.DEFINE_string("checkpoint", "smollm2", f"A clsalign_jax.artifacts spec: {artifacts.GRAMMAR}.", **d)
  flags.DEFINE_string("tokenizer", "auto", "auto (the run's), smollm2, mistral, or a tokenizer path.", **d)
  flags.DEFINE_string("template", "auto", "Chat template: llama2, mistral, chatml, llama3, or auto (the run's).", **d)
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).", **d)
  flags.DEFINE_integer("port", 8000, "Port to listen on.", lower_bound=0, upper_bound=65535, **d)
  flags.DEFINE_string("model_name", None, "Model id clients send; default: the checkpoint directory's name.", **d)
  flags.DEFINE_list("batch_sizes", "1,4,8", "Batch-size buckets (rows decoded together).", **d)
  flags.DEFINE_list(
    "prompt_buckets", "256,1024", "Padded prompt lengths, in tokens ([CLS] and template included).", **d
  )
  flags.DEFINE_list("max_tokens_buckets", "64,256", "Generation-length buckets; the largest is max_tokens' limit.", **d)
  flags.DEFINE_float("max_wait_ms", 30.0, "How long a request waits for others to fill its batch.", lower_bound=0, **d)
  flags.DEFINE_integer("max_queue", 256, "Waiting requests beyond this get a 503.", lower_bound=1, **d)
  flags.DEFINE_bool("warmup", True, "Compile every bucket combination before serving.", **d)
  flags.DEFINE_integer("max_new_tokens", 64, "max_tokens of a request that gives none.", lower_bound=1, **d)
  flags.DEFINE_float("temperature", 0.0, "Default temperature (0: greedy).", lower_bound=0.0, **d)
  flags.DEFINE_integer("top_k", 0, "Default top-k (0: off).", lower_bound=0, **d)
  flags.DEFINE_float("top_p", 1.0, "Default top-p (1: off).", lower_bound=0.0, upper_bound=1.0, **d)
  flags.DEFINE_integer("seed", 0, "Default sampling seed.", **d)
  cli.define_decode_flags(fv)


_BUCKET_FLAGS = {
  "batch": "batch_sizes",
  "prompt": "prompt_buckets",
  "max_tokens": "max_tokens_buckets",
  "max_wait_ms": "max_wait_ms",
  "max_queue": "max_queue",
}


def _ints(fv: flags.FlagValues, name: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in fv[name].value)
  except ValueError:
    raise UsageError(f"--{name}={','.join(fv[name].value)}: expected integers") from None


def model_id_of(spec: str) -> str:
  """The id clients send: the run's or file's name (`runs/smollm2_135m` -> `smollm2_135m`)."""
  path = spec.split(":", 1)[1] if ":" in spec and not os.path.exists(spec) else spec
  path = path.split("@", 1)[0].rstrip("/")
  return os.path.splitext(os.path.basename(path))[0] or spec


def build(fv: flags.FlagValues):
  """(app, engine) for the flags: the checkpoint loaded, the engine started and warmed up."""
  cli.check_decode_flags(fv)
  try:
    buckets = Buckets(
      batch=_ints(fv, "batch_sizes"),
      prompt=_ints(fv, "prompt_buckets"),
      max_tokens=_ints(fv, "max_tokens_buckets"),
      max_wait_ms=fv.max_wait_ms,
      max_queue=fv.max_queue,
    )
  except ValueError as e:
    message = str(e)
    for field, flag in _BUCKET_FLAGS.items():
      message = message.replace(f"buckets.{field}=", f"--{flag}=")
    raise UsageError(message) from None
  if fv.max_new_tokens > buckets.max_tokens[-1]:
    raise UsageError(
      f"--max_new_tokens={fv.max_new_tokens} exceeds the largest --max_tokens_buckets ({buckets.max_tokens[-1]})"
    )
  loaded = artifacts.load(fv.checkpoint, tokenizer=fv.tokenizer, template=fv.template)
  dcfg = cli.decode_config(fv, loaded, fv.max_new_tokens)
  name = fv.model_name or model_id_of(fv.checkpoint)
  decoder = Decoder(name, loaded.cfg, loaded.params, loaded.tokenizer, loaded.template, dcfg)
  try:
    engine = Engine(decoder, buckets)
  except ValueError as e:
    raise UsageError(f"--prompt_buckets/--max_tokens_buckets: {e}") from None
  if fv.warmup:
    logging.info("compiling %d bucket combinations", len(buckets.shapes()))
    engine.warmup()
    logging.info("warm-up done: %d compilations", engine.compiles)
  engine.start()
  defaults = Defaults(fv.max_new_tokens, fv.temperature, fv.top_p, fv.top_k, fv.seed)
  info = {"spec": fv.checkpoint, "step": loaded.step, "template": loaded.template_name, "facts": loaded.facts.source}
  return create_app(engine, name, defaults, info), engine


def body(fv: flags.FlagValues, args: list[str]) -> None:
  if args:
    raise UsageError(f"unexpected arguments: {args}")
  import uvicorn  # noqa: PLC0415

  app, engine = build(fv)
  try:
    logging.info("serving on http://%s:%d/ (playground at /, API at /v1)", fv.host, fv.port)
    uvicorn.run(app, host=fv.host, port=fv.port, log_level="warning", timeout_graceful_shutdown=5)
  finally:
    engine.stop()


def main(argv: list[str] | None = None) -> int:
  """Runs the command line `argv` (default sys.argv); returns the exit code."""
  return cli.run(body, define_flags, argv)


if __name__ == "__main__":
  cli.exit_with(main)
