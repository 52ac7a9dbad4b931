"""HF export/import round trips, transformers loading our export, and bad checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from clsalign_jax import convert, masks
from clsalign_jax import model as M
from clsalign_jax.interop import hf


def _random_params(cfg, seed=0):
  params = M.init_params(cfg, jax.random.key(seed))
  # Random norms and head so a swapped or dropped tensor cannot go unnoticed.
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
    lambda path, x: (
      np.asarray(x)
      + (
        rng.uniform(0.1, 0.5, x.shape).astype(np.float32)
        if any("norm" in str(k) or "cls" in str(k) or "bias" in str(k) for k in path)
        else 0
      )
    ),
    M.unstack_layers(params),
  )


CONFIGS = {
  "llama_gqa": M.ModelConfig(
    vocab_size=211,
    d_model=48,
    n_layers=2,
    n_heads=6,
    n_kv_heads=2,
    head_dim=8,
    d_ff=80,
    rope_theta=20000.0,
    max_seq_len=512,
  ),
  "llama_tied": M.ModelConfig(
    vocab_size=211,
    d_model=48,
    n_layers=2,
    n_heads=4,
    n_kv_heads=4,
    head_dim=12,
    d_ff=80,
    tie_embeddings=True,
    max_seq_len=512,
  ),
  # Llama-3.2-shaped: tied, GQA, llama3 RoPE bands acting within the 96 tested tokens.
  "llama3_tied": M.ModelConfig(
    vocab_size=211,
    d_model=48,
    n_layers=2,
    n_heads=6,
    n_kv_heads=2,
    head_dim=8,
    d_ff=80,
    tie_embeddings=True,
    rope_theta=500000.0,
    rope_type="llama3",
    rope_factor=32.0,
    rope_original_max_len=32,
    max_seq_len=512,
  ),
  "mistral_window": M.ModelConfig(
    vocab_size=211,
    d_model=48,
    n_layers=2,
    n_heads=6,
    n_kv_heads=3,
    head_dim=8,
    d_ff=80,
    sliding_window=24,
    family="mistral",
    max_seq_len=512,
  ),
  # Qwen2.5-shaped: q/k/v biases (randomised by _random_params), GQA, theta 1e6, tied and untied.
  "qwen2_untied": M.ModelConfig(
    vocab_size=211,
    d_model=48,
    n_layers=2,
    n_heads=6,
    n_kv_heads=2,
    head_dim=8,
    d_ff=80,
    rope_theta=1e6,
    family="qwen2",
    max_seq_len=512,
  ),
  "qwen2_tied": M.ModelConfig(
    vocab_size=211,
    d_model=48,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=12,
    d_ff=80,
    rope_theta=1e6,
    rms_eps=1e-6,
    tie_embeddings=True,
    family="qwen2",
    max_seq_len=512,
  ),
}


def _tree_equal(a, b):
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    np.testing.assert_array_equal(x, y, err_msg=str(path))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_loads_in_transformers(name, tmp_path, record_figure):
  cfg = CONFIGS[name]
  params = _random_params(cfg)
  hf.save_hf(str(tmp_path), cfg, params)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  assert (
    type(model).__name__
    == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.family]
  )
  T = 96
  tokens = np.random.RandomState(3).randint(0, cfg.vocab_size, (2, T))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  ours = M.Transformer(cfg).apply(
    {"params": params},
    jnp.asarray(tokens),
    jnp.broadcast_to(jnp.arange(T), (2, T)),
    masks.causal_mask(jnp.ones((2, T), jnp.int32), cfg.sliding_window),
    cls_row=None,
  )
  err = np.abs(np.asarray(ours.logits_BTV) - ref).max()
  record_figure(f"export -> transformers max|dlogits| {name}", err)
  assert err <= 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_of_export_is_bit_exact(dtype, tmp_path):
  cfg = CONFIGS["llama_gqa"]
  params = convert.cast_params(_random_params(cfg, seed=1), dtype)
  hf.save_hf(str(tmp_path), cfg, params, threshold=0.4)
  cfg2, params2 = hf.load_hf(str(tmp_path))
  assert cfg2 == cfg
  _tree_equal(params2, params)
  meta = json.load(open(tmp_path / hf.CLS_META))
  assert meta["cls_token_id"] == cfg.vocab_size and meta["threshold"] == 0.4
  cls_file = safetensors.numpy.load_file(str(tmp_path / hf.CLS_FILE))
  assert set(cls_file) == {"cls_embedding", "cls_head.weight", "cls_head.bias"}
  assert cls_file["cls_embedding"].dtype == (ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)


def test_sharded_export_round_trip(tmp_path):
  cfg = CONFIGS["mistral_window"]
  params = _random_params(cfg, seed=2)
  hf.save_hf(str(tmp_path), cfg, params, shard_bytes=40_000)
  index = json.load(open(tmp_path / "model.safetensors.index.json"))
  assert len(set(index["weight_map"].values())) > 2
  _tree_equal(hf.load_hf(str(tmp_path))[1], params)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  assert model.config.sliding_window == cfg.sliding_window


def test_scan_layout_exports_like_loop_layout(tmp_path):
  cfg = CONFIGS["llama_gqa"]
  params = _random_params(cfg, seed=3)
  hf.save_hf(str(tmp_path), cfg, M.stack_layers(params, cfg.n_layers))
  _tree_equal(hf.load_hf(str(tmp_path))[1], params)


def test_plain_hf_checkpoint_gets_fresh_cls(tmp_path):
  cfg = CONFIGS["llama_gqa"]
  params = _random_params(cfg, seed=4)
  hf.save_hf(str(tmp_path), cfg, params)
  os.remove(tmp_path / hf.CLS_FILE)
  _, loaded = hf.load_hf(str(tmp_path))
  np.testing.assert_allclose(loaded["cls_embedding"], np.asarray(params["embedding"]).mean(0), rtol=1e-6)
  assert not np.asarray(loaded["cls_head"]["kernel"]).any()


def _export(tmp_path, cfg=CONFIGS["llama_gqa"]):
  hf.save_hf(str(tmp_path), cfg, _random_params(cfg))
  return tmp_path


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
  d = _export(tmp_path)
  tensors = safetensors.numpy.load_file(str(d / "model.safetensors"))
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((81, 48), np.float32)
  safetensors.numpy.save_file(tensors, str(d / "model.safetensors"))
  with pytest.raises(hf.CheckpointError) as e:
    hf.load_hf(str(d))
  msg = str(e.value)
  assert "model.layers.1.mlp.up_proj.weight" in msg and "(81, 48)" in msg and "(80, 48)" in msg


def test_missing_tensor_and_missing_files(tmp_path):
  d = _export(tmp_path)
  tensors = safetensors.numpy.load_file(str(d / "model.safetensors"))
  del tensors["model.norm.weight"]
  safetensors.numpy.save_file(tensors, str(d / "model.safetensors"))
  with pytest.raises(hf.CheckpointError, match="'model.norm.weight' is missing"):
    hf.load_hf(str(d))
  os.remove(d / "model.safetensors")
  with pytest.raises(hf.CheckpointError, match="neither model.safetensors"):
    hf.load_hf(str(d))
  os.remove(d / "config.json")
  with pytest.raises(hf.CheckpointError, match="config.json: file not found"):
    hf.load_hf(str(d))


def test_unknown_architecture(tmp_path):
  d = _export(tmp_path)
  cfg_json = json.load(open(d / "config.json"))
  cfg_json["architectures"] = ["GPT2LMHeadModel"]
  json.dump(cfg_json, open(d / "config.json", "w"))
  with pytest.raises(hf.CheckpointError, match="GPT2LMHeadModel.*not supported"):
    hf.load_hf(str(d))


def test_unsupported_rope_scaling(tmp_path):
  d = _export(tmp_path)
  cfg_json = json.load(open(d / "config.json"))
  cfg_json["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}
  json.dump(cfg_json, open(d / "config.json", "w"))
  with pytest.raises(hf.CheckpointError, match="config.json: rope type 'yarn' is not supported"):
    hf.load_hf(str(d))
  cfg_json["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
  json.dump(cfg_json, open(d / "config.json", "w"))
  with pytest.raises(hf.CheckpointError, match="'llama3' needs .*low_freq_factor"):
    hf.load_hf(str(d))


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "llama3"])
def test_rope_scaling_round_trips(rope_type, tmp_path):
  cfg = CONFIGS["llama_gqa"].replace(rope_type=rope_type, rope_factor=4.0, rope_original_max_len=128)
  hf.save_hf(str(tmp_path), cfg, _random_params(cfg, seed=6))
  cfg2, _ = hf.load_hf(str(tmp_path))
  # rope_original_max_len only means something for llama3; dynamic scales past max_seq_len.
  assert cfg2 == (cfg if rope_type == "llama3" else cfg.replace(rope_original_max_len=8192))
  # Older transformers (and the Llama-3.1 checkpoints on the Hub) spell it rope_theta + rope_scaling.
  legacy = json.load(open(tmp_path / "config.json"))
  params = legacy.pop("rope_parameters")
  legacy["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
  json.dump(legacy, open(tmp_path / "config.json", "w"))
  assert hf.load_hf(str(tmp_path))[0] == cfg2


@pytest.mark.parametrize("name", ["qwen2_untied", "qwen2_tied"])
def test_qwen2_round_trip_with_cls_side_path(name, tmp_path):
  # Biases, tying and the CLS extras (side path included) survive export and import bit for bit.
  cfg = CONFIGS[name].replace(cls_exit_layer=1, cls_adapter_rank=3)
  params = _random_params(cfg, seed=7)
  assert {"q_bias", "k_bias", "v_bias"} <= set(params["layers_1"]["attn"])
  hf.save_hf(str(tmp_path), cfg, params)
  written = json.load(open(tmp_path / "config.json"))
  assert written["model_type"] == "qwen2" and written["use_sliding_window"] is False
  assert "attention_bias" not in written and written["tie_word_embeddings"] == cfg.tie_embeddings
  tensors = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
  assert tensors["model.layers.0.self_attn.k_proj.bias"].shape == (cfg.n_kv_heads * cfg.head_dim,)
  assert "model.layers.0.self_attn.o_proj.bias" not in tensors
  cfg2, params2 = hf.load_hf(str(tmp_path))
  assert cfg2 == cfg
  _tree_equal(params2, params)


def test_qwen2_refusals_name_the_key(tmp_path):
  d = _export(tmp_path, CONFIGS["qwen2_untied"])
  original = json.load(open(d / "config.json"))
  for change, match in (
    ({"use_sliding_window": True, "sliding_window": 16}, "config.json: use_sliding_window=true is not supported"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types has 'sliding_attention'"),
    (
      {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e6}},
      r"rope type 'llama3' is not supported \(supported for qwen2: default, linear, dynamic\)",
    ),
  ):
    json.dump({**original, **change}, open(d / "config.json", "w"))
    with pytest.raises(hf.CheckpointError, match=match):
      hf.load_hf(str(d))
  # A bias tensor the config promises but the file lacks is named like any other.
  json.dump(original, open(d / "config.json", "w"))
  tensors = safetensors.numpy.load_file(str(d / "model.safetensors"))
  del tensors["model.layers.1.self_attn.v_proj.bias"]
  safetensors.numpy.save_file(tensors, str(d / "model.safetensors"))
  with pytest.raises(hf.CheckpointError, match="'model.layers.1.self_attn.v_proj.bias' is missing"):
    hf.load_hf(str(d))


def test_qwen2_5_config_json_imports_as_the_preset():
  # The keys of Qwen2.5-0.5B-Instruct's config.json (transformers 4.x spelling: rope_theta, a disabled
  # sliding window with its unused size) give exactly the preset.
  qwen = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
  }
  assert hf.config_from_hf(qwen) == M.preset("qwen2_5_0_5b")
  # Our export of the preset reads back the same way, in transformers' own config class too.
  exported = hf.config_to_hf(M.preset("qwen2_5_0_5b"), "bfloat16")
  assert hf.config_from_hf(exported) == M.preset("qwen2_5_0_5b")
  theirs = transformers.Qwen2Config(**{k: v for k, v in exported.items() if k != "architectures"})
  assert (theirs.head_dim, theirs.use_sliding_window, theirs.layer_types) == (64, False, ["full_attention"] * 24)
