"""`python -m clsalign_jax.generate` end to end, on a tiny random model with the real SmolLM2
tokenizer: exported with save_hf (tokenizer alongside) or as orbax params (`--tokenizer`). Neither
has run facts (no trained CLS), so the default is the plain model; the CLS is switched on by flags."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from absl import flags

from clsalign_jax import model as M
from clsalign_jax.convert import save_orbax_params
from clsalign_jax import artifacts, generate
from clsalign_jax.data.templates import encode_prompt, get_template
from clsalign_jax.data.tokenizer import Tokenizer, smollm2_gguf_path
from clsalign_jax.decode import PAPER_REFUSAL
from clsalign_jax.decode.config import CLS_RUN
from clsalign_jax.errors import CheckpointError
from clsalign_jax.interop.hf import save_hf


@pytest.fixture(scope="module")
def tiny():
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
  )
  rng = np.random.default_rng(0)
  shapes, treedef = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(M.abstract_params(cfg)))
  params = jax.tree.unflatten(
    treedef,
    [
      np.ones(x.shape, np.float32)
      if jax.tree_util.keystr(path).endswith("['weight']")
      else rng.normal(0.0, 0.02, x.shape).astype(np.float32)
      for path, x in shapes
    ],
  )
  params["cls_head"]["bias"] = np.full((1,), 5.0, np.float32)  # every prompt reads as malicious
  return cfg, params, tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
  cfg, params, tokenizer = tiny
  directory = tmp_path_factory.mktemp("tiny_hf")
  save_hf(str(directory), cfg, params, tokenizer)
  return str(directory)


@pytest.fixture(scope="module")
def tiny_orbax(tiny, tmp_path_factory):
  cfg, params, _ = tiny
  directory = tmp_path_factory.mktemp("tiny_orbax")
  save_orbax_params(str(directory), cfg, params)
  return str(directory)


@pytest.mark.parametrize("fmt", ["hf", "orbax"])
def test_cli_prints_response_trace_and_insertion(fmt, request):
  source = (
    [f"--checkpoint={request.getfixturevalue('tiny_dir')}"]
    if fmt == "hf"
    else [f"--checkpoint={request.getfixturevalue('tiny_orbax')}", "--tokenizer=smollm2"]
  )
  cmd = [
    sys.executable,
    "-m",
    "clsalign_jax.generate",
    *source,
    "--prompt=How are you?",
    "--prefill= Sure, here is",
    "--max_new_tokens=14",
    "--schedule=every",
    "--strategic_decoding",
    "--response_sees_cls",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "prompt-time p(malicious) = 0.99" in text and "(malicious)" in text
  assert f"response: ' Sure, here is{PAPER_REFUSAL}" in text or f"response: ' Sure, here is {PAPER_REFUSAL}" in text
  assert "CLS trace (step:p, " in text
  assert "refusal prefix: inserted at response token 4" in text and "initially malicious" in text


def test_without_cls_facts_the_default_is_the_plain_model(tiny, tmp_path, capsys):
  """The default decoding of a checkpoint without a trained CLS equals transformers' greedy
  decoding of the exported weights (which know nothing of the CLS), despite a head that flags
  every prompt: no re-classification, no refusal."""
  cfg, _, tokenizer = tiny
  # Weights large enough that the answer depends on the context (whether tokens read the CLS).
  rng = np.random.default_rng(1)
  shapes, treedef = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(M.abstract_params(cfg)))
  params = jax.tree.unflatten(
    treedef,
    [
      np.ones(x.shape, np.float32)
      if jax.tree_util.keystr(path).endswith("['weight']")
      else rng.normal(0.0, 0.5, x.shape).astype(np.float32)
      for path, x in shapes
    ],
  )
  params["cls_head"]["bias"] = np.full((1,), 5.0, np.float32)
  tiny_dir = str(tmp_path / "lively")
  save_hf(tiny_dir, cfg, params, tokenizer)
  query = "How are you?"
  assert (
    generate.main(
      ["generate", f"--checkpoint={tiny_dir}", f"--prompt={query}", "--max_new_tokens=8", "--response_sees_cls"]
    )
    == 0
  )
  reading = capsys.readouterr().out  # the CLS-reading answer differs: the comparison below can fail
  assert generate.main(["generate", f"--checkpoint={tiny_dir}", f"--prompt={query}", "--max_new_tokens=8"]) == 0
  out = capsys.readouterr().out
  assert "CLS trace (step:p, 0 re-classifications)" in out and "refusal prefix: not inserted" in out
  ids = encode_prompt(tokenizer, get_template("chatml"), query).tokens[1:].tolist()
  model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[
      0, len(ids) :
    ].tolist()
  eos = tokenizer.token_to_id("<|im_end|>")
  greedy = greedy[: greedy.index(eos)] if eos in greedy else greedy
  assert f"response: {tokenizer.decode(greedy, skip_special_tokens=True)!r}" in out
  assert f"response: {tokenizer.decode(greedy, skip_special_tokens=True)!r}" not in reading


def test_checkpoint_errors_name_the_problem(tmp_path, tiny_orbax):
  with pytest.raises(CheckpointError, match="missing: not found .expected smollm2, gguf:FILE"):
    artifacts.load(str(tmp_path / "missing"))
  with pytest.raises(CheckpointError, match="a directory with no checkpoints/, model_config.json or config.json"):
    artifacts.load(str(tmp_path))
  with pytest.raises(CheckpointError, match="no tokenizer recorded with it or stored alongside; give one"):
    artifacts.load(tiny_orbax)


@pytest.mark.parametrize(
  "trained,argv,expected",
  [
    (True, [], True),  # the run's facts
    (True, ["--noend_after_refusal"], False),  # the flag wins
    (False, [], False),  # the plain model's default
    (False, ["--end_after_refusal"], True),
  ],
)
def test_end_after_refusal_flag_over_the_run_facts(trained, argv, expected):
  fv = flags.FlagValues()
  generate.define_flags(fv, [])
  fv(["generate", *argv])
  facts = artifacts.RunFacts(cls_trained=True, decode={**CLS_RUN, "end_after_refusal": True}) if trained else None
  loaded = artifacts.Loaded(spec=None, cfg=None, params={}, facts=facts or artifacts.RunFacts())
  assert generate.decode_config(fv, loaded).end_after_refusal is expected


_PLACEMENT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import jax
import numpy as np
from clsalign_jax import artifacts, generate, sharding
from clsalign_jax.decode import Decoder
assert jax.device_count() == 2, jax.devices()
hf_dir = sys.argv[2]
# A run restored onto "the CPU" while decoding belongs elsewhere: params committed to device 1.
loaded = artifacts.load(f"hf:{hf_dir}")
elsewhere = jax.device_put(loaded.params, jax.devices()[1])
layout = sharding.Layout.make({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
decoder = Decoder("t", loaded.cfg, elsewhere, loaded.tokenizer, loaded.template, loaded.decode_config(max_new_tokens=4), 1, layout)
assert {d for x in jax.tree.leaves(decoder.params) for d in x.devices()} == {jax.devices()[0]}
(g,) = decoder.generate_text(["Hi"])
assert len(g.response_ids) > 0
# The command line hands its mesh to the loader, so a run's step is restored onto the decode devices.
seen = {}
real_load = artifacts.load
def spy(*args, **kwargs):
  seen.update(kwargs)
  return real_load(*args, **kwargs)
artifacts.load = spy
assert generate.main(["generate", f"--checkpoint={hf_dir}", "--prompt=Hi", "--max_new_tokens=3"]) == 0
assert seen["layout"].mesh.devices.size == 2, seen
print("placed")
"""


def test_params_committed_elsewhere_decode_on_the_mesh(tiny_dir):
  """Two host devices stand in for "restored onto the CPU, decoded on the accelerator": the decoder
  moves params committed to another device onto its mesh, and `generate` loads onto its mesh."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run(
    [sys.executable, "-c", _PLACEMENT, os.path.dirname(__file__), str(tiny_dir)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0 and "placed" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


def test_dry_run_prints_the_memory_plan_without_loading_weights(tiny_dir, capsys, monkeypatch):
  from clsalign_jax.interop import hf as hf_io

  monkeypatch.setattr(hf_io, "params_from_hf_tensors", lambda *a, **k: pytest.fail("weights were read"))
  assert generate.main(["generate", f"--checkpoint={tiny_dir}", "--prompt=Hi", "--dry_run", "--max_new_tokens=8"]) == 0
  out = capsys.readouterr().out
  assert "per device: params" in out and "KV cache" in out and "(1 devices)" in out, out
