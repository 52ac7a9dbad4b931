import dataclasses
import json
import math
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from clsalign_jax import (
  checkpoint,
  config as config_lib,
  losses,
  masks,
  metrics,
  model as model_lib,
  sharding,
  synthetic,
  train,
)
from clsalign_jax.interop import hf
from train_utils import (
  REPO,
  checkpoint_steps,
  compilation_cache,
  load_config,
  main_command,
  read_metrics,
  run,
  saved_params,
  subprocess_env,
)

SIX_STEPS = ("--config.train.num_steps=6", "--config.checkpoint.every_steps=3", "--config.eval.every_steps=3")


# --- configs ------------------------------------------------------------------------------------


def test_defaults_are_the_paper_recipe():
  c = load_config("llama7b_sft")
  assert (c.optimizer.learning_rate, c.optimizer.weight_decay, c.optimizer.grad_clip_norm) == (2e-5, 0.1, 0.0)
  assert (c.data.global_batch_size, c.data.seq_len, c.loss.cls_weight, c.train.num_epochs) == (72, 2048, 0.1, 15)
  assert (c.schedule.name, c.schedule.decay_rate, c.schedule.warmup_steps) == ("step", 0.85, 0)
  assert config_lib.total_steps(c) == 15 * math.ceil(29_600 / 72)
  assert config_lib.model_config(c) == model_lib.preset(
    "llama2_7b", dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, remat_policy="full"
  )
  m = load_config("mistral7b_sft")
  assert (m.loss.cls_weight, m.train.num_epochs, m.model.preset) == (0.01, 8, "mistral_7b_instruct_v0_2")
  p = load_config("llama7b_pretrain")
  assert (p.train.mode, p.loss.cls_weight, p.train.num_epochs) == ("pretrain", 0.01, 3)
  assert config_lib.model_config(load_config("smollm2_135m_sft")).vocab_size == 49152


