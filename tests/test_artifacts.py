"""clsalign_jax.artifacts, the one loader: every spec kind and bare path, bad specs, run facts and
their precedence, and the chains after a (tiny) main job: `generate --checkpoint=RUN_DIR` and
`convert --src=RUN_DIR` -> an HF directory that transformers loads, chat template included."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from clsalign_jax import artifacts, convert, generate, masks, train
from clsalign_jax import model as M
from clsalign_jax.data.templates import encode_prompt, get_template
from clsalign_jax.data.tokenizer import Tokenizer, load_tokenizer
from clsalign_jax.decode.config import CLS_RUN, PLAIN, DecodeConfig
from clsalign_jax.errors import CheckpointError
from clsalign_jax.interop.hf import jinja_chat_template
import llama3_tokenizer
from train_utils import REPO, load_config, saved_params

TOKENIZER = REPO / "tests" / "fixtures" / "eval" / "tiny_tokenizer"
QUERY = "How do I bake bread at home?"


def _tiny_config():
  c = load_config("tiny")
  # The fixture tokenizer's vocabulary, so the run reads and writes text; llama2 is what the run
  # records, where every consumer used to fall back to chatml.
  c.model.update(vocab_size=259, max_seq_len=256)
  c.data.update(tokenizer=str(TOKENIZER), template="llama2")
  c.train.num_steps = 2
  c.checkpoint.update(every_steps=2, async_save=False)
  c.eval.update(every_steps=0, num_batches=1)
  c.metrics.progress_bar = False
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("artifacts") / "run"
  config = _tiny_config()
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


@pytest.fixture(scope="module")
def export(run, tmp_path_factory):
  _, workdir = run
  dst = tmp_path_factory.mktemp("export") / "hf"
  assert convert.main(["convert", f"--src={workdir}", f"--dst={dst}"]) == 0
  return dst


def _assert_tree_equal(a, b):
  a, b = M.unstack_layers(jax.device_get(a)), M.unstack_layers(jax.device_get(b))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# ----- run facts ----------------------------------------------------------------------------------


def test_run_records_its_facts_and_every_run_spec_reads_them(run):
  config, workdir = run
  facts = json.loads((workdir / "run_facts.json").read_text())
  assert facts == {
    "format_version": 1,
    "template": "llama2",
    "template_kwargs": {},
    "tokenizer": str(TOKENIZER),
    "response_sees_cls": True,
    "cls_threshold": 0.5,
    "cls_trained": True,
    "decode": dict(CLS_RUN),
  }
  reference = saved_params(workdir, 2)  # read with orbax directly, not through artifacts
  for spec in (
    str(workdir),
    f"orbax:{workdir}",
    f"orbax:{workdir / 'checkpoints'}@2",
    f"{workdir}@2",
    str(workdir / "checkpoints"),
  ):
    loaded = artifacts.load(spec)
    assert (loaded.spec.kind, loaded.step, loaded.template_name) == ("run", 2, "llama2"), spec
    assert loaded.cfg == M.config_from_fields(config.model)
    assert loaded.tokenizer.vocab_size == 259 and loaded.template == get_template("llama2")
    assert loaded.decode_config() == DecodeConfig(**CLS_RUN)
    _assert_tree_equal(loaded.params, reference)


def test_explicit_choices_override_the_run_facts(run):
  _, workdir = run
  loaded = artifacts.load(str(workdir), template="mistral")
  assert loaded.template_name == "mistral" and loaded.template == get_template("mistral")
  loaded = artifacts.load(str(workdir), template="chatml", template_kwargs={"system_prompt": None})
  assert loaded.template == get_template("chatml", system_prompt=None)
  assert loaded.decode_config(schedule="first", tau=5) == DecodeConfig(**{**CLS_RUN, "schedule": "first", "tau": 5})
  # A tokenizer that does not fit is refused, naming the spec and both sizes.
  with pytest.raises(CheckpointError, match=rf"^{workdir}: tokenizer .* has 49152 tokens, the model 259"):
    artifacts.load(str(workdir), tokenizer="smollm2")


def test_facts_follow_the_training_config():
  c = _tiny_config()
  c.mask.response_sees_cls = False
  c.loss.cls_threshold = 0.7
  facts = artifacts.facts_from_config(json.loads(c.to_json_best_effort()), "test")
  assert not facts.response_sees_cls and facts.cls_trained and facts.cls_threshold == 0.7
  assert facts.decode == {**CLS_RUN, "threshold": 0.7, "response_sees_cls": False}
  c.train.trainable = r"^layers_1/"  # the CLS head frozen: no trained CLS, the plain model
  assert not artifacts.facts_from_config(c, "test").cls_trained
  c.train.trainable = ""
  c.loss.cls_weight = 0.0
  assert not artifacts.facts_from_config(c, "test").cls_trained


def test_run_without_run_facts_infers_them_from_its_config(run, tmp_path):
  _, workdir = run
  old = tmp_path / "old_run"
  shutil.copytree(workdir, old)
  (old / "run_facts.json").unlink()  # a run written before run facts existed
  loaded = artifacts.load(str(old))
  assert "inferred from" in loaded.facts.source and "config.json" in loaded.facts.source
  assert loaded.template_name == "llama2" and loaded.facts.cls_trained
  assert loaded.decode_config() == DecodeConfig(**CLS_RUN)
  (old / "config.json").unlink()  # the checkpoint's meta carries the run config too
  loaded = artifacts.load(str(old))
  assert "meta" in loaded.facts.source and loaded.template_name == "llama2"


def test_broken_run_facts_are_named(run, tmp_path):
  _, workdir = run
  broken = tmp_path / "broken"
  shutil.copytree(workdir, broken)
  (broken / "run_facts.json").write_text('{"format_version": 1,\n "template": }')
  with pytest.raises(CheckpointError, match=r"broken/run_facts.json:2: invalid JSON"):
    artifacts.load(str(broken))
  (broken / "run_facts.json").write_text(json.dumps({"format_version": 1, "templte": "llama2"}))
  with pytest.raises(CheckpointError, match=r"run_facts.json: unknown keys \['templte'\]"):
    artifacts.load(str(broken))


# ----- the other kinds ----------------------------------------------------------------------------


def test_hf_export_and_orbax_params_carry_the_weights_and_facts(run, export, tmp_path):
  _, workdir = run
  reference = saved_params(workdir, 2)
  for spec in (str(export), f"hf:{export}"):
    loaded = artifacts.load(spec)
    assert loaded.spec.kind == "hf" and loaded.template_name == "llama2" and loaded.facts.cls_trained
    assert loaded.decode_config() == DecodeConfig(**CLS_RUN)
    _assert_tree_equal(loaded.params, reference)
  params_dir = tmp_path / "params"
  assert convert.main(["convert", f"--src={export}", f"--dst={params_dir}", "--dst_format=orbax"]) == 0
  for spec in (str(params_dir), f"orbax:{params_dir}"):
    loaded = artifacts.load(spec)  # no tokenizer alongside: the recorded one (an absolute path)
    assert loaded.spec.kind == "orbax" and loaded.template_name == "llama2" and loaded.tokenizer.vocab_size == 259
    _assert_tree_equal(loaded.params, reference)
  assert "mtime_ns" in artifacts.checkpoint_identity(str(params_dir))
  assert artifacts.checkpoint_identity(f"orbax:{workdir}") == {"checkpoint": f"orbax:{workdir}", "step": 2}


def test_checkpoints_without_a_trained_cls_decode_as_the_plain_model(tmp_path):
  from clsalign_jax.assets import smollm2_gguf_path

  path = smollm2_gguf_path()
  for spec in ("smollm2", "gguf:smollm2", f"gguf:{path}", path):
    assert artifacts.parse_spec(spec) == artifacts.Spec(spec, "gguf", path)
  loaded = artifacts.load("smollm2")
  assert loaded.template_name == "chatml" and not loaded.facts.cls_trained
  assert loaded.decode_config() == DecodeConfig(**PLAIN)
  assert not loaded.decode_config().response_sees_cls
  # An HF directory without run facts (a plain checkpoint, or an export of one) is plain too.
  cfg = loaded.cfg.replace(n_layers=1)
  params = {k: v for k, v in M.unstack_layers(loaded.params).items() if not k.startswith("layers_")}
  params["layers_0"] = M.unstack_layers(loaded.params)["layers_0"]
  from clsalign_jax.interop.hf import save_hf

  save_hf(str(tmp_path / "plain"), cfg, params, loaded.tokenizer)
  plain = artifacts.load(str(tmp_path / "plain"))
  assert plain.template_name == "chatml" and plain.decode_config() == DecodeConfig(**PLAIN)


def test_random_weights_from_a_preset_or_the_callers_fields():
  spec = artifacts.parse_spec("random:smollm2_135m@3")
  assert (spec.kind, spec.preset, spec.seed) == ("random", "smollm2_135m", 3)
  loaded = artifacts.load("random:smollm2_135m@3", tokenizer="none", model_fields={"n_layers": 1})
  assert loaded.cfg == M.preset("smollm2_135m", n_layers=1)
  again = artifacts.load("random:smollm2_135m@3", tokenizer="none", model_fields={"n_layers": 1})
  _assert_tree_equal(loaded.params, again.params)  # the seed pins the weights
  fields = dict(vocab_size=259, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
  small = artifacts.load("random:4", tokenizer=str(TOKENIZER), model_fields=fields)
  assert small.cfg == M.ModelConfig(**fields) and small.template_name == "chatml"
  assert small.decode_config() == DecodeConfig(**PLAIN)


def _bad_specs(tmp, workdir, params_dir):
  text = tmp / "notes.txt"
  text.write_text("hello")
  (tmp / "empty").mkdir()
  started = tmp / "started"  # a workdir that saved no step yet
  started.mkdir()
  shutil.copy(workdir / "config.json", started / "config.json")
  return [
    ("pickle:/x", "pickle:/x: unknown kind 'pickle'"),
    ("hf:", "hf:: nothing after 'hf:'"),
    ("random:nope", "random:nope: no model preset 'nope'"),
    ("random:3", "random:3: random:SEED needs the model fields"),
    (str(tmp / "missing"), f"{tmp / 'missing'}: not found (expected smollm2, gguf:FILE"),
    (f"gguf:{tmp / 'missing.gguf'}", "missing.gguf not found (expected a GGUF file)"),
    (f"hf:{tmp / 'empty'}", "empty: no config.json in it"),
    (f"orbax:{workdir}@7", "no step 7 in"),
    (f"{workdir}@x", "@x is not a step number"),
    (f"orbax:{params_dir}@1", "is a params directory (one set of weights); it has no steps"),
    (str(tmp / "empty"), "a directory with no checkpoints/, model_config.json or config.json"),
    (str(started), "a training run's workdir without checkpoints/"),
    (str(text), "notes.txt: a file that is not GGUF"),
  ]


def test_bad_specs_give_one_error_naming_the_spec(run, tmp_path):
  _, workdir = run
  params_dir = tmp_path / "params"
  loaded = artifacts.load(str(workdir), tokenizer="none")
  convert.save_orbax_params(str(params_dir), loaded.cfg, loaded.params)
  with pytest.raises(CheckpointError, match="empty checkpoint spec"):
    artifacts.load("")
  for spec, needle in _bad_specs(tmp_path, workdir, params_dir):
    with pytest.raises(CheckpointError) as e:
      artifacts.load(spec)
    assert str(e.value).startswith(f"{spec}: ") and needle in str(e.value), (spec, str(e.value))


# ----- the chains ---------------------------------------------------------------------------------


def _generate(capsys, *argv) -> str:
  capsys.readouterr()
  assert generate.main(["generate", *argv, "--max_new_tokens=6"]) == 0, capsys.readouterr().err
  return capsys.readouterr().out


def test_generate_on_the_run_dir_uses_the_run_template(run, export, capsys):
  _, workdir = run
  out = _generate(capsys, f"--checkpoint={workdir}", f"--prompt={QUERY}")
  assert f"=== [0] {QUERY}" in out and "response: " in out and "CLS trace (step:p, " in out
  # The run's template (llama2) by default: the same as asking for it, not chatml's answer.
  assert out == _generate(capsys, f"--checkpoint={workdir}", f"--prompt={QUERY}", "--template=llama2")
  assert out != _generate(capsys, f"--checkpoint={workdir}", f"--prompt={QUERY}", "--template=chatml")
  # The export carries the facts: it answers as the run does.
  assert out == _generate(capsys, f"--checkpoint={export}", f"--prompt={QUERY}")
  # The run re-classifies at every step (its facts); a flag given on the command line wins.
  assert "CLS trace (step:p, 0 re-classifications)" not in out
  assert "CLS trace (step:p, 0 re-classifications)" in _generate(
    capsys, f"--checkpoint={workdir}", f"--prompt={QUERY}", "--schedule=first"
  )


def test_convert_of_the_run_dir_loads_in_transformers(run, export):
  _, workdir = run
  loaded = artifacts.load(str(workdir))
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(export))
  ids = hf_tok.apply_chat_template([{"role": "user", "content": QUERY}], add_generation_prompt=True, tokenize=True)
  ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
  ours = encode_prompt(loaded.tokenizer, get_template("llama2"), QUERY).tokens
  assert ids == ours[1:].tolist()  # everything but the [CLS], which a plain HF model has no row for
  model = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
  with torch.no_grad():
    ref = model(torch.tensor([ids])).logits.numpy()
  T = len(ids)
  cfg = loaded.cfg
  plain = M.Transformer(cfg).apply(
    {"params": M.to_layout(loaded.params, cfg)},
    jnp.asarray([ids]),
    jnp.arange(T)[None],
    masks.causal_mask(jnp.ones((1, T), jnp.int32)),
    cls_row=None,
  )
  assert np.abs(np.asarray(plain.logits_BTV) - ref).max() <= 1e-4


# ----- chat templates in tokenizer_config.json ----------------------------------------------------


@pytest.fixture(scope="module")
def llama3_tok(tmp_path_factory):
  return Tokenizer.from_tokenizer_json(llama3_tokenizer.build(tmp_path_factory.mktemp("llama3_tok")))


TEMPLATES = [
  ("smollm2", "chatml", {}),
  ("smollm2", "chatml", {"system_prompt": None}),
  ("smollm2", "qwen2_5", {}),
  ("mistral", "llama2", {}),
  ("mistral", "mistral", {}),
  ("llama3", "llama3", {}),
  ("llama3", "llama3", {"system_prompt": "You are terse."}),
]


@pytest.mark.parametrize("tok_name,name,kwargs", TEMPLATES, ids=[f"{t[1]}-{i}" for i, t in enumerate(TEMPLATES)])
def test_exported_chat_template_gives_our_prompt_ids(tok_name, name, kwargs, tmp_path, request):
  tok = request.getfixturevalue("llama3_tok") if tok_name == "llama3" else load_tokenizer(tok_name)
  template = get_template(name, **kwargs)
  tok.save_hf(tmp_path)
  config_path = tmp_path / "tokenizer_config.json"
  config = json.loads(config_path.read_text())
  config["chat_template"] = jinja_chat_template(template, tok)
  config_path.write_text(json.dumps(config))
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for query in (QUERY, "Explain: 'quotes', \"double\", {{ braces }} and {% tags %}.", "café naïve 😀 emoji"):
    enc = encode_prompt(tok, template, query)
    ids = hf_tok.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == enc.tokens[1:].tolist(), (name, query)
  with pytest.raises(Exception, match="single-turn"):
    hf_tok.apply_chat_template(
      [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
      tokenize=False,
    )


class _Vocabulary:
  """The one tokenizer method `inferred_template` reads."""

  def __init__(self, *tokens):
    self.tokens = tokens

  def token_to_id(self, token):
    return self.tokens.index(token) if token in self.tokens else None


INFERRED = [
  ("llama", (), "llama2"),
  ("llama", ("<|im_start|>",), "chatml"),  # SmolLM2
  ("llama", ("<|start_header_id|>",), "llama3"),
  ("mistral", (), "mistral"),
  ("qwen2", ("<|im_start|>", "<|im_end|>"), "qwen2_5"),  # ChatML, with Qwen's system turn
]


@pytest.mark.parametrize("family,vocab,want", INFERRED, ids=[f"{f}-{w}" for f, _, w in INFERRED])
def test_inferred_template_follows_the_family(family, vocab, want):
  cfg = M.ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=8, family=family)
  assert artifacts.inferred_template(cfg, _Vocabulary(*vocab)) == want


_SHARDED_LOAD = r"""
import sys
import jax, flax.linen as nn, numpy as np
from clsalign_jax import artifacts, model, sharding
assert jax.device_count() == 8, jax.devices()
run, hf_dir = sys.argv[1], sys.argv[2]
one = artifacts.load(run, tokenizer="none")
for shape in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 4, "fsdp": 1, "tensor": 2}):
  layout = sharding.Layout.make(shape)
  for spec in (run, f"hf:{hf_dir}"):
    loaded = artifacts.load(spec, tokenizer="none", layout=layout)
    expected = layout.params(model.abstract_params(loaded.cfg))
    assert jax.tree.structure(loaded.params) == jax.tree.structure(expected), spec
    for x, s in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(expected)):
      assert x.sharding.is_equivalent_to(s, x.ndim), (spec, x.sharding, s)
    # Every device holds only its shard, and the shards make the one-device tensors.
    if spec == run:
      for x, y in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(one.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert all(s.data.shape == x.sharding.shard_shape(x.shape) for s in x.addressable_shards)
  print("sharded", layout.describe())
"""


def test_the_loader_restores_into_the_shards_of_a_mesh(tmp_path):
  """8 forced CPU devices: a training run's step and HF weights come back laid out by the decode
  rules on 2×2×2 and 4×1×2 meshes; the run's shards make its one-device tensors."""
  import os
  import pathlib
  import subprocess
  import sys

  REPO = pathlib.Path(__file__).resolve().parents[1]
  from clsalign_jax.interop.hf import save_hf

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = tmp_path / "run"
  cmd = [
    sys.executable,
    "-m",
    "clsalign_jax.main",
    "--config=configs/tiny.py",
    f"--workdir={run}",
    "--config.train.num_steps=2",
    "--config.metrics.progress_bar=false",
    "--config.after_training.evaluate=false",
  ]
  trained = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert trained.returncode == 0, trained.stderr[-3000:]
  loaded = artifacts.load(str(run), tokenizer="none")
  save_hf(str(tmp_path / "hf"), loaded.cfg, loaded.params)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  out = subprocess.run(
    [sys.executable, "-c", _SHARDED_LOAD, str(run), str(tmp_path / "hf")],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  assert out.stdout.count("sharded") == 2, out.stdout


# ----- Qwen2.5: a vocabulary padded past the tokenizer, no BOS in the tokenizer files ----------------


@pytest.fixture(scope="module")
def qwen_hf(tmp_path_factory):
  import qwen2_tokenizer

  return qwen2_tokenizer.build_model(tmp_path_factory.mktemp("qwen") / "hf")


def test_qwen2_5_directory_loads_with_cls_past_the_padded_rows(qwen_hf, tmp_path):
  directory, cfg = qwen_hf
  base = transformers.AutoTokenizer.from_pretrained(str(directory))
  loaded = artifacts.load(f"hf:{directory}")
  tok = loaded.tokenizer
  assert tok.base_vocab_size == len(base) < cfg.vocab_size
  assert tok.cls_id == tok.vocab_size == loaded.cfg.cls_id == cfg.vocab_size
  # tokenizer_config.json names no BOS: the model's (config.json's <|endoftext|>), not a guess.
  assert tok.bos_id == loaded.cfg.bos_id == base.convert_tokens_to_ids("<|endoftext|>")
  assert tok.eos_id == loaded.cfg.eos_id == base.convert_tokens_to_ids("<|im_end|>")
  assert loaded.template_name == "qwen2_5"
  # The same tokenizer given on its own (not next to the weights) is fitted by the loader.
  alone = tmp_path / "tok"
  alone.mkdir()
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(directory / name, alone / name)
  other = artifacts.load(f"hf:{directory}", tokenizer=str(alone / "tokenizer.json"))
  assert (other.tokenizer.cls_id, other.tokenizer.bos_id) == (tok.cls_id, tok.bos_id)
  # A tokenizer with more tokens than the model has rows is still refused, by name.
  # An export keeps [CLS] past the padded rows: in clsalign.json, for transformers, and read back.
  from clsalign_jax.interop.hf import save_hf

  save_hf(str(tmp_path / "export"), loaded.cfg, loaded.params, tok)
  exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
  cls_meta = json.loads((tmp_path / "export" / "clsalign.json").read_text())
  assert exported.cls_token_id == cls_meta["cls_token_id"] == cfg.vocab_size
  again = artifacts.load(str(tmp_path / "export"))
  assert (again.tokenizer.base_vocab_size, again.tokenizer.cls_id, again.tokenizer.bos_id) == (
    tok.base_vocab_size,
    tok.cls_id,
    tok.bos_id,
  )
  fields = {**dataclasses.asdict(cfg), "vocab_size": len(base) - 1}
  with pytest.raises(CheckpointError, match=rf"tokenizer .* has {len(base)} tokens, the model {len(base) - 1}"):
    artifacts.load("random:0", tokenizer=str(alone / "tokenizer.json"), model_fields=fields)


def test_qwen2_5_decode_drops_sampled_padded_ids(qwen_hf):
  from clsalign_jax.decode import Decoder, Sampling

  directory, _ = qwen_hf
  loaded = artifacts.load(f"hf:{directory}")
  tok = loaded.tokenizer
  # Larger padded rows of the tied embedding make the LM head sample padded ids among real ones.
  params = jax.tree.map(np.asarray, loaded.params)
  emb = params["embedding"].copy()
  emb[tok.base_vocab_size :] *= 4.0
  params["embedding"] = emb
  decoder = Decoder("qwen", loaded.cfg, params, tok, loaded.template, loaded.decode_config(max_new_tokens=24), 1)
  (g,) = decoder.generate_text([QUERY], sampling=Sampling(temperature=1.0, seed=3))
  ids = list(g.response_ids)
  assert any(tok.is_padded(i) for i in ids) and any(i < tok.base_vocab_size for i in ids)
  hf = transformers.AutoTokenizer.from_pretrained(str(directory))
  assert g.response == hf.decode([i for i in ids if i != tok.eos_id], skip_special_tokens=True)
  assert g.prompt_tokens == len(encode_prompt(tok, loaded.template, QUERY).tokens)
