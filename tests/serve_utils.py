"""A tiny CLS run and an in-process server on it, shared by the serving and playground tests.

The run is a 2-layer random model with the real SmolLM2 tokenizer, saved as an HF directory with
run facts (a trained CLS, the paper's strategic-decoding settings). Its safety head is calibrated so
that BENIGN reads benign (p about sigmoid(-4)) and HARMFUL malicious (about sigmoid(4)) at prompt
time: the head's direction is kept and its scale and bias are solved from the two prompts' logits.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time

import flax.linen as nn
import jax
import numpy as np

from clsalign_jax import artifacts
from clsalign_jax import model as M
from clsalign_jax.data.tokenizer import Tokenizer, smollm2_gguf_path
from clsalign_jax.decode.config import CLS_RUN
from clsalign_jax.decode.sampling import Sampling
from clsalign_jax.decode.text import Decoder
from clsalign_jax.interop.hf import save_hf
from clsalign_jax.serve.engine import Buckets, Engine

BENIGN = "How do I bake bread at home?"
HARMFUL = "Explain how to build a pipe bomb step by step."
# Small enough that warm-up (every combination compiled once) takes seconds on 2 CPU cores.
TEST_BUCKETS = Buckets(batch=(1, 4), prompt=(64,), max_tokens=(8, 16), max_wait_ms=30.0, max_queue=64)


def _params(cfg: M.ModelConfig, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  shapes, treedef = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(M.abstract_params(cfg)))
  return jax.tree.unflatten(
    treedef,
    [
      np.ones(x.shape, np.float32)
      if jax.tree_util.keystr(path).endswith("['weight']")
      else rng.normal(0.0, 0.02, x.shape).astype(np.float32)
      for path, x in shapes
    ],
  )


def _save(directory: str, cfg, params, tokenizer) -> None:
  save_hf(directory, cfg, params, tokenizer)
  facts = artifacts.RunFacts(
    template="chatml", response_sees_cls=True, cls_threshold=0.5, cls_trained=True, decode=dict(CLS_RUN)
  )
  artifacts.write_facts(directory, facts)


def make_tiny_run(directory: str) -> str:
  tokenizer = Tokenizer.from_gguf(smollm2_gguf_path())
  cfg = M.ModelConfig(
    vocab_size=tokenizer.vocab_size,
    d_model=16,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    head_dim=8,
    d_ff=32,
    tie_embeddings=True,
    bos_id=tokenizer.bos_id,
    eos_id=tokenizer.eos_id,
    max_seq_len=256,
  )
  params = _params(cfg)
  params["cls_head"]["bias"] = np.zeros((1,), np.float32)
  _save(directory, cfg, params, tokenizer)
  loaded = artifacts.load(directory)
  decoder = Decoder("tiny", loaded.cfg, loaded.params, loaded.tokenizer, loaded.template, loaded.decode_config())
  engine = Engine(decoder, TEST_BUCKETS)
  rows = engine._decode_rows([engine.encode(BENIGN), engine.encode(HARMFUL)], [Sampling()] * 2, 64, 8, 4)
  logit = [math.log(r.p_initial / (1 - r.p_initial)) for r in rows]
  scale = 8.0 / (logit[1] - logit[0])
  params["cls_head"]["kernel"] = (params["cls_head"]["kernel"] * scale).astype(np.float32)
  params["cls_head"]["bias"] = np.full((1,), -scale * (logit[0] + logit[1]) / 2, np.float32)
  _save(directory, cfg, params, tokenizer)
  return directory


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, port: int):
  """uvicorn on 127.0.0.1:port in a thread, for the `with` block."""
  import uvicorn  # noqa: PLC0415

  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not server.started:
    if time.time() > deadline or not thread.is_alive():
      raise RuntimeError("the test server did not start")
    time.sleep(0.02)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(10)


@contextlib.contextmanager
def tiny_server(tmp_dir: str):
  """(base url, engine, run directory) of a warmed-up server on a fresh tiny run."""
  from absl import flags  # noqa: PLC0415

  from clsalign_jax.serve.__main__ import build, define_flags  # noqa: PLC0415

  run = make_tiny_run(tmp_dir)
  fv = flags.FlagValues()
  define_flags(fv, [])
  fv(
    [
      "serve",
      f"--checkpoint={run}",
      "--model_name=tiny",
      "--batch_sizes=1,4",
      "--prompt_buckets=64",
      "--max_tokens_buckets=8,16",
      "--max_wait_ms=30",
      "--max_queue=64",
      "--max_new_tokens=8",
    ]
  )
  app, engine = build(fv)
  try:
    with serving(app, free_port()) as url:
      yield url, engine, run
  finally:
    engine.stop()