def test_unknown_keys_are_errors():
  with pytest.raises(AttributeError):
    config_lib.default_config().train.nm_steps = 3
  argv = ["prog", f"--config={REPO}/configs/tiny.py", "--config.train.nm_steps=3"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
  with pytest.raises(AttributeError, match="num_steps"):
    fv(argv)
  bad = load_config("tiny")
  bad.train.mode = "rlhf"
  with pytest.raises(ValueError, match="train.mode"):
    config_lib.validate(bad)


# --- optimizer ----------------------------------------------------------------------------------


def test_step_schedule_decays_once_per_epoch_and_warmup_then_cosine():
  c = load_config("tiny")
  c.schedule.update(name="step", warmup_steps=0, decay_every_steps=0, decay_rate=0.5)
  c.data.num_train_examples = 16  # two steps of 8 per epoch
  lr = c.optimizer.learning_rate
  s = train.make_schedule(c, 10)
  assert [float(s(i)) / lr for i in range(6)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
  c.schedule.update(name="cosine", warmup_steps=2, final_lr_fraction=0.1)
  s = train.make_schedule(c, 10)
  assert [float(s(i)) / lr for i in (0, 1, 2, 10)] == pytest.approx([0, 0.5, 1, 0.1])


def test_bf16_params_keep_fp32_optimizer_state():
  c = load_config("tiny")
  tx = train.make_optimizer(c, optax.constant_schedule(1e-3))
  params = {"w": jnp.ones((4,), jnp.bfloat16)}
  state = tx.init(params)
  assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype("float32")}
  updates, _ = tx.update({"w": jnp.full((4,), 0.5, jnp.float32)}, state, params)
  assert updates["w"].dtype == jnp.float32  # the gradient's dtype; apply_updates casts to the param's


def test_cls_head_lr_scale_multiplies_only_the_head_updates():
  params = {
    "cls_head": {"kernel": jnp.ones((3, 1)), "bias": jnp.ones((1,))},
    "layers_0": {"mlp": {"cls_head": jnp.ones((2,))}},
  }  # a name deeper down is not the head
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3), params)
  c = load_config("tiny")

  def updates(scale):
    with c.unlocked():
      c.optimizer.cls_head_lr_scale = scale
    tx = train.make_optimizer(c, optax.constant_schedule(1e-3))
    return tx.update(grads, tx.init(params), params)[0]

  base, scaled = updates(1.0), updates(50.0)
  np.testing.assert_allclose(scaled["cls_head"]["kernel"], 50 * base["cls_head"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(scaled["cls_head"]["bias"], 50 * base["cls_head"]["bias"], rtol=1e-6)
  np.testing.assert_array_equal(scaled["layers_0"]["mlp"]["cls_head"], base["layers_0"]["mlp"]["cls_head"])
  assert float(jnp.abs(base["cls_head"]["bias"][0])) > 0


def test_trainable_subset_freezes_the_rest_and_resumes(tmp_path):
  c = load_config("tiny")
  c.train.trainable = r"^(cls_head|layers_1)/"
  c.checkpoint.async_save = False
  c.metrics.progress_bar = False
  cfg = config_lib.model_config(c)
  partition = train.ParamPartition(c, cfg)
  assert partition.trainable == {
    "cls_head/bias",
    "cls_head/kernel",
    *(
      f"layers_1/{w}"
      for w in (
        "attn/q_proj",
        "attn/k_proj",
        "attn/v_proj",
        "attn/o_proj",
        "input_norm/weight",
        "post_attn_norm/weight",
        "mlp/gate_proj",
        "mlp/up_proj",
        "mlp/down_proj",
      )
    ),
  }
  schedule = optax.constant_schedule(1e-2)
  tx = train.make_optimizer(c, schedule)
  params = model_lib.init_params(cfg, jax.random.key(0))
  trainable, frozen = partition.split(params)
  state = train.TrainState(
    step=jnp.int32(0), params=params, opt_state=tx.init(trainable), rng=jax.random.key_data(jax.random.key(1))
  )
  step = jax.jit(train.make_train_step(c, cfg, tx, schedule))
  it = synthetic.make_data_iterator(c, "train", 0, 1)
  for _ in range(3):
    state, _ = step(state, next(it))
  new_trainable, new_frozen = partition.split(state.params)
  # Frozen weights are bit-identical, every trainable one moved, and only they have Adam moments.
  jax.tree.map(np.testing.assert_array_equal, new_frozen, frozen)
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_trainable), jax.tree.leaves(trainable)))
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert len(moments) == 2 * len(jax.tree.leaves(trainable))

  # Through the loop: saves, resumes (the optimizer state is the subset's) and finishes.
  c.train.num_steps = 2
  first = train.train_and_evaluate(c, str(tmp_path))
  c.train.num_steps = 4
  resumed = train.train_and_evaluate(c, str(tmp_path))
  assert int(resumed.step) == 4
  jax.tree.map(np.testing.assert_array_equal, partition.split(resumed.params)[1], partition.split(first.params)[1])


def test_trainable_errors_name_the_key():
  c = load_config("tiny")
  c.train.trainable = "layers_(1"
  with pytest.raises(ValueError, match=r"config.train.trainable=.*not a regular expression"):
    config_lib.validate(c)
  c.train.trainable = "^nothing_like_this"
  with pytest.raises(ValueError, match="matches no parameter"):
    train.ParamPartition(c, config_lib.model_config(c))
  c.model.scan_layers = True
  c.train.trainable = r"^layers_1/"
  with pytest.raises(ValueError, match="scan_layers=False"):
    train.ParamPartition(c, config_lib.model_config(c))
  # Every layer (of one kind of weight) is fine with scanned layers.
  c.train.trainable = r"mlp/"
  partition = train.ParamPartition(c, config_lib.model_config(c))
  assert partition.trainable == {"layers/mlp/gate_proj", "layers/mlp/up_proj", "layers/mlp/down_proj"}


# --- data ---------------------------------------------------------------------------------------


