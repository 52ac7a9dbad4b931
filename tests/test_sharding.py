import sys
import textwrap
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from clsalign_jax import config as config_lib
from clsalign_jax import model as model_lib
from clsalign_jax import sharding
from train_utils import compilation_cache, load_config, run, subprocess_env


def test_mesh_shape_fills_the_minus_one_axis():
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 32) == (1, 32, 1)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="does not fit"):
    sharding.mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="uses 4 devices"):
    sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)


def _param_specs(rules):
  cfg = config_lib.model_config(load_config("tiny")).replace(scan_layers=True)
  return sharding.logical_specs(model_lib.abstract_params(cfg), rules)


def test_parameter_specs_follow_the_rules_table():
  specs = _param_specs(config_lib.DEFAULT_LOGICAL_AXIS_RULES)
  assert specs["embedding"] == P("tensor", "fsdp")
  assert specs["lm_head"] == P("fsdp", "tensor")
  assert specs["layers"]["attn"]["q_proj"] == P(None, "fsdp", "tensor", None)
  assert specs["layers"]["attn"]["k_proj"] == P(None, "fsdp", "tensor", None)
  assert specs["layers"]["mlp"]["down_proj"] == P(None, "tensor", "fsdp")
  assert specs["layers"]["input_norm"]["weight"] == P(None, None)
  assert specs["cls_head"]["kernel"] == P("fsdp", None)
  assert sharding.batch_spec(config_lib.DEFAULT_LOGICAL_AXIS_RULES, 2) == P(("data", "fsdp"), None)


def test_changing_parallelism_is_a_rules_edit():
  rules = tuple((name, None if name == "embed" else axis) for name, axis in config_lib.DEFAULT_LOGICAL_AXIS_RULES)
  specs = _param_specs(rules)
  assert specs["embedding"] == P("tensor", None)
  assert specs["layers"]["mlp"]["gate_proj"] == P(None, None, "tensor")


def test_single_process_feeds_the_whole_batch():
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  assert sharding.process_batch_block(mesh, config_lib.DEFAULT_LOGICAL_AXIS_RULES, 8) == (0, 1)


_SHARDED_VS_SINGLE = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from clsalign_jax import train
    from train_utils import load_config

    # Fail, never skip, when the forced host devices are missing.
    assert jax.device_count() == 8, f"expected 8 forced CPU devices, got {jax.devices()}"

    def config(accum, **mesh):
      c = load_config("tiny")
      c.train.num_steps = 3
      c.train.grad_accum_steps = accum
      c.eval.update(every_steps=0, num_batches=1)
      c.checkpoint.async_save = False
      c.metrics.progress_bar = False
      c.mesh.update(**mesh)
      return c

    workdir = sys.argv[1]
    single = train.train_and_evaluate(config(1, data=1, fsdp=1, tensor=1), workdir + "/single", devices=jax.devices()[:1])
    sharded = train.train_and_evaluate(config(1, data=2, fsdp=2, tensor=2), workdir + "/sharded")
    accum = train.train_and_evaluate(config(2, data=2, fsdp=2, tensor=2), workdir + "/accum")
    assert sharded.params["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert len(sharded.params["layers_0"]["mlp"]["up_proj"].addressable_shards) == 8
    for name, other in (("sharded", sharded), ("sharded+accumulated", accum)):
      diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                          jax.device_get(single.params), jax.device_get(other.params))
      worst = max(jax.tree.leaves(diff))
      print(f"{name}: max |param difference| after 3 steps = {worst:.3g}")
      assert worst < 1e-5, (name, diff)
""")


def test_sharded_step_matches_single_device(tmp_path, tmp_path_factory, record_figure):
  """data=2, fsdp=2, tensor=2 on 8 forced CPU devices vs 1 device: params after 3 fp32 steps."""
  env = subprocess_env(compilation_cache(tmp_path_factory), devices=8)
  env["PYTHONPATH"] = str(Path(__file__).parent)
  result = run([sys.executable, "-c", _SHARDED_VS_SINGLE, str(tmp_path)], env, timeout=400)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  for line in result.stdout.splitlines():
    if "max |param difference|" in line:
      name, value = line.split(" = ")
      record_figure(f"{name} vs 1 device (8 CPU devices)", float(value))
  assert "sharded+accumulated: max" in result.stdout


def test_decode_layout_splits_rows_and_replicates_what_does_not_divide():
  """Decode rules on a device-free 2×1×2 mesh: weights split over `tensor` only (never over `data`),
  a dimension the axis does not divide is replicated, and batches round up to the row shards."""
  import jax
  from jax.sharding import AbstractMesh

  from clsalign_jax import model as M

  layout = sharding.Layout(AbstractMesh((2, 1, 2), sharding.MESH_AXES), sharding.DECODE_LOGICAL_AXIS_RULES)
  cfg = M.ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=6, n_kv_heads=3, head_dim=8, d_ff=64)
  specs = jax.tree.map(lambda s: tuple(s.spec), layout.params(M.abstract_params(cfg)))
  layer = specs["layers_0"]
  assert layer["mlp"]["up_proj"] == ("fsdp", "tensor")  # d_ff 64 over tensor=2; embed over fsdp=1
  assert specs["embedding"] == (None, "fsdp")  # vocab 97 does not divide over tensor=2: replicated
  assert layer["attn"]["k_proj"][1] is None  # 3 kv heads over tensor=2: replicated
  assert all("data" not in str(s) for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, tuple)))
  assert [layout.pad_rows(n) for n in (1, 2, 3, 8)] == [2, 2, 4, 8]
  assert layout.rows(2).spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
