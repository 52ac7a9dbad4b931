"""Bad inputs against every CLI: each ends in one `error:` line naming the culprit, with exit code 2
(wrong invocation) or 1 (failure), and leaves what is on disk untouched.

Most cases call the CLIs' `main(argv)` in-process (one JAX start-up for the whole module); a few
run the real entry points as subprocesses (exit codes, no traceback, two processes on one
workdir). The table in docs/reliability.md lists these cases; keep the two in step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy

from clsalign_jax import convert, evaluate, generate, main
from clsalign_jax import metrics as metrics_lib
from clsalign_jax.data import records
from clsalign_jax.interop.hf import save_hf
from clsalign_jax.model import ModelConfig, abstract_params

REPO = Path(__file__).resolve().parents[1]
TINY = [
  "--config=configs/tiny.py",
  "--config.metrics.progress_bar=false",
  "--config.train.num_steps=6",
  "--config.checkpoint.every_steps=3",
  "--config.eval.every_steps=3",
]


def tree_digest(root) -> dict[str, str]:
  """sha256 of every file under `root` (and the set of directories), to compare before/after."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
    for f in filenames:
      path = os.path.join(dirpath, f)
      out[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
  return out


def call(cli_main, argv, capsys) -> tuple[int, str]:
  """Run a CLI in-process; returns (exit code, its last stderr line)."""
  capsys.readouterr()
  code = cli_main(["prog", *argv])
  err = capsys.readouterr().err.strip().splitlines()
  return code, err[-1] if err else ""


def check(cli_main, argv, code, needle, capsys, *untouched):
  """The case's contract: exit code, one `error:` line containing `needle`, `untouched` trees unchanged."""
  before = [tree_digest(p) if os.path.exists(p) else None for p in untouched]
  got, line = call(cli_main, argv, capsys)
  assert got == code, (argv, got, line)
  assert line.startswith("error: ") and needle in line, (argv, line)
  assert [tree_digest(p) if os.path.exists(p) else None for p in untouched] == before, argv


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A completed tiny run (checkpoints 3 and 6); every case below must leave it byte-identical."""
  workdir = tmp_path_factory.mktemp("completed") / "run"
  assert main.main(["prog", *TINY, f"--workdir={workdir}"]) == 0
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  assert not (workdir / ".lock").exists()
  return workdir


@pytest.fixture(scope="module")
def run_digest(run_dir):
  return tree_digest(run_dir)


@pytest.fixture
def run_copy(run_dir, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(run_dir, copy)
  return copy


# --- configs: refused before anything is written ------------------------------------------------

CONFIG_CASES = [
  ("--config.checkpoint.keep=0", "config.checkpoint.keep=0: must be >= 1"),
  ("--config.optimizer.learning_rate=-1", "config.optimizer.learning_rate=-1.0: must be > 0"),
  ("--config.optimizer.learning_rate=nan", "config.optimizer.learning_rate=nan"),
  ("--config.train.num_steps=0", "config.train.num_steps=0"),
  ("--config.data.global_batch_size=0", "config.data.global_batch_size=0"),
  ("--config.train.grad_accum_steps=0", "config.train.grad_accum_steps=0"),
  ("--config.train.grad_accum_steps=3", "global_batch_size=8 is not a multiple of config.train.grad_accum_steps=3"),
  ("--config.data.seq_len=1000", "config.data.seq_len=1000 exceeds the model's max_seq_len=128"),
  ("--config.schedule.name=linear", "config.schedule.name='linear'"),
  ("--config.train.trainable=(", "config.train.trainable='('"),
  ("--config.init_from=s3:bucket", "config.init_from='s3:bucket'"),
  ("--config.guard.divergence_factor=0.5", "config.guard.divergence_factor=0.5"),
  ("--config.eval.num_batches=0", "config.eval.num_batches=0"),
  ("--config.model.head_dim=15", "config.model.head_dim=15"),
  ("--config.model.n_kv_heads=3", "config.model.n_heads=4 is not a multiple of config.model.n_kv_heads=3"),
  ("--config.optimizer.state_dtype=int8", "config.optimizer.state_dtype='int8'"),
  ("--config.loss.cls_threshold=1.5", "config.loss.cls_threshold=1.5"),
  (
    "--config.train.nm_steps=3",
    "--config.train.nm_steps=3: no such config key train.nm_steps; did you mean train.num_steps?",
  ),
  ("--config.data.flies=x", "--config.data.flies=x: no such config key data.flies; did you mean data.files?"),
  ("--config.dta.seq_len=8", "--config.dta.seq_len=8: no such config key dta.seq_len; did you mean data.seq_len?"),
  ("--config.data.bucket_lengths=1", "config.data.bucket_lengths=(1,): lengths must be >= 2"),
  ("--config.data.files=7", "config.data.files=(7,): expected a tuple of paths (str)"),
  ("--config.data.source=wiki_pretrain", "config.data.source='wiki_pretrain' needs config.data.files"),
  ("--config.train.num_steps=abc", "--config.train.num_steps=abc"),
  ("--bogus_flag=1", "Unknown command line flag 'bogus_flag'"),
]


@pytest.mark.parametrize(
  "arg,needle", CONFIG_CASES, ids=[a.split("=")[0].lstrip("-") + "=" + a.partition("=")[2] for a, _ in CONFIG_CASES]
)
def test_config_value_is_refused_naming_the_key(arg, needle, run_dir, run_digest, capsys):
  check(main.main, [*TINY, f"--workdir={run_dir}", arg], 2, needle, capsys)
  assert tree_digest(run_dir) == run_digest


def test_config_file_errors(run_dir, run_digest, tmp_path, capsys):
  check(main.main, ["--config=configs/nope.py", f"--workdir={run_dir}"], 2, "--config=configs/nope.py", capsys)
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  check(main.main, [f"--config={broken}", f"--workdir={run_dir}"], 2, f"{broken}:1: ", capsys)
  # A key the locked default config does not declare: the file's line, the key and the closest one.
  misspelt = tmp_path / "misspelt.py"
  misspelt.write_text(
    "from clsalign_jax.config import default_config\n\n\ndef get_config():\n"
    "  c = default_config()\n  c.data.update(seq_len=64)\n  c.data.flies = ('x.jsonl',)\n  return c\n"
  )
  check(
    main.main,
    [f"--config={misspelt}", f"--workdir={run_dir}"],
    2,
    f"{misspelt}:7: no such config key data.flies; did you mean data.files?",
    capsys,
  )
  misspelt.write_text(misspelt.read_text().replace("c.data.flies = ('x.jsonl',)", "c.trian.mode = 'sft'"))
  check(
    main.main,
    [f"--config={misspelt}", f"--workdir={run_dir}"],
    2,
    f"{misspelt}:7: no such config key trian; did you mean train?",
    capsys,
  )
  # A declared key given a value of another type: the key and ml_collections' reason, not a traceback.
  misspelt.write_text(misspelt.read_text().replace("c.trian.mode = 'sft'", "c.data.files = 'x.jsonl'"))
  check(
    main.main,
    [f"--config={misspelt}", f"--workdir={run_dir}"],
    2,
    f"{misspelt}:7: config.data.files: x.jsonl is of original type <class 'str'> and cannot be casted to type "
    "<class 'tuple'>",
    capsys,
  )
  check(main.main, [f"--workdir={run_dir}"], 2, "--config is required", capsys)
  check(main.main, [*TINY], 2, "--workdir is required", capsys)
  check(main.main, [*TINY, f"--workdir={run_dir}", "extra"], 2, "unexpected arguments: ['extra']", capsys)
  assert tree_digest(run_dir) == run_digest


def test_refused_run_on_a_new_workdir_creates_nothing(tmp_path, capsys):
  fresh = tmp_path / "fresh"
  check(
    main.main,
    [*TINY, f"--workdir={fresh}", "--config.init_from=hf:/nonexistent"],
    1,
    "hf:/nonexistent: /nonexistent: not found",
    capsys,
  )
  assert not fresh.exists()


# --- checkpoints --------------------------------------------------------------------------------


def test_other_model_is_refused_and_config_json_kept(run_dir, run_digest, capsys):
  check(
    main.main,
    [*TINY, f"--workdir={run_dir}", "--config.model.d_ff=256", "--config.train.num_steps=9"],
    1,
    "checkpoints/6: does not match the configured model (d_ff: 128 there vs 256 in the config)",
    capsys,
  )
  assert tree_digest(run_dir) == run_digest


def _flip_a_byte(path: Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x40
  path.write_bytes(bytes(data))


def _params_files(step_dir: Path) -> list[Path]:
  return sorted(p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d")


def test_corrupted_step_is_refused_naming_the_file(run_copy, capsys):
  victim = _params_files(run_copy / "checkpoints" / "6")[0]
  _flip_a_byte(victim)
  rel = victim.relative_to(run_copy / "checkpoints" / "6")
  check(
    main.main,
    [*TINY, f"--workdir={run_copy}", "--config.train.num_steps=9"],
    1,
    f"checkpoints/6: checkpoint is corrupted: {rel} differs from the sha256",
    capsys,
    run_copy,
  )


def test_missing_file_and_torn_digest_file(run_copy, capsys):
  _params_files(run_copy / "checkpoints" / "6")[0].unlink()
  check(main.main, [*TINY, f"--workdir={run_copy}", "--config.train.num_steps=9"], 1, "is missing", capsys, run_copy)
  (run_copy / "checkpoints" / "6" / "digests.json").write_text('{"files": ')
  check(
    main.main,
    [*TINY, f"--workdir={run_copy}", "--config.train.num_steps=9"],
    1,
    "6/digests.json: unreadable digest file",
    capsys,
    run_copy,
  )


def test_fallback_to_intact_step_only_when_asked(run_copy, capsys):
  _flip_a_byte(_params_files(run_copy / "checkpoints" / "6")[0])
  code, line = call(main.main, [*TINY, f"--workdir={run_copy}", "--config.checkpoint.fallback_to_intact=true"], capsys)
  assert code == 0, line
  assert sorted(os.listdir(run_copy / "checkpoints")) == ["3", "6"]  # step 6 trained again from 3
  assert sorted(os.listdir(run_copy / "corrupt_checkpoints")) == ["6"]  # the bad one is kept, aside
  steps = [json.loads(l)["step"] for l in (run_copy / "metrics.jsonl").read_text().splitlines()]
  assert steps.count(4) == 1 and max(steps) == 6


def test_metrics_jsonl_torn_last_line_is_dropped_and_a_bad_middle_line_named(tmp_path):
  path = tmp_path / "metrics.jsonl"
  good = [json.dumps({"step": s, "split": "train", "loss": 1.0}) for s in (1, 2, 3)]
  path.write_text("\n".join(good) + '\n{"step": 4, "spl')
  metrics_lib.MetricWriter(str(tmp_path), 2, 6, progress_bar=False).close()
  assert path.read_text() == "\n".join(good[:2]) + "\n"
  path.write_text(good[0] + "\nnot json\n" + good[1] + "\n")
  with pytest.raises(ValueError, match=f"{path}:2: not a metrics record"):
    metrics_lib.MetricWriter(str(tmp_path), 2, 6, progress_bar=False)


# --- the workdir lock ---------------------------------------------------------------------------

_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from clsalign_jax.lock import workdir_lock
    with workdir_lock(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(600)
""")