def test_synthetic_batches_follow_the_batch_contract():
  c = load_config("tiny")
  it = synthetic.make_data_iterator(c, "train", 0, 1)
  batch = next(it)
  T = c.data.seq_len
  assert batch["tokens"].shape == (8, T) and batch["tokens"].dtype == np.int32
  assert (batch["tokens"][:, 0] == 256).all() and (batch["tokens"][:, 1] == 1).all()  # CLS, BOS
  for b in range(8):
    q0, q1 = batch["query_span"][b]
    r0, r1 = batch["response_span"][b]
    n = batch["segment_ids"][b].sum()
    assert 2 < q0 < q1 < r0 < r1 == n
    assert batch["tokens"][b, r1 - 1] == 2  # EOS closes the response
    assert (np.flatnonzero(batch["loss_mask"][b]) == np.arange(r0, r1)).all()
    assert ((batch["tokens"][b, q0:q1] == synthetic.MARKER).any()) == bool(batch["cls_label"][b])
  # Resuming from a state, and splitting over shards, give the same rows.
  state = it.get_state()
  second = next(it)
  resumed = synthetic.make_data_iterator(c, "train", 0, 1)
  resumed.set_state(json.loads(json.dumps(state)))
  np.testing.assert_array_equal(next(resumed)["tokens"], second["tokens"])
  halves = [synthetic.make_data_iterator(c, "train", i, 2) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([next(h)["tokens"] for h in halves]), batch["tokens"])


def test_missing_data_package_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "clsalign_jax.data", None)
  c = load_config("llama7b_sft")
  with pytest.raises(ValueError, match="clsalign_jax.data"):
    train.make_data_iterator(c, "train", 0, 1)


# --- masks --------------------------------------------------------------------------------------


def test_inert_cls_trains_the_plain_causal_model():
  """loss.cls_weight=0 with mask.response_sees_cls=False: the response logits and the LM loss are
  the plain model's on the rows without their CLS token, and the CLS parameters do not move."""
  c = load_config("tiny")
  c.loss.cls_weight = 0.0
  c.mask.response_sees_cls = False
  cfg = config_lib.model_config(c)
  model = model_lib.Transformer(cfg)
  # Drawn with numpy (init_params compiles every random op); norms at 1. The CLS row is far from
  # the mean embedding: if responses read it, their logits move.
  rng = np.random.default_rng(0)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(model_lib.abstract_params(cfg)))
  params = jax.tree.unflatten(
    treedef,
    [
      np.ones(x.shape, np.float32)
      if jax.tree_util.keystr(path).endswith("['weight']")
      else rng.normal(0.0, 0.02, x.shape).astype(np.float32)
      for path, x in leaves
    ],
  )
  params["cls_embedding"] = rng.normal(0.0, 1.0, params["cls_embedding"].shape).astype(np.float32)
  batch = jax.tree.map(jnp.asarray, next(synthetic.make_data_iterator(c, "train", 0, 1)))
  weights_BT = losses.lm_target_weights(batch, "sft")
  assert batch["segment_ids"][:, -1].min() == 0 and weights_BT.sum() > 100  # padded rows, many targets

  seg_BT = batch["segment_ids"][:, 1:]
  positions_BT = jnp.where(seg_BT > 0, batch["positions"][:, 1:] - 1, 0)  # BOS at 0, as in the plain model
  plain = model.apply({"params": params}, batch["tokens"][:, 1:], positions_BT, masks.causal_mask(seg_BT), cls_row=None)
  plain_sum, plain_n = losses.token_cross_entropy(plain.logits_BTV, batch["tokens"][:, 1:], weights_BT[:, 1:])

  def with_cls(response_sees_cls):
    mask_BTT = masks.cls_training_mask(
      batch["segment_ids"], batch["query_span"], batch["response_span"], response_sees_cls=response_sees_cls
    )
    return model.apply({"params": params}, batch["tokens"], batch["positions"], mask_BTT).logits_BTV[:, 1:]

  scored_BT = np.asarray(weights_BT[:, 1:] > 0)
  inert = np.asarray(with_cls(False))[scored_BT]
  np.testing.assert_allclose(inert, np.asarray(plain.logits_BTV)[scored_BT], atol=1e-6, rtol=0)
  # The control: with the default mask the responses read this CLS.
  assert np.abs(np.asarray(with_cls(True))[scored_BT] - inert).max() > 1e-2

  schedule = optax.constant_schedule(1e-2)
  tx = train.make_optimizer(c, schedule)
  state = train.TrainState(
    step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(2))
  )
  new_state, step_metrics = jax.jit(train.make_train_step(c, cfg, tx, schedule))(state, batch)
  np.testing.assert_allclose(step_metrics["lm_loss"], plain_sum / plain_n, rtol=1e-6)
  for name in ("cls_embedding", "cls_head"):
    jax.tree.map(np.testing.assert_array_equal, new_state.params[name], params[name])
  assert not np.array_equal(new_state.params["embedding"], params["embedding"])


