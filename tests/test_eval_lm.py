"""The evaluation room's model seam: encoding, batched generation, teacher-forced scoring, loading.

The tiny model and decode settings are those of configs/eval_tiny.py, so every test module of the
room shares one set of compiled programs.
"""

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clsalign_jax import artifacts, checkpoint, masks
from clsalign_jax.convert import save_orbax_params
from clsalign_jax.decode.config import CLS_RUN, DecodeConfig
from clsalign_jax.errors import CheckpointError
from clsalign_jax.eval import lm
from clsalign_jax.model import Transformer

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config():
  spec = importlib.util.spec_from_file_location("eval_tiny", REPO / "configs" / "eval_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


CONFIG = tiny_config()
DECODE = {name: {**dec, "max_new_tokens": CONFIG.max_new_tokens} for name, _, dec in CONFIG.variants}


def tiny_model(variant: str = "no_strategic_decoding", seed: int = 0) -> lm.TargetModel:
  return lm.TargetModel.load(
    "tiny",
    f"random:{seed}",
    CONFIG.model["tokenizer"],
    "chatml",
    {"system_prompt": None},
    model=dict(CONFIG.model["model"]),
    decode=DECODE[variant],
    batch_size=CONFIG.batch_size,
  )


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def test_encode_templated_and_raw(model):
  tok = model.tokenizer
  row = model.encode("Hi there", prefill="Sure")
  assert row.prompt[0] == tok.cls_id and row.prompt[1] == tok.bos_id
  q0, q1 = row.query_span
  assert tok.decode_fragment(list(row.prompt[q0:q1])) == "Hi there"
  assert tok.decode(list(row.prompt[1:])).endswith("<|im_start|>assistant\n")
  assert tok.decode_fragment(list(row.prefill)) == "Sure"

  raw = model.encode("Hi there", raw=True)
  assert raw.prompt == (tok.cls_id, tok.bos_id, *tok.encode("Hi there")) and raw.query_span == (2, len(raw.prompt))
  sys = model.encode("Hi there", raw=True, raw_prefix="SYSTEM: ")
  q0, q1 = sys.query_span
  assert tok.decode(list(sys.prompt[2:q0])) == "SYSTEM: " and tok.decode_fragment(list(sys.prompt[q0:q1])) == "Hi there"


def test_generate_agrees_with_scoring_and_keeps_row_order(model):
  queries = ["What is two plus two?", "Name a colour.", "Tell me a joke", "Hello", "Another one"]
  rows = [model.encode(q) for q in queries]
  gens = model.generate(rows, [lm.Sampling()] * len(rows))
  scores = model.score(rows)
  for g, logits, p in zip(gens, scores.next_logits, scores.p_malicious):
    assert g.response_ids[0] == int(np.argmax(logits))  # greedy: the first token is the argmax
    assert g.p_initial == pytest.approx(float(p), abs=1e-5)  # the same CLS mask (Rule 4)
    assert not g.refusal_inserted
  # Rows do not interact: a row alone gives what it gave inside a batch of five.
  (alone,) = model.generate(rows[3:4], [lm.Sampling()])
  assert alone.response_ids == gens[3].response_ids


def test_continuation_logprobs_match_next_token_logits(model):
  rows = [model.encode("Pick a letter", prefill="Answer:")]
  tok_id = model.tokenizer.encode_continuation("B")
  scores = model.score(rows, [tok_id])
  expected = jax.nn.log_softmax(scores.next_logits[0])[tok_id[0]]
  assert scores.continuation_logprobs[0].shape == (1,)
  assert scores.continuation_logprobs[0][0] == pytest.approx(float(expected), abs=1e-4)


def test_scoring_without_response_sees_cls_is_the_plain_causal_model(model):
  params = artifacts.random_params(model.cfg, 1)
  # A CLS row far from the mean embedding, so reading it changes the logits.
  params["cls_embedding"] = np.random.default_rng(2).normal(0.0, 1.0, model.cfg.d_model).astype(np.float32)
  row = model.encode("Name a colour.", prefill="Sure")
  cont = model.tokenizer.encode_continuation(", red and blue")
  tokens = list(row.prompt + row.prefill) + cont
  T, P, at = len(tokens), len(row.prompt), len(row.prompt) + len(row.prefill) - 1
  plain = Transformer(model.cfg).apply(
    {"params": params},
    jnp.asarray([tokens[1:]]),
    jnp.arange(T - 1)[None],
    masks.causal_mask(jnp.ones((1, T - 1), jnp.int32)),
    cls_row=None,
  )
  plain_TV = np.asarray(plain.logits_BTV[0])  # row t is row t + 1 of the CLS-prefixed rows

  def forward(sees_cls):
    out = lm.teacher_forced(
      Transformer(model.cfg),
      params,
      jnp.asarray([tokens]),
      jnp.asarray([T]),
      jnp.asarray([P]),
      jnp.asarray([row.query_span]),
      response_sees_cls=sees_cls,
    )
    return np.asarray(out.logits_BTV[0, 1:])

  np.testing.assert_allclose(forward(False), plain_TV, atol=1e-5, rtol=0)
  visible = forward(True)
  np.testing.assert_allclose(visible[: P - 1], plain_TV[: P - 1], atol=1e-5, rtol=0)  # prompt rows never read it
  assert np.abs(visible[P - 1 :] - plain_TV[P - 1 :]).max() > 1e-3

  for sees_cls in (False, True):
    target = lm.TargetModel(
      "t",
      model.cfg,
      params,
      model.tokenizer,
      model.template,
      model.dcfg.replace(response_sees_cls=sees_cls),
      model.batch_size,
    )
    scores = target.score([row], [cont])
    expected_logp = jax.nn.log_softmax(plain_TV, axis=-1)[np.arange(at - 1, at - 1 + len(cont)), cont]
    matches = np.allclose(scores.next_logits[0], plain_TV[at - 1], atol=1e-5, rtol=0) and np.allclose(
      scores.continuation_logprobs[0], expected_logp, atol=1e-5, rtol=0
    )
    assert matches == (not sees_cls)


def test_strategic_decoding_inserts_the_refusal():
  model = tiny_model("cls_full")  # threshold 0: every prompt is judged malicious
  (g,) = model.generate([model.encode("Anything")], [lm.Sampling()])
  assert g.initial_malicious and g.refusal_inserted and g.insert_index == 0
  assert model.dcfg.refusal_text.startswith(g.response)


def test_load_from_orbax_params_and_a_training_run(tmp_path, model):
  cfg = model.cfg
  params = artifacts.random_params(cfg, 3)
  save_orbax_params(str(tmp_path / "converted"), cfg, params)
  loaded = artifacts.load(f"orbax:{tmp_path / 'converted'}", tokenizer="none")
  cfg2, loaded = loaded.cfg, loaded.params
  assert cfg2 == cfg
  np.testing.assert_array_equal(loaded["embedding"], params["embedding"])

  ckpt = checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"), keep=2, async_save=False)
  for step in (5, 9):
    ckpt.save(
      step,
      artifacts.random_params(cfg, step),
      {"count": np.int32(0)},
      {"step": np.int32(step)},
      {"batches": step},
      {"model_config": dataclasses.asdict(cfg)},
    )
  ckpt.close()
  assert artifacts.checkpoint_identity(f"orbax:{tmp_path / 'run'}")["step"] == 9
  assert "mtime_ns" in artifacts.checkpoint_identity(f"orbax:{tmp_path / 'converted'}")
  latest = artifacts.load(f"orbax:{tmp_path / 'run'}", tokenizer="none").params
  early = artifacts.load(f"orbax:{tmp_path / 'run' / 'checkpoints'}@5", tokenizer="none").params
  np.testing.assert_array_equal(latest["embedding"], artifacts.random_params(cfg, 9)["embedding"])
  np.testing.assert_array_equal(early["embedding"], artifacts.random_params(cfg, 5)["embedding"])
  # 'auto' finds the tokenizer and template of a run written before run facts in its config.json.
  run_config = {"init_from": "", "model": {}, "train": {}, "data": {"tokenizer": CONFIG.model["tokenizer"]}}
  (tmp_path / "run" / "config.json").write_text(json.dumps(run_config))
  target = lm.TargetModel.load("t", f"orbax:{tmp_path / 'run' / 'checkpoints'}@5", batch_size=CONFIG.batch_size)
  assert target.tokenizer.vocab_size == model.tokenizer.vocab_size and target.template.name == "chatml"
  # A trained run decodes with its own strategic settings unless the variant gives its own.
  assert target.dcfg == DecodeConfig(**CLS_RUN)


def test_loading_errors(model):
  with pytest.raises(CheckpointError, match="^random:0: random:SEED needs the model fields"):
    artifacts.load("random:0")
  with pytest.raises(CheckpointError, match="^pickle:/x: unknown kind 'pickle'.*expected smollm2"):
    artifacts.load("pickle:/x")
  with pytest.raises(CheckpointError, match="^random:0: no tokenizer recorded with it"):
    lm.TargetModel.load("t", "random:0", model=dict(CONFIG.model["model"]))
  wrong = model.cfg.replace(vocab_size=300)
  with pytest.raises(ValueError, match="model vocabulary 300"):
    lm.TargetModel("x", wrong, artifacts.random_params(wrong, 0), model.tokenizer, model.template)


def test_params_committed_elsewhere_move_to_the_default_device():
  # Two host devices stand in for "restored onto the CPU, evaluated on the accelerator".
  script = f"""
import jax
from clsalign_jax.eval import lm
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from test_eval_lm import tiny_model
assert len(jax.devices()) == 2, jax.devices()
m = tiny_model()
params = jax.device_put(m.params, jax.devices()[1])
target = lm.TargetModel("t", m.cfg, params, m.tokenizer, m.template, m.dcfg)
assert {{d for x in jax.tree.leaves(target.params) for d in x.devices()}} == {{jax.devices()[0]}}
print("ok")
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
