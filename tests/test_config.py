"""The config schema: every file in configs/ loads and passes the checks its command runs, every key
the code reads is declared in `default_config()`, file lists and lengths parse from the command line,
and the pretraining command of docs/training.md runs (tiny corpus, tiny model)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re
import shlex

import jax
import pytest
from absl import flags
from ml_collections import config_dict, config_flags

from clsalign_jax import config as config_lib
from clsalign_jax import main
from clsalign_jax import model as model_lib
from clsalign_jax.errors import ConfigError
from clsalign_jax.eval import harness

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted(p.name for p in (ROOT / "configs").glob("*.py"))

# The parameter strings each file's get_config is documented with (its docstring); every option of
# the evaluation configs appears in at least one of them.
ARGS = {
  "eval_smollm2.py": [
    None,
    "cls=RUN_DIR,sft=RUN_DIR",
    "cls=RUN,sft=RUN,harmbench=hb.csv,harmbench_targets=t.json,malicious_instruct=mi.txt,"
    "transfer=tr.csv,harmful_responses=h.jsonl,gsm8k=g.jsonl,mmlu=m.csv,judge=hf:/j,"
    "judge_format=harmbench",
  ],
  "results_smollm2.py": [
    None,
    "cls=RUN,sft=RUN,harmful_responses=FILE,phase=main,variants=cls_full",
    "cls=RUN,sft=RUN,size=cpu,phase=gcg",
    "cls=RUN,size=smoke,phase=gcg_adaptive,extras=1",
    "phase=harmful,size=smoke,limit=3",
  ],
}
# Values a preset leaves to the user (its docstring and docs/training.md say so); validation refuses
# the preset without them, naming the key.
REQUIRED_OVERRIDES = {
  "llama7b_pretrain.py": {"data.num_train_examples": 1000, "data.files": ("corpus.jsonl",)},
}


def _load(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"config_{name[:-3]}", ROOT / "configs" / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def _keys(c, prefix: str = "") -> set[str]:
  out = set()
  for k in c.keys():
    out.add(prefix + k)
    if isinstance(c[k], config_dict.ConfigDict):
      out |= _keys(c[k], f"{prefix}{k}.")
  return out


def _set(c, key: str, value) -> None:
  *parents, leaf = key.split(".")
  for p in parents:
    c = c[p]
  c[leaf] = value


def _is_training(c) -> bool:
  return "train" in c and "optimizer" in c


def test_every_config_file_is_covered():
  # A new configs/*.py is validated by its kind automatically; this pins the kinds of today's files.
  kinds = {name: _is_training(_load(name)) for name in CONFIG_FILES}
  assert {n for n, t in kinds.items() if not t} == {"eval_smollm2.py", "eval_tiny.py", "results_smollm2.py"}
  assert len(kinds) >= 10


@pytest.mark.parametrize("name", [n for n in CONFIG_FILES if n not in ARGS])
def test_config_file_validates(name):
  c = _load(name)
  if not _is_training(c):
    harness.check_config(c)
    harness.variants_from(c.to_dict())
    return
  # Same keys as the defaults: a preset that unlocked the dict and added one would slip past the lock.
  assert _keys(c) == _keys(config_lib.default_config())
  assert c.is_locked
  required = REQUIRED_OVERRIDES.get(name, {})
  for key in required:
    partial = _load(name)
    for other, value in required.items():
      if other != key:
        _set(partial, other, value)
    with pytest.raises(ConfigError, match=re.escape(f"config.{key}")):
      config_lib.validate(partial)
  for key, value in required.items():
    _set(c, key, value)
  config_lib.validate(c)
  config_lib.total_steps(c)  # the step count resolves (epochs need an epoch size)


@pytest.mark.parametrize("name,arg", [(n, a) for n in ARGS for a in ARGS[n]])
def test_evaluation_config_with_arguments_validates(name, arg):
  c = _load(name, arg)
  harness.check_config(c)
  variants = harness.variants_from(c.to_dict())
  if arg and "cls=" in arg and "phase=harmful" not in arg:
    assert any(v.checkpoint.startswith("orbax:RUN") for v in variants)


def test_evaluation_check_names_the_misspelt_key():
  c = _load("eval_tiny.py")
  c.probe.top_kk = 3
  with pytest.raises(ConfigError, match=r"config\.probe\.top_kk: .*did you mean top_k\?"):
    harness.check_config(c)
  c = _load("eval_tiny.py")
  c.variants = [("v", "random:0", dict(schedul="each"))]
  with pytest.raises(ConfigError, match=r"config\.variants\[0\]\.decode\.schedul: .*did you mean schedule\?"):
    harness.check_config(c)
  c = _load("eval_tiny.py")
  c.judge_validation = [dict(c.judge_validation[0], judge="nope")]
  with pytest.raises(ConfigError, match="config.judge_validation.0..judge='nope' is not a judge name"):
    harness.check_config(c)
  c = _load("eval_tiny.py")
  c.attacks = [dict(c.attacks[0], kind="gcgg")]
  with pytest.raises(ConfigError, match=r"config\.attacks\[0\]\.kind='gcgg'"):
    harness.check_config(c)


def test_training_config_sections_are_read_as_attributes():
  # A `.get()` with a default hides a key default_config() lacks until someone sets it; attribute
  # reads fail in the tests instead.
  sections = "|".join(k for k in config_lib.default_config().keys() if k != "model")
  pattern = re.compile(rf"\bconfig\.(?:{sections})\.get\(")
  hits = [
    f"{p.relative_to(ROOT)}:{n}"
    for p in (ROOT / "clsalign_jax").rglob("*.py")
    for n, line in enumerate(p.read_text().splitlines(), 1)
    if pattern.search(line)
  ]
  assert not hits


def test_validation_knows_the_data_rooms_pretraining_sources():
  # config.validate refuses a pretraining source without files; the data room serves those names.
  from clsalign_jax.data import sources

  assert config_lib.PRETRAIN_SOURCES == sources.PRETRAIN_SOURCES


def test_file_lists_and_lengths_parse_from_the_command_line():
  fv = flags.FlagValues()
  argv = [
    "prog",
    "--config=configs/tiny.py",
    "--config.data.files=corpus.jsonl",
    "--config.data.files=/d/more.jsonl",
    "--config.data.bucket_lengths=(32,48)",
    "--config.data.data_dir=/tmp/tfds",
    "--config.data.balance_classes=false",
    "--config.data.skip_bad_records=true",
  ]
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  c = fv.config
  assert c.data.files == ("corpus.jsonl", "/d/more.jsonl")
  assert c.data.bucket_lengths == (32, 48) and c.data.data_dir == "/tmp/tfds"
  assert (c.data.balance_classes, c.data.skip_bad_records) == (False, True)
  config_lib.validate(c)
  with c.unlocked():
    c.data.files = ["a.jsonl"]  # a list in a preset file becomes a tuple
  assert c.data.files == ("a.jsonl",)
  with pytest.raises(TypeError):
    c.data.files = "a.jsonl"  # a bare string is refused, not split into characters


def _pretrain_command() -> list[str]:
  """The pretraining command of docs/training.md, backslash continuations joined."""
  text = (ROOT / "docs" / "training.md").read_text().replace("\\\n", " ")
  lines = [line for line in text.splitlines() if "configs/llama7b_pretrain.py" in line and "clsalign_jax.main" in line]
  assert len(lines) == 1, lines
  return shlex.split(lines[0])


TINY = dict(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=64)


def test_documented_pretraining_command_runs(tmp_path):
  from clsalign_jax.data.tokenizer import Tokenizer
  from clsalign_jax.interop.hf import save_hf

  # The command's base model, at toy size: the llama2_7b preset's architecture with tiny widths, and
  # the eval fixtures' byte-level tokenizer (bos 1, eos 2).
  cfg = dataclasses.replace(model_lib.PRESETS["llama2_7b"], **TINY)
  hf_dir = tmp_path / "Llama-2-7b-hf"
  save_hf(
    str(hf_dir),
    cfg,
    model_lib.init_params(cfg, jax.random.key(0)),
    Tokenizer.from_tokenizer_json(str(ROOT / "tests" / "fixtures" / "eval" / "tiny_tokenizer")),
  )
  corpus = tmp_path / "corpus.jsonl"
  # Enough documents that the builder's 1 % validation split is not empty.
  corpus.write_text(
    "".join(
      json.dumps(
        {"text": f"Document {i}: " + ("how to hurt " if i % 2 else "how to help ") * (2 + i % 5), "label": i % 2}
      )
      + "\n"
      for i in range(400)
    )
  )
  workdir = tmp_path / "llama7b_pt"

  command = _pretrain_command()
  assert command[:3] == ["python", "-m", "clsalign_jax.main"]
  subst = {
    "/models/Llama-2-7b-hf": str(hf_dir),
    "runs/llama7b_pt": str(workdir),
    "corpus.jsonl": str(corpus),
    "<rows>": "16",
  }
  placeholders = re.compile("|".join(map(re.escape, subst)))
  args = [placeholders.sub(lambda m: subst[m.group(0)], arg) for arg in command[3:]]
  assert any(a.startswith("--config.data.files=") for a in args), "the documented command must name the corpus"
  tiny = [f"--config.model.{k}={v}" for k, v in TINY.items()] + [
    "--config.data.seq_len=64",
    "--config.data.global_batch_size=4",
    "--config.train.num_steps=2",
    "--config.eval.num_batches=1",
    f"--config.data.data_dir={tmp_path / 'tfds'}",
    "--config.metrics.progress_bar=false",
    "--config.checkpoint.async_save=false",
  ]
  assert main.main(["prog", *args, *tiny]) == 0

  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2] and any(r["split"] == "eval" for r in records)
  # The preset's recipe reached the run: pretraining mode, λ1 = 0.01, the lr 2e-5 of the defaults.
  run = json.loads((workdir / "config.json").read_text())
  assert run["train"]["mode"] == "pretrain" and run["loss"]["cls_weight"] == 0.01
  assert run["data"]["files"] == [str(corpus)] and run["data"]["num_train_examples"] == 16
  assert train[0]["learning_rate"] == pytest.approx(2e-5)
  # loss = L_lm + 0.01 · BCE, and the start is the HF model's random weights: L_lm near ln(259).
  for r in train:
    assert r["loss"] == pytest.approx(r["lm_loss"] + 0.01 * r["cls_loss"], rel=1e-5)
  assert abs(train[0]["lm_loss"] - 5.557) < 0.3
  assert (workdir / "checkpoints" / "2").is_dir()