# --- init_from ----------------------------------------------------------------------------------


def test_init_from_hf_directory_and_other_run(tmp_path):
  config = load_config("tiny")
  cfg = config_lib.model_config(config)
  mesh = sharding.make_mesh(config.mesh)
  tx = train.make_optimizer(config, optax.constant_schedule(0.0))
  layout = train._layout(cfg, tx, mesh, config_lib.DEFAULT_LOGICAL_AXIS_RULES)
  source = jax.tree.map(np.asarray, jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.key(7)))
  hf.save_hf(str(tmp_path / "hf"), cfg, source)
  config.init_from = f"hf:{tmp_path / 'hf'}"
  loaded = train._load_init_params(config, cfg, layout)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), source)

  ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), keep=1)
  ckpt.save(4, loaded, tx.init(loaded), {"step": jnp.int32(4)}, {}, {"model_config": dataclasses.asdict(cfg)})
  ckpt.close()
  config.init_from = f"orbax:{tmp_path / 'run'}"
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(train._load_init_params(config, cfg, layout)), source)

  config.model.n_layers = 3
  with pytest.raises(checkpoint.CheckpointError, match="n_layers: 2 there vs 3"):
    train._load_init_params(config, config_lib.model_config(config), layout)


# --- throughput ---------------------------------------------------------------------------------


def test_model_flops_formula():
  cfg = model_lib.preset("llama2_7b")
  n = 6_738_423_809
  matmul = n - 32000 * 4096 - 4096
  assert metrics.matmul_params(cfg, n) == matmul
  assert metrics.train_flops_per_sequence(cfg, n, 2048) == 6 * matmul * 2048 + 12 * 32 * 32 * 128 * 2048**2
  assert metrics.peak_flops_per_device("TPU v5 lite") == 197e12
  assert metrics.peak_flops_per_device("cpu") is None
  assert metrics.peak_flops_per_device("cpu", configured=1e12) == 1e12


# --- whole runs ---------------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tmp_path_factory):
  # The LR jumps by 1e12 after 6 steps; the loss is NaN at step 8, after the step-6 checkpoint.
  result = run(
    main_command(
      "tiny",
      tmp_path,
      "--config.train.num_steps=10",
      "--config.checkpoint.every_steps=2",
      "--config.schedule.name=step",
      "--config.schedule.decay_every_steps=4",
      "--config.schedule.decay_rate=1e12",
    ),
    subprocess_env(compilation_cache(tmp_path_factory)),
  )
  assert result.returncode == 1
  assert "error: step 8: loss=nan" in result.stderr
  assert "Last good checkpoint: step 6" in result.stderr
  assert checkpoint_steps(tmp_path) == [2, 4, 6]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved_params(tmp_path, 6)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, tmp_path_factory):
  env = subprocess_env(compilation_cache(tmp_path_factory))
  address = f"--coordinator_address=127.0.0.1:{_free_port()}"
  procs = [
    subprocess.Popen(
      main_command("tiny", tmp_path / "two", *SIX_STEPS, address, "--num_processes=2", f"--process_id={i}"),
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  single = run(main_command("tiny", tmp_path / "one", *SIX_STEPS), env)
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-5000:]
  assert single.returncode == 0, single.stderr[-5000:]
  assert "process 1 of 2, 2 devices" in outputs[1][1]

  one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
  for step in range(1, 7):
    assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5)
  assert (
    read_metrics(tmp_path / "two", "eval")[6]["cls_accuracy"]
    == read_metrics(tmp_path / "one", "eval")[6]["cls_accuracy"]
  )
  assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "6" / "data").glob("*.json")) == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
    saved_params(tmp_path / "one", 6),
    saved_params(tmp_path / "two", 6),
  )