def test_second_process_is_refused_and_a_dead_holder_is_taken_over(run_dir, run_digest, capsys):
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLD_LOCK, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = tree_digest(run_dir)
    check(main.main, [*TINY, f"--workdir={run_dir}"], 1, f"workdir {run_dir} is in use by process {holder.pid}", capsys)
    assert tree_digest(run_dir) == before
  finally:
    holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops the flock, the file stays
    holder.wait()
  assert (run_dir / ".lock").exists()
  code, _ = call(main.main, [*TINY, f"--workdir={run_dir}"], capsys)
  assert code == 0
  assert tree_digest(run_dir) == run_digest  # the stale lock file is gone again


def test_two_trainings_on_one_workdir(tmp_path, capsys):
  """A real training process holds the workdir; a second training is refused and A is unharmed."""
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  a = subprocess.Popen(
    [sys.executable, "-m", "clsalign_jax.main", *TINY, f"--workdir={workdir}", "--config.train.num_steps=8"],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 120
  while not (workdir / ".lock").exists() and a.poll() is None and time.monotonic() < deadline:
    time.sleep(0.1)
  check(
    main.main,
    [*TINY, f"--workdir={workdir}", "--config.optimizer.learning_rate=0.1"],
    1,
    f"is in use by process {a.pid}",
    capsys,
  )
  _, err = a.communicate(timeout=240)
  assert a.returncode == 0, err[-3000:]
  steps = [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert sorted(set(steps)) == list(range(1, 9))
  assert json.loads((workdir / "config.json").read_text())["optimizer"]["learning_rate"] == 3e-3
  assert not (workdir / ".lock").exists()


# --- training guards ----------------------------------------------------------------------------


def test_divergence_guard_stops_before_saving_and_names_the_last_good_step(tmp_path, capsys):
  # From step 9 the lr is 300x: losses go 5.4 -> 30..54, finite but far above their median.
  workdir = tmp_path / "run"
  argv = [
    *TINY,
    f"--workdir={workdir}",
    "--config.train.num_steps=14",
    "--config.checkpoint.every_steps=2",
    "--config.eval.every_steps=0",
    "--config.schedule.name=step",
    "--config.schedule.decay_every_steps=6",
    "--config.schedule.decay_rate=300",
    "--config.guard.divergence_factor=5",
  ]
  code, line = call(main.main, argv, capsys)
  assert code == 1
  assert line.startswith("error: step 12: loss=") and "above 5 x its running median" in line
  assert line.endswith(f"Last good checkpoint: step 8 in {workdir / 'checkpoints'}")
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints")) == [4, 6, 8]


def test_divergence_from_the_first_steps_saves_nothing(tmp_path, capsys):
  workdir = tmp_path / "run"
  code, line = call(
    main.main,
    [*TINY, f"--workdir={workdir}", "--config.optimizer.learning_rate=1e6", "--config.schedule.warmup_steps=0"],
    capsys,
  )
  assert code == 1
  assert line.startswith("error: step 4: loss=") and "above 10 x its running median" in line, line
  assert "Last good checkpoint: none (no step was saved" in line
  assert os.listdir(workdir / "checkpoints") == []


def test_loss_guard_rules():
  from clsalign_jax.train import LossGuard

  converged = LossGuard(10.0, 3, 50)
  assert not any(converged.observe(i, x) for i, x in enumerate([0.01] * 20 + [0.3, 0.4, 0.5, 0.3], 1))
  assert not converged.tripped  # 30x the median, but within 1 nat: batch noise, not divergence
  blowup = LossGuard(10.0, 3, 50)
  flags = [blowup.observe(i, x) for i, x in enumerate([5.6, 50005.0, 39147.0, 1398.0], 1)]
  assert flags == [False, True, True, True] and blowup.tripped and blowup.first_flagged == 2
  spike = LossGuard(10.0, 3, 50)
  for i, x in enumerate([5.0, 4.9, 80.0, 4.8, 90.0, 85.0, 4.7], 1):
    spike.observe(i, x)
    assert not spike.tripped  # isolated spikes and two in a row are tolerated
  off = LossGuard(0.0, 1, 50)
  assert not any(off.observe(i, x) for i, x in enumerate([1.0, 1e9, 1e9], 1))


# --- data files (the readers training uses) -----------------------------------------------------

DATA_CASES = [
  ("bad.jsonl", b'{"prompt": "a", "response": "b", "label": 0}\n{"prompt": "a",\n', "bad.jsonl:2: malformed JSON"),
  ("label.jsonl", b'{"prompt": "a", "response": "b", "label": 2}\n', "label.jsonl:1: label outside {0, 1}: 2"),
  ("noprompt.jsonl", b'{"response": "b", "label": 1}\n', "noprompt.jsonl:1: missing field 'prompt'"),
  ("utf8.jsonl", b'{"prompt": "a\xff", "response": "b", "label": 1}\n', "utf8.jsonl:1: not valid UTF-8"),
  ("list.jsonl", b"[1, 2]\n", "list.jsonl:1: expected a JSON object"),
  ("data.txt", b"hello\n", "data.txt: unsupported file type '.txt'"),
  ("empty_response.jsonl", b'{"prompt": "a", "response": "", "label": 0}\n', "empty_response.jsonl:1: empty"),
  ("empty.jsonl", b"", "empty.jsonl: no records"),
  ("blank.csv", b"prompt,response,label\n\n", "blank.csv: no records"),
  (
    "dup.jsonl",
    b'{"prompt": "a", "response": "b", "label": 0}\n{"prompt": "a", "response": "b", "label": 0, "label": 1}\n',
    "dup.jsonl:2: duplicate key 'label' in one object",
  ),
  ("dup.json", b'[{"prompt": "a", "response": "b", "label": 0, "label": 1}]', "dup.json: duplicate key 'label'"),
]


@pytest.mark.parametrize("name,content,needle", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_record_names_file_and_line(name, content, needle, tmp_path):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(records.DataError) as e:
    records.read_sft_records(path)
  assert needle in str(e.value) and "\n" not in str(e.value)
  assert path.read_bytes() == content


# --- HF / GGUF / orbax weights: convert and init_from ------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
  from clsalign_jax.data.tokenizer import Tokenizer, smollm2_gguf_path

  tokenizer = Tokenizer.from_gguf(smollm2_gguf_path())
  cfg = ModelConfig(
    vocab_size=tokenizer.vocab_size,
    d_model=16,
    n_layers=1,
    n_heads=2,
    n_kv_heads=1,
    head_dim=8,
    d_ff=32,
    max_seq_len=256,
    tie_embeddings=True,
    bos_id=tokenizer.bos_id,
    eos_id=tokenizer.eos_id,
  )
  rng = np.random.default_rng(0)
  shapes, treedef = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_params(cfg)))
  params = jax.tree.unflatten(treedef, [rng.normal(0.0, 0.02, x.shape).astype(np.float32) for _, x in shapes])
  return cfg, params, tokenizer


@pytest.fixture(scope="module")
def hf_dirs(tiny_model, tmp_path_factory):
  """A good HF export and broken variants of it."""
  cfg, params, tokenizer = tiny_model
  root = tmp_path_factory.mktemp("hf")
  good = root / "good"
  save_hf(str(good), cfg, params, tokenizer)
  dirs = {"good": good}
  for name in ("int32", "bad_json", "missing", "shape", "no_weights"):
    shutil.copytree(good, root / name)
    dirs[name] = root / name
  weights = lambda d: safetensors.numpy.load_file(d / "model.safetensors")
  t = weights(good)
  safetensors.numpy.save_file(
    {**t, "model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].astype(np.int32)},
    dirs["int32"] / "model.safetensors",
    metadata={"format": "pt"},
  )
  (dirs["bad_json"] / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n  "vocab_size": }')
  safetensors.numpy.save_file(
    {k: v for k, v in t.items() if k != "model.norm.weight"},
    dirs["missing"] / "model.safetensors",
    metadata={"format": "pt"},
  )
  safetensors.numpy.save_file(
    {**t, "model.norm.weight": np.ones(7, np.float32)}, dirs["shape"] / "model.safetensors", metadata={"format": "pt"}
  )
  (dirs["no_weights"] / "model.safetensors").unlink()
  # A header claiming a 2^20 x 2^20 tensor backed by 64 bytes.
  shutil.copytree(good, root / "huge_header")
  dirs["huge_header"] = root / "huge_header"
  header = json.dumps(
    {"model.norm.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 64]}}
  ).encode()
  (dirs["huge_header"] / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
  gguf = root / "junk.gguf"
  gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)
  dirs["junk.gguf"] = gguf
  orbax_dir = root / "orbax_bad_config"
  convert.save_orbax_params(str(orbax_dir), cfg, params)
  (orbax_dir / convert.ORBAX_CONFIG).write_text('{"vocab_size": 10, "n_experts": 4}')
  dirs["orbax_bad_config"] = orbax_dir
  return dirs


HF_CASES = [
  ("int32", "tensor layers_0/mlp/up_proj has dtype int32; weights must be one of"),
  ("bad_json", "bad_json/config.json:2: invalid JSON"),
  ("missing", "tensor 'model.norm.weight' is missing"),
  ("shape", "tensor 'model.norm.weight' has shape (7,), expected (16,)"),
  ("no_weights", "neither model.safetensors nor model.safetensors.index.json found"),
  ("junk.gguf", "junk.gguf: not a readable GGUF file"),
  ("orbax_bad_config", "model_config.json: not a model config"),
  ("huge_header", "huge_header/model.safetensors: not a readable safetensors file"),
]


@pytest.mark.parametrize("name,needle", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_convert_refuses_bad_weights(name, needle, hf_dirs, tmp_path, capsys):
  dst = tmp_path / "out"
  check(convert.main, [f"--src={hf_dirs[name]}", f"--dst={dst}"], 1, needle, capsys, hf_dirs[name])
  assert not dst.exists()


def test_convert_usage_errors(hf_dirs, tmp_path, capsys):
  dst = tmp_path / "taken"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  check(
    convert.main,
    [f"--src={hf_dirs['good']}", f"--dst={dst}"],
    2,
    f"--dst={dst} exists and is not an empty",
    capsys,
    dst,
  )
  check(convert.main, [f"--dst={tmp_path / 'x'}"], 2, "--src and --dst are required", capsys)
  check(
    convert.main,
    [f"--src={hf_dirs['good']}", f"--dst={tmp_path / 'x'}", "--dtype=int8"],
    2,
    "--dtype=int8: value should be one of",
    capsys,
  )
  check(
    convert.main,
    [f"--src={tmp_path / 'nothing'}", f"--dst={tmp_path / 'x'}"],
    1,
    "nothing: not found (expected smollm2",
    capsys,
  )
  assert not (tmp_path / "x").exists()


def test_init_from_int32_weights_is_refused_before_the_workdir_exists(hf_dirs, tmp_path, capsys):
  fresh = tmp_path / "fresh"
  argv = [
    *TINY,
    f"--workdir={fresh}",
    f"--config.init_from=hf:{hf_dirs['int32']}",
    "--config.model.vocab_size=49152",
    "--config.model.d_model=16",
    "--config.model.n_layers=1",
    "--config.model.n_heads=2",
    "--config.model.n_kv_heads=1",
    "--config.model.head_dim=8",
    "--config.model.d_ff=32",
    "--config.model.max_seq_len=256",
    "--config.model.tie_embeddings=true",
  ]
  check(main.main, argv, 1, "has dtype int32", capsys)
  assert not fresh.exists()


# --- generate -----------------------------------------------------------------------------------


def test_generate_refuses_bad_prompts_and_flags(hf_dirs, tmp_path, capsys):
  ckpt = f"--checkpoint={hf_dirs['good']}"
  blank = tmp_path / "blank.txt"
  blank.write_text("\n   \n\t\n")
  cases = [
    ([ckpt, "--prompt=hello", "--prompt=   "], 2, "--prompt #2 is empty or whitespace-only"),
    ([ckpt], 2, "give --prompt or --prompt_file"),
    ([ckpt, f"--prompt_file={blank}"], 2, f"--prompt_file={blank}: no non-empty line"),
    ([ckpt, f"--prompt_file={tmp_path / 'none.txt'}"], 1, "none.txt"),
    ([ckpt, "--prompt=" + "word " * 2000], 2, "exceeds the model's context of 256 tokens"),
    ([ckpt, "--prompt=" + "word " * 100, "--max_new_tokens=200"], 2, "with --max_new_tokens=200 that exceeds"),
    ([ckpt, "--prompt=hi", "--max_new_tokens=0"], 2, "--max_new_tokens"),
    ([ckpt, "--prompt=hi", "--top_p=2"], 2, "--top_p"),
    ([ckpt, "--prompt=hi", "--r=1,2"], 2, "--r=1,2: expected three integers"),
    ([ckpt, "--prompt=hi", "--schedule=sometimes"], 2, "--schedule"),
    ([f"--checkpoint={hf_dirs['int32']}", "--prompt=hi"], 1, "has dtype int32"),
    ([f"--checkpoint={hf_dirs['orbax_bad_config']}", "--prompt=hi"], 1, "not a model config"),
  ]
  for argv, code, needle in cases:
    check(generate.main, argv, code, needle, capsys, hf_dirs["good"])


# --- evaluate -----------------------------------------------------------------------------------


def test_evaluate_config_errors(tmp_path, capsys):
  check(evaluate.main, [], 2, "--config is required", capsys)
  check(evaluate.main, ["--config=configs/nope_eval.py"], 2, "--config=configs/nope_eval.py", capsys)
  check(
    evaluate.main,
    ["--config=configs/eval_tiny.py", "--config.batch_sise=2"],
    2,
    "--config.batch_sise=2: no such config key batch_sise; did you mean batch_size?",
    capsys,
  )
  # Evaluation configs are not locked while their file runs: a misspelt key is caught by the harness.
  misspelt = tmp_path / "eval_misspelt.py"
  misspelt.write_text(
    f"import sys\nsys.path.insert(0, {str(REPO / 'configs')!r})\nimport eval_tiny\n\n\n"
    "def get_config():\n  c = eval_tiny.get_config()\n  c.utilty = []\n  return c\n"
  )
  check(
    evaluate.main,
    [f"--config={misspelt}", f"--config.output_dir={tmp_path / 'out'}"],
    2,
    "config.utilty: not a key the evaluation reads; did you mean utility?",
    capsys,
  )
  assert not (tmp_path / "out").exists()


def test_evaluate_regenerates_a_cell_whose_file_is_short(tmp_path):
  from clsalign_jax.eval import harness as harness_lib
  from train_utils import load_config

  config = load_config("eval_tiny")
  config.output_dir = str(tmp_path)
  h = harness_lib.Harness(config)
  v, a, b = h.cells()[0]
  jsonl, meta = h.gen_paths(v, a, b)
  jsonl.parent.mkdir(parents=True)
  rows = [json.dumps({"item_id": str(i), "response": "r"}) for i in range(3)]
  meta.write_text(json.dumps({"fingerprint": h.gen_fingerprint(v, a, b), "n_cases": 3}))
  jsonl.write_text("\n".join(rows) + "\n")
  assert h.gen_done(v, a, b)
  jsonl.write_text("\n".join(rows[:2]) + "\n")  # truncated: one case lost
  assert not h.gen_done(v, a, b)
  jsonl.write_text("\n".join(rows[:2]) + '\n{"item_id": "2", "resp')  # torn last line
  assert not h.gen_done(v, a, b)


# --- the real entry points: exit codes, one line, no traceback ---------------------------------


def test_entry_points_exit_codes_without_traceback(run_dir, run_digest, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  commands = [
    (["clsalign_jax.main", *TINY, f"--workdir={run_dir}", "--config.checkpoint.keep=0"], 2, "config.checkpoint.keep=0"),
    (["clsalign_jax.generate", "--prompt= "], 2, "--prompt #1 is empty"),
    (["clsalign_jax.convert", f"--src={tmp_path / 'missing'}", f"--dst={tmp_path / 'out'}"], 1, "missing: not found"),
    (["clsalign_jax.evaluate"], 2, "--config is required"),
  ]
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for cmd, _, _ in commands
  ]
  for proc, (cmd, code, needle) in zip(procs, commands):
    _, err = proc.communicate(timeout=120)
    lines = [l for l in err.strip().splitlines() if l.startswith("error: ")]
    assert proc.returncode == code, (cmd, err[-2000:])
    assert len(lines) == 1 and needle in lines[0], (cmd, err[-2000:])
    assert "Traceback" not in err, (cmd, err[-2000:])
  assert tree_digest(run_dir) == run_digest
  debug = subprocess.run(
    [sys.executable, "-m", "clsalign_jax.evaluate", "--config=configs/nope.py", "--debug"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_completed_run_survived_every_case(run_dir, run_digest):
  assert tree_digest(run_dir) == run_digest


# --- shared directories, checkpoints without or beyond their digests -----------------------------


def test_workdir_that_is_a_file(tmp_path, capsys):
  path = tmp_path / "workdir.txt"
  path.write_text("not a directory")
  check(main.main, [*TINY, f"--workdir={path}"], 2, f"workdir {path}: exists and is not a directory", capsys, path)


def test_convert_refuses_a_destination_inside_a_run(run_dir, run_digest, capsys):
  for dst in (run_dir / "checkpoints" / "8", run_dir / "export", run_dir / "checkpoints" / "6" / "x"):
    check(convert.main, [f"--src={run_dir}", f"--dst={dst}"], 2, f"--dst={dst} is inside the training run", capsys)
  assert tree_digest(run_dir) == run_digest


def test_evaluate_takes_the_lock_of_its_output_directory(tmp_path, capsys):
  out = tmp_path / "eval_out"
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    check(
      evaluate.main,
      ["--config=configs/eval_tiny.py", f"--config.output_dir={out}"],
      1,
      f"output directory {out} is in use by process {holder.pid}",
      capsys,
      out,
    )
  finally:
    holder.kill()
    holder.wait()


def test_step_without_digests_is_refused_unless_allowed(run_copy, capsys):
  """An undigested step (an older version wrote it) is refused by name; the flag restores it."""
  (run_copy / "checkpoints" / "6" / "digests.json").unlink()
  check(
    main.main,
    [*TINY, f"--workdir={run_copy}", "--config.train.num_steps=9"],
    1,
    f"{run_copy / 'checkpoints' / '6'}: no digests.json, so its files cannot be checked",
    capsys,
    run_copy,
  )
  _, line = call(main.main, [*TINY, f"--workdir={run_copy}", "--config.train.num_steps=9"], capsys)
  assert "rerun with --config.checkpoint.allow_unverified=true (training, init_from)" in line
  # Allowed: the step is restored (nothing is left to train at 6 of 6).
  capsys.readouterr()
  assert main.main(["prog", *TINY, f"--workdir={run_copy}", "--config.checkpoint.allow_unverified=true"]) == 0
  assert "training is complete: checkpoint at step 6" in capsys.readouterr().out
  # Readers refuse it the same way; convert has its own flag.
  dst = run_copy.parent / "export"
  check(convert.main, [f"--src={run_copy}", f"--dst={dst}"], 1, "no digests.json", capsys, run_copy)
  assert not dst.exists()
  assert convert.main(["prog", f"--src={run_copy}", f"--dst={dst}", "--allow_unverified"]) == 0
  assert (dst / "model.safetensors").exists()


def test_file_not_in_the_digests_is_refused(run_copy, capsys):
  (run_copy / "checkpoints" / "6" / "params" / "extra.bin").write_bytes(b"planted")
  check(
    main.main,
    [*TINY, f"--workdir={run_copy}", "--config.train.num_steps=9"],
    1,
    "checkpoints/6: checkpoint is corrupted: params/extra.bin is not listed in its digests.json",
    capsys,
    run_copy,
  )


def test_corrupted_step_that_cannot_be_moved_aside(run_copy, capsys):
  """fallback_to_intact with nowhere to move the corrupted step: refused before anything is written."""
  _flip_a_byte(_params_files(run_copy / "checkpoints" / "6")[0])
  (run_copy / "corrupt_checkpoints").write_text("a file where the directory should go")
  check(
    main.main,
    [*TINY, f"--workdir={run_copy}", "--config.train.num_steps=9", "--config.checkpoint.fallback_to_intact=true"],
    1,
    f"{run_copy / 'corrupt_checkpoints'}: exists and is not a directory, so the corrupted steps [6] cannot be moved",
    capsys,
    run_copy,
  )


def test_move_aside_failure_is_one_line(tmp_path):
  from clsalign_jax import checkpoint

  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(1, {"w": np.arange(3.0)}, {"c": np.arange(2)}, {"step": np.array(1)}, {}, {})
  (tmp_path / "aside").write_text("a file")
  with pytest.raises(checkpoint.CheckpointError) as e:
    ckpt.move_aside(1, str(tmp_path / "aside"))
  ckpt.close()
  assert str(e.value).startswith(f"{tmp_path / 'checkpoints' / '1'}: cannot move this step aside to ")
  assert "FileExistsError" in str(e.value) and "\n" not in str(e.value)
  assert (tmp_path / "checkpoints" / "1").is_dir()


def test_reading_a_run_in_progress_names_its_newest_complete_step(run_dir, run_digest, caplog):
  from clsalign_jax import artifacts

  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLD_LOCK, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with caplog.at_level("WARNING"):
      loaded = artifacts.load(str(run_dir), tokenizer="none")
  finally:
    holder.kill()
    holder.wait()
  assert loaded.step == 6
  assert f"{run_dir}: run in progress (process {holder.pid} on " in caplog.text
  assert "newest complete step 6; loading step 6" in caplog.text
  (run_dir / ".lock").unlink()
  assert tree_digest(run_dir) == run_digest


def test_disk_full_during_a_save_keeps_the_earlier_steps(tmp_path, monkeypatch, capsys):
  """The step-6 save fails (an injected ENOSPC in one item's write) with checkpoint.keep=1: one line,
  the only good step 3 stays and is intact, no fake step 6; rerunning resumes from 3. keep 1 and 3
  against the Checkpointer, and a really full tmpfs: test_checkpoint.py."""
  keep = 1
  import errno

  from clsalign_jax import checkpoint

  workdir = tmp_path / "run"
  write = checkpoint.DataStateHandler.save

  def full_at_6(self, directory, args):
    if os.path.basename(os.path.dirname(str(directory))).startswith("6."):
      raise OSError(errno.ENOSPC, "No space left on device")
    return write(self, directory, args)

  monkeypatch.setattr(checkpoint.DataStateHandler, "save", full_at_6)
  argv = [*TINY, f"--workdir={workdir}", f"--config.checkpoint.keep={keep}"]
  code, line = call(main.main, argv, capsys)
  assert code == 1, line
  assert line == (
    f"error: {workdir / 'checkpoints' / '6'}: saving the checkpoint failed (OSError: [Errno 28] No space left on "
    f"device); nothing of step 6 was kept, the earlier steps [3] are intact in {workdir / 'checkpoints'}"
  )
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
  monkeypatch.undo()
  code, line = call(main.main, argv, capsys)
  assert code == 0, line
  assert sorted(os.listdir(workdir / "checkpoints")) == ["6"]


# --- validate, then write: refusals that need more than the config -----------------------------


def test_data_refused_on_first_read_leaves_the_run_as_it_was(run_dir, run_digest, tmp_path, monkeypatch, capsys):
  """The data pipeline checks some inputs only when the first batch is read (one label only with
  balance_classes); that read happens before config.json or run_facts.json are written."""
  from clsalign_jax.train import run as run_lib

  class OneLabelOnly:
    def set_state(self, state):
      pass

    def __iter__(self):
      return self

    def __next__(self):
      raise ValueError("balance_classes needs examples of both labels")

  monkeypatch.setattr(run_lib, "make_data_iterator", lambda *args, **kwargs: OneLabelOnly())
  argv = [*TINY, "--config.train.num_steps=9", "--config.loss.cls_threshold=0.7"]
  check(main.main, [*argv, f"--workdir={run_dir}"], 1, "balance_classes needs examples of both labels", capsys)
  assert tree_digest(run_dir) == run_digest
  fresh = tmp_path / "fresh"
  check(main.main, [*argv, f"--workdir={fresh}"], 1, "balance_classes needs examples of both labels", capsys)
  assert not fresh.exists()


def test_bad_metrics_line_refuses_the_resume_before_anything_is_written(run_copy, capsys):
  path = run_copy / "metrics.jsonl"
  lines = path.read_text().splitlines()
  path.write_text("\n".join([lines[0], '{"step": 2, "spl', *lines[1:]]) + "\n")
  check(
    main.main,
    [*TINY, f"--workdir={run_copy}", "--config.train.num_steps=9", "--config.loss.cls_threshold=0.7"],
    1,
    f"{path}:2: not a metrics record",
    capsys,
    run_copy,
  )


def test_changed_batch_size_is_refused_on_resume(run_dir, run_digest, capsys):
  check(
    main.main,
    [*TINY, f"--workdir={run_dir}", "--config.train.num_steps=9", "--config.data.global_batch_size=16"],
    1,
    f"config.data.global_batch_size=16: {run_dir / 'checkpoints' / '6'} was saved with 8, and its data position "
    "counts batches of 8",
    capsys,
  )
  assert tree_digest(run_dir) == run_digest
