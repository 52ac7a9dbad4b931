"""Decode memory plans (`evaluate --dry_run`; `generate --dry_run` is tested in test_generate.py):
params and KV cache per device checked against a hand count, the compiled temporaries present, and a
plan printed without loading weights."""

import math

import flax.linen as nn
import jax
from jax.sharding import AbstractMesh
from test_eval_lm import REPO

from clsalign_jax import evaluate, memory_plan, sharding
from clsalign_jax import model as M
from clsalign_jax.decode import DecodeConfig

CFG = M.ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


def test_plan_counts_params_and_cache_by_hand():
  one = sharding.Layout.make({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  dcfg = DecodeConfig(max_new_tokens=40)
  plan = memory_plan.decode_plan(CFG, one, batch=3, prompt_len=50, dcfg=dcfg)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(M.abstract_params(CFG))))
  assert plan["params"] == 4 * n_params
  S = 64 + 40  # the prompt bucket (64) + new tokens
  assert plan["slots"] == S and plan["kv_cache"] == 2 * CFG.n_layers * 3 * CFG.n_kv_heads * S * CFG.head_dim * 4
  assert plan["temp"] > 0
  # On a device-free 4×1×2 mesh: rows split 4 ways (batch 3 → 4 rows), kv heads and MLP over tensor.
  mesh = sharding.Layout(AbstractMesh((4, 1, 2), sharding.MESH_AXES), sharding.DECODE_LOGICAL_AXIS_RULES)
  split = memory_plan.decode_plan(CFG, mesh, batch=3, prompt_len=50, dcfg=dcfg, compile=False)
  assert split["rows"] == 4 and split["kv_cache"] == 2 * CFG.n_layers * 1 * 1 * S * CFG.head_dim * 4
  assert split["params"] < plan["params"] and split["temp"] is None


def test_evaluate_dry_run_prints_a_plan_per_variant(capsys):
  config = str(REPO / "configs" / "eval_tiny.py")
  assert evaluate.main(["evaluate", f"--config={config}", "--config.output_dir=/nonexistent/eval", "--dry_run"]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if "per device" in l]
  assert [l.split(":")[0] for l in lines] == ["cls_full", "no_strategic_decoding"]
  assert all("params 0.00 GiB" in l and "KV cache" in l and "temp" in l for l in lines)
