"""Llama-shaped decoder (Llama-2/3, Mistral, SmolLM2, Qwen2) with a [CLS] safety head, in one file.

What differs between those families (q/k/v biases, ...) is a `families.Family` field, never a
family name tested here.

Shape suffixes: B batch, T query rows, S key slots, D model width, N query heads,
G kv heads, R = N // G heads per kv head, H head dim, F mlp width, V base vocab, L layers.

The [CLS] token is one extra *input* embedding row (id = V). The LM head covers the base
vocabulary only, so [CLS] can never be generated. The safety head reads the final-normed
hidden state of the CLS row. Attention is driven entirely by an explicit boolean mask
(built in `masks.py`), so the same forward serves training, prefill and cached decoding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from clsalign_jax import families, matmul
from clsalign_jax.errors import ConfigError

Array = jax.Array

REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
  "save_attn_mlp_out": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
}


ROPE_TYPES = families.ALL_ROPE_TYPES


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  rms_eps: float = 1e-5
  rope_theta: float = 10000.0
  # RoPE frequency scaling, as HF `rope_parameters`: "default" (none), "linear", "dynamic"
  # (NTK-aware past max_seq_len, recomputed from the call's largest position) or "llama3"
  # (Llama-3.1/3.2 frequency bands).
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_len: int = 8192  # llama3 only: the pre-extension context length
  max_seq_len: int = 4096
  sliding_window: int | None = None
  tie_embeddings: bool = False
  bos_id: int = 1
  eos_id: int = 2
  # A `families.FAMILIES` name (llama, mistral, qwen2): the architecture's fixed traits (q/k/v
  # biases, the HF architecture written on export, the default chat template).
  family: str = "llama"
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"
  # "xla": explicit einsum softmax (any device, exact parity); "cudnn": fused flash attention
  # through jax.nn.dot_product_attention with the same boolean mask (GPU, bf16/fp16 only).
  attention_impl: str = "xla"
  # The CLS side path (docs/method.md, "The CLS side path"). 0/0 is the paper's model: the CLS row
  # runs through the shared layers and the head reads final_norm of its last state.
  # cls_exit_layer = k > 0: the head reads `cls_norm` of the CLS row after layer k - 1 (later layers
  # still run, for the tokens; the CLS row's output there is unused).
  # cls_adapter_rank = r > 0: after every layer below the exit, the CLS row (and only it) adds a
  # residual adapter up(silu(down(norm(x)))) of rank r. Token rows never read the CLS row when it
  # is trained this way (response_sees_cls=False), so the LM stays exactly the base model while
  # the CLS has capacity of its own. Needs unscanned layers.
  cls_exit_layer: int = 0
  # Rank of the CLS row's residual adapters (0: none); see the comment above.
  cls_adapter_rank: int = 0

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; known: {sorted(REMAT_POLICIES)}")
    if self.attention_impl not in ("xla", "cudnn"):
      raise ValueError(f"attention_impl={self.attention_impl!r}; known: xla, cudnn")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type={self.rope_type!r}; known: {', '.join(ROPE_TYPES)}")
    if self.rope_type != "default" and self.rope_factor <= 0:
      raise ValueError(f"rope_factor={self.rope_factor} must be positive for rope_type={self.rope_type!r}")
    if self.rope_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
      raise ValueError(
        f"llama3 RoPE needs rope_high_freq_factor ({self.rope_high_freq_factor}) > "
        f"rope_low_freq_factor ({self.rope_low_freq_factor}) > 0"
      )
    if self.family not in families.FAMILIES:
      raise ValueError(f"family={self.family!r}; known: {', '.join(families.FAMILIES)}")
    if self.rope_type not in self.family_spec.rope_types:
      raise ValueError(
        f"rope_type={self.rope_type!r} is not one of the {self.family} family's: {', '.join(self.family_spec.rope_types)}"
      )
    for key in ("dtype", "param_dtype"):
      jnp.dtype(getattr(self, key))
    if not 0 <= self.cls_exit_layer <= self.n_layers:
      raise ValueError(f"cls_exit_layer={self.cls_exit_layer} must lie in [0, n_layers={self.n_layers}]")
    if self.cls_adapter_rank < 0:
      raise ValueError(f"cls_adapter_rank={self.cls_adapter_rank} must be >= 0")
    if self.has_cls_path and self.scan_layers:
      raise ValueError("the CLS side path (cls_exit_layer / cls_adapter_rank) needs scan_layers=False")

  @property
  def family_spec(self) -> families.Family:
    return families.FAMILIES[self.family]

  @property
  def qkv_bias(self) -> bool:
    """Whether the q/k/v projections carry biases (a trait of the family, not a free choice)."""
    return self.family_spec.qkv_bias

  @property
  def has_cls_path(self) -> bool:
    return self.cls_exit_layer > 0 or self.cls_adapter_rank > 0

  @property
  def cls_layers(self) -> int:
    """Layers the CLS row's verdict depends on (the others need not run for the CLS alone)."""
    return self.cls_exit_layer or self.n_layers

  @property
  def cls_id(self) -> int:
    return self.vocab_size

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)


PRESETS = {
  "llama2_7b": ModelConfig(
    vocab_size=32000,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=32,
    head_dim=128,
    d_ff=11008,
    rms_eps=1e-5,
    rope_theta=10000.0,
    max_seq_len=4096,
  ),
  "mistral_7b_instruct_v0_2": ModelConfig(
    vocab_size=32000,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    d_ff=14336,
    rms_eps=1e-5,
    rope_theta=1e6,
    max_seq_len=32768,
    family="mistral",
  ),
  "mistral_7b_v0_1": ModelConfig(
    vocab_size=32000,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    d_ff=14336,
    rms_eps=1e-5,
    rope_theta=10000.0,
    max_seq_len=32768,
    sliding_window=4096,
    family="mistral",
  ),
  "smollm2_135m": ModelConfig(
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    d_ff=1536,
    rms_eps=1e-5,
    rope_theta=100000.0,
    max_seq_len=8192,
    tie_embeddings=True,
  ),
  # Llama-3.1-8B (and -Instruct): vocab 128256, BOS <|begin_of_text|> 128000, EOS <|eot_id|> 128009
  # (the instruct models' end-of-turn; the base model stops on <|end_of_text|> 128001).
  "llama3_8b": ModelConfig(
    vocab_size=128256,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    d_ff=14336,
    rms_eps=1e-5,
    rope_theta=500000.0,
    rope_type="llama3",
    rope_factor=8.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_len=8192,
    max_seq_len=131072,
    bos_id=128000,
    eos_id=128009,
  ),
  # Llama-3.2-1B(-Instruct): tied embeddings, head_dim 64, llama3 scaling with factor 32.
  "llama3_2_1b": ModelConfig(
    vocab_size=128256,
    d_model=2048,
    n_layers=16,
    n_heads=32,
    n_kv_heads=8,
    head_dim=64,
    d_ff=8192,
    rms_eps=1e-5,
    rope_theta=500000.0,
    rope_type="llama3",
    rope_factor=32.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_len=8192,
    max_seq_len=131072,
    tie_embeddings=True,
    bos_id=128000,
    eos_id=128009,
  ),
  # Qwen2.5-0.5B-Instruct: q/k/v biases, tied, vocab padded past the tokenizer's 151,665 tokens.
  # EOS <|im_end|> 151645 (the instruct models' end of turn; the base model stops on 151643).
  "qwen2_5_0_5b": ModelConfig(
    vocab_size=151936,
    d_model=896,
    n_layers=24,
    n_heads=14,
    n_kv_heads=2,
    head_dim=64,
    d_ff=4864,
    rms_eps=1e-6,
    rope_theta=1000000.0,
    max_seq_len=32768,
    tie_embeddings=True,
    bos_id=151643,
    eos_id=151645,
    family="qwen2",
  ),
}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


def config_from_fields(fields, where: str = "config.model") -> ModelConfig:
  """A `preset` plus overrides, or every required ModelConfig field spelled out; None values are
  "not set" and a sliding_window of 0 is "no window" (a config placeholder cannot hold None)."""
  fields = {k: v for k, v in dict(fields).items() if v is not None}
  name = fields.pop("preset", None)
  if fields.get("sliding_window") == 0:
    fields["sliding_window"] = None
  if name:
    return preset(name, **fields)
  missing = [
    f.name for f in dataclasses.fields(ModelConfig) if f.name not in fields and f.default is dataclasses.MISSING
  ]
  if missing:
    raise ConfigError(f"{where}: no preset and no value for {missing}")
  return ModelConfig(**fields)


class ModelOutput(NamedTuple):
  logits_BTV: Array  # [B, K, V] when the call passed lm_rows_BK
  cls_logit_B: Array | None
  cache: Any


def _dense_init():
  return nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x_BTD):
    weight_D = self.param(
      "weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x_BTD.shape[-1],), self.param_dtype
    )
    x32 = x_BTD.astype(jnp.float32)
    # HF normalises in fp32, casts back to the activation dtype, then scales.
    y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(self.dtype)
    return weight_D.astype(self.dtype) * y


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """[H/2] fp32 inverse frequencies after any static scaling ("dynamic" is applied per call)."""
  H = cfg.head_dim
  # fp32 throughout, in HF's order of operations, so angles at long positions agree bit for bit.
  inv_h = np.float32(1.0) / (np.float32(cfg.rope_theta) ** (np.arange(0, H, 2).astype(np.float32) / np.float32(H)))
  if cfg.rope_type == "linear":
    return (inv_h / np.float32(cfg.rope_factor)).astype(np.float32)
  if cfg.rope_type != "llama3":
    return inv_h.astype(np.float32)
  # Llama 3.1: wavelengths longer than the original context / low_freq_factor are stretched by
  # `factor`, those shorter than context / high_freq_factor are kept, the band between blends.
  factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_len
  wavelen_h = 2 * math.pi / inv_h
  scaled_h = np.where(wavelen_h > old_len / low, inv_h / factor, inv_h)
  smooth_h = (old_len / wavelen_h - low) / (high - low)
  blended_h = (1 - smooth_h) * scaled_h / factor + smooth_h * scaled_h
  medium_h = ~(wavelen_h < old_len / high) & ~(wavelen_h > old_len / low)
  return np.where(medium_h, blended_h, scaled_h).astype(np.float32)


def rope_tables(positions_BT: Array, cfg: ModelConfig) -> tuple[Array, Array]:
  """cos/sin [B, T, H] for `cfg`'s RoPE, scaling included."""
  inv_freq = jnp.asarray(rope_inv_freq(cfg))
  if cfg.rope_type == "dynamic":
    # NTK-aware: past the original context the base grows with the longest position in the
    # call (as HF does per forward), so prefill and each decode step may use different bases.
    H = cfg.head_dim
    # The threshold is max_seq_len, as HF's is max_position_embeddings.
    seq_len = jnp.maximum(jnp.max(positions_BT).astype(jnp.float32) + 1, cfg.max_seq_len)
    base = cfg.rope_theta * ((cfg.rope_factor * seq_len / cfg.max_seq_len) - (cfg.rope_factor - 1)) ** (H / (H - 2))
    inv_freq = 1.0 / (base ** (jnp.arange(0, H, 2).astype(jnp.float32) / H))
  freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  angles_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
  return jnp.cos(angles_BTH), jnp.sin(angles_BTH)


def apply_rope(x_BTnH: Array, cos_BTH: Array, sin_BTH: Array) -> Array:
  """Rotate-half RoPE on HF-layout heads (first half / second half pairing, no permutation)."""
  x = x_BTnH.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_BTH[:, :, None, :] + rotated * sin_BTH[:, :, None, :]
  return out.astype(x_BTnH.dtype)


# Query/key block of `blocked_attention`, which long cached forwards (the decode loop's prompt
# pass of more than 2 blocks) use instead of materialising [B, G, R, T, S] scores.
ATTENTION_BLOCK = 256


def blocked_attention(q_BTGRH: Array, k_BGSH: Array, v_BGSH: Array, mask_BTS: Array, block: int):
  """Attention by blocks of `block` query rows × `block` key slots with an online softmax,
  visiting for each query block only the key blocks between the first and the last slot its
  mask allows; returns [B, T, G, R, H].

  Why: for a 2,048-token prompt the dense path writes and rereads fp32 scores and probabilities
  of [B, G, R, T, S] (151 MB per layer for SmolLM2) and exponentiates every masked cell; here a
  block's scores stay in cache and a causal mask skips about half of the blocks. Same values as
  the dense path to float rounding, except rows whose mask allows nothing: they come out as 0
  (the dense path averages every slot), which no caller reads (padding rows are never stored).
  The key-block range is data-dependent (a while loop), so this path has no reverse-mode
  gradient; training never takes it (it has no cache).
  """
  B, T, G, R, H = q_BTGRH.shape
  S = k_BGSH.shape[2]
  C = block
  nq, nk = -(-T // C), -(-S // C)
  dtype = q_BTGRH.dtype
  q_BTGRH = jnp.pad(q_BTGRH, ((0, 0), (0, nq * C - T), (0, 0), (0, 0), (0, 0)))
  k_BGSH = jnp.pad(k_BGSH, ((0, 0), (0, 0), (0, nk * C - S), (0, 0)))
  v_BGSH = jnp.pad(v_BGSH, ((0, 0), (0, 0), (0, nk * C - S), (0, 0)))
  mask_BTS = jnp.pad(mask_BTS, ((0, 0), (0, nq * C - T), (0, nk * C - S)))
  q_QBGRCH = q_BTGRH.reshape(B, nq, C, G, R, H).transpose(1, 0, 3, 4, 2, 5)
  mask_QBCS = mask_BTS.reshape(B, nq, C, nk * C).transpose(1, 0, 2, 3)
  scale = 1.0 / jnp.sqrt(jnp.float32(H))

  def query_block(args):
    q_BGRCH, mask_BCS = args
    any_K = jnp.any(mask_BCS.reshape(B, C, nk, C), axis=(0, 1, 3))
    lo = jnp.argmax(any_K)
    hi = jnp.where(jnp.any(any_K), nk - jnp.argmax(any_K[::-1]), lo)

    def key_block(j, carry):
      max_BGRC, sum_BGRC, acc_BGRCH = carry
      k_BGKH = jax.lax.dynamic_slice_in_dim(k_BGSH, j * C, C, axis=2)
      v_BGKH = jax.lax.dynamic_slice_in_dim(v_BGSH, j * C, C, axis=2)
      m_BCK = jax.lax.dynamic_slice_in_dim(mask_BCS, j * C, C, axis=2)
      s_BGRCK = jnp.einsum("bgrch,bgkh->bgrck", q_BGRCH, k_BGKH, preferred_element_type=jnp.float32) * scale
      s_BGRCK = jnp.where(m_BCK[:, None, None], s_BGRCK, -jnp.inf)
      new_max_BGRC = jnp.maximum(max_BGRC, jnp.max(s_BGRCK, axis=-1))
      # A row with nothing allowed so far keeps max -inf; shifting it by 0 keeps exp() at 0, not NaN.
      shift_BGRC = jnp.where(jnp.isfinite(new_max_BGRC), new_max_BGRC, 0.0)
      p_BGRCK = jnp.exp(s_BGRCK - shift_BGRC[..., None])
      rescale_BGRC = jnp.exp(max_BGRC - shift_BGRC)
      sum_BGRC = sum_BGRC * rescale_BGRC + jnp.sum(p_BGRCK, axis=-1)
      pv_BGRCH = jnp.einsum("bgrck,bgkh->bgrch", p_BGRCK.astype(dtype), v_BGKH, preferred_element_type=jnp.float32)
      return new_max_BGRC, sum_BGRC, acc_BGRCH * rescale_BGRC[..., None] + pv_BGRCH

    init = (
      jnp.full((B, G, R, C), -jnp.inf, jnp.float32),
      jnp.zeros((B, G, R, C), jnp.float32),
      jnp.zeros((B, G, R, C, H), jnp.float32),
    )
    _, sum_BGRC, acc_BGRCH = jax.lax.fori_loop(lo, hi, key_block, init)
    return (acc_BGRCH / jnp.where(sum_BGRC > 0, sum_BGRC, 1.0)[..., None]).astype(dtype)

  out_QBGRCH = jax.lax.map(query_block, (q_QBGRCH, mask_QBCS))
  return out_QBGRCH.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * C, G, R, H)[:, :T]


class Attention(nn.Module):
  cfg: ModelConfig
  # None: `cache` is this layer's (k, v), [B, G, S, H] each. An int: `cache` is the whole stack,
  # [L, B, G, S, H], and this layer writes and reads its own index of it, so a decode loop updates
  # its cache buffer in place instead of slicing it apart and stacking it again every step.
  layer: int | None = None

  @nn.compact
  def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_BTS, cache, slots_BT):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    D, N, G, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def kernel(name, shape, axes):
      return self.param(name, nn.with_logical_partitioning(_dense_init(), axes), shape, pdtype).astype(dtype)

    wq_DNH = kernel("q_proj", (D, N, H), ("embed", "heads", "head_dim"))
    wk_DGH = kernel("k_proj", (D, G, H), ("embed", "kv_heads", "head_dim"))
    wv_DGH = kernel("v_proj", (D, G, H), ("embed", "kv_heads", "head_dim"))
    wo_NHD = kernel("o_proj", (N, H, D), ("heads", "head_dim", "embed"))

    B, T = x_BTD.shape[:2]
    # matmul.dense on the flattened heads: same values, a backward without transposes of the
    # projections' output gradients (see MLP).
    q_BTNH = matmul.dense(x_BTD, wq_DNH.reshape(D, N * H)).reshape(B, T, N, H)
    k_BTGH = matmul.dense(x_BTD, wk_DGH.reshape(D, G * H)).reshape(B, T, G, H)
    v_BTGH = matmul.dense(x_BTD, wv_DGH.reshape(D, G * H)).reshape(B, T, G, H)
    if cfg.qkv_bias:
      bias = lambda name, shape, axes: self.param(
        name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape, pdtype
      ).astype(dtype)
      q_BTNH = q_BTNH + bias("q_bias", (N, H), ("heads", "head_dim"))
      k_BTGH = k_BTGH + bias("k_bias", (G, H), ("kv_heads", "head_dim"))
      v_BTGH = v_BTGH + bias("v_bias", (G, H), ("kv_heads", "head_dim"))
    q_BTNH = checkpoint_name(q_BTNH, "query_proj")
    k_BTGH = checkpoint_name(k_BTGH, "key_proj")
    v_BTGH = checkpoint_name(v_BTGH, "value_proj")
    q_BTNH = nn.with_logical_constraint(
      q_BTNH, ("activation_batch", "activation_length", "activation_heads", "head_dim")
    )
    q_BTNH = apply_rope(q_BTNH, cos_BTH, sin_BTH)
    k_BTGH = apply_rope(k_BTGH, cos_BTH, sin_BTH)

    if cache is None:
      # Keys are the rows themselves.
      k_BSGH, v_BSGH, new_cache = k_BTGH, v_BTGH, None
      kv = "bsgh"
    else:
      # New rows land in the slots the caller chose; slot == S (out of range) means "do not store".
      # The cache keeps heads before slots ([.., B, G, S, H]) so the attention dots read it as it
      # lies; with slots before heads XLA CPU copied every layer's cache into that order per step.
      # Written row by row (vmap): a scatter with batch dimensions stays split over the rows of a
      # decode mesh, where one with explicit row indices makes the partitioner gather all rows.
      k_cache, v_cache = cache

      def write(c, s_T, x_TGH):  # one row's cache: [G, S, H], or [L, G, S, H] with self.layer
        if self.layer is None:  # one advanced index: its T dim stays in place, [G, T, H]
          return c.at[:, s_T].set(jnp.swapaxes(x_TGH, 0, 1).astype(c.dtype), mode="drop")
        # an int and an array apart: numpy puts the broadcast T dim first, [T, G, H]
        return c.at[self.layer, :, s_T].set(x_TGH.astype(c.dtype), mode="drop")

      axis = 0 if self.layer is None else 1
      k_cache = jax.vmap(write, in_axes=(axis, 0, 0), out_axes=axis)(k_cache, slots_BT, k_BTGH)
      v_cache = jax.vmap(write, in_axes=(axis, 0, 0), out_axes=axis)(v_cache, slots_BT, v_BTGH)
      new_cache = (k_cache, v_cache)
      k_BGSH, v_BGSH = (k_cache, v_cache) if self.layer is None else (k_cache[self.layer], v_cache[self.layer])
      k_BSGH, v_BSGH = k_BGSH.astype(dtype), v_BGSH.astype(dtype)  # named for the spec below
      kv = "bgsh"

    if cfg.attention_impl == "cudnn":
      if kv == "bgsh":
        k_BSGH, v_BSGH = k_BSGH.transpose(0, 2, 1, 3), v_BSGH.transpose(0, 2, 1, 3)
      out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSGH, v_BSGH, mask=mask_BTS[:, None], implementation="cudnn")
    elif kv == "bgsh" and T > 2 * ATTENTION_BLOCK:
      out_BTNH = blocked_attention(q_BTNH.reshape(B, T, G, N // G, H), k_BSGH, v_BSGH, mask_BTS, ATTENTION_BLOCK)
      out_BTNH = out_BTNH.reshape(B, T, N, H)
    else:
      q_BTGRH = q_BTNH.reshape(B, T, G, N // G, H)
      scores_BGRTS = jnp.einsum(f"btgrh,{kv}->bgrts", q_BTGRH, k_BSGH, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(H)
      )
      # A large finite fill keeps fully masked (padding) rows finite instead of NaN.
      scores_BGRTS = jnp.where(mask_BTS[:, None, None], scores_BGRTS, jnp.finfo(jnp.float32).min)
      probs_BGRTS = jax.nn.softmax(scores_BGRTS, axis=-1).astype(dtype)
      out_BTNH = jnp.einsum(f"bgrts,{kv}->btgrh", probs_BGRTS, v_BSGH).reshape(B, T, N, H)
    # Flattened heads: contracting (n, h) as two dims let XLA CPU transpose o_proj every call.
    out_BTD = matmul.dense(out_BTNH.reshape(B, T, N * H), wo_NHD.reshape(N * H, D))
    return checkpoint_name(out_BTD, "attn_out"), new_cache


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def kernel(name, shape, axes):
      return self.param(name, nn.with_logical_partitioning(_dense_init(), axes), shape, pdtype).astype(dtype)

    # matmul.dense: same values, a backward without [B, T, F]-sized transposes on XLA CPU.
    gate_BTF = matmul.dense(x_BTD, kernel("gate_proj", (cfg.d_model, cfg.d_ff), ("embed", "mlp")))
    up_BTF = matmul.dense(x_BTD, kernel("up_proj", (cfg.d_model, cfg.d_ff), ("embed", "mlp")))
    h_BTF = nn.with_logical_constraint(
      jax.nn.silu(gate_BTF) * up_BTF, ("activation_batch", "activation_length", "activation_mlp")
    )
    out_BTD = matmul.dense(h_BTF, kernel("down_proj", (cfg.d_ff, cfg.d_model), ("mlp", "embed")))
    return checkpoint_name(out_BTD, "mlp_out")


class CLSAdapter(nn.Module):
  """Residual adapter of the CLS row: up(silu(down(norm(x)))), `up` zero-initialised so a fresh
  adapter leaves the model as it was."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    r = cfg.cls_adapter_rank
    h = RMSNorm(cfg.rms_eps, dtype, pdtype, name="norm")(x_BTD)
    down = self.param("down", nn.with_logical_partitioning(_dense_init(), ("embed", None)), (cfg.d_model, r), pdtype)
    up = self.param(
      "up", nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")), (r, cfg.d_model), pdtype
    )
    return jnp.einsum("btr,rd->btd", jax.nn.silu(jnp.einsum("btd,dr->btr", h, down.astype(dtype))), up.astype(dtype))


class DecoderLayer(nn.Module):
  cfg: ModelConfig
  layer: int | None = None  # see Attention.layer

  @nn.compact
  def __call__(self, x_BTD, cache, cos_BTH, sin_BTH, mask_BTS, slots_BT):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.rms_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), name=name)
    attn_BTD, new_cache = Attention(cfg, self.layer, name="attn")(
      norm("input_norm")(x_BTD), cos_BTH, sin_BTH, mask_BTS, cache, slots_BT
    )
    x_BTD = x_BTD + attn_BTD
    x_BTD = x_BTD + MLP(cfg, name="mlp")(norm("post_attn_norm")(x_BTD))
    x_BTD = nn.with_logical_constraint(x_BTD, ("activation_batch", "activation_length", "activation_embed"))
    return x_BTD, new_cache


class Transformer(nn.Module):
  """`__call__(tokens_BT, positions_BT, mask_BTS, cache=None, slots_BT=None, cls_row=0)`.

  Without a cache, keys are the T rows themselves (mask is [B, T, T]). With a cache
  (per-layer (k, v) of shape [L, B, G, S, H], from `init_cache`), the rows' K/V are first written into
  `slots_BT` and the rows attend over all S slots (mask is [B, T, S]).
  `cls_row` picks which row feeds the safety head (None: no head output): an int, or [B, K] row
  indices for K CLS rows per sequence (the head's output is then [B, K]).
  `cls_only`: run only the layers the CLS verdict depends on (`cfg.cls_layers`) and no LM head
  (logits None): the CLS training passes, which never read LM logits.
  `lm_rows_BK` ([B, K] row indices, or None for every row) picks the rows that get LM-head
  logits; the output's logits are then [B, K, V]. The head is the largest single matrix of a
  small model (SmolLM2: 49152 x 576), so a decode step that carries the CLS row, or a prefill
  that samples from one row, should not pay for logits nobody reads.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens_BT,
    positions_BT,
    mask_BTS,
    cache=None,
    slots_BT=None,
    cls_row=0,
    lm_rows_BK=None,
    cls_only: bool = False,
  ):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    V, D = cfg.vocab_size, cfg.d_model
    embed_VD = self.param("embedding", nn.with_logical_partitioning(_dense_init(), ("vocab", "embed")), (V, D), pdtype)
    # The CLS row starts as the mean of the existing rows (HF mean_resizing, without the noise).
    cls_D = self.param(
      "cls_embedding",
      nn.with_logical_partitioning(lambda _, shape, dt: jnp.mean(embed_VD, axis=0).astype(dt), ("embed",)),
      (D,),
      pdtype,
    )
    is_cls_BT1 = (tokens_BT == cfg.cls_id)[..., None]
    x_BTD = jnp.take(embed_VD, jnp.clip(tokens_BT, 0, V - 1), axis=0)
    x_BTD = jnp.where(is_cls_BT1, cls_D, x_BTD).astype(dtype)
    x_BTD = nn.with_logical_constraint(x_BTD, ("activation_batch", "activation_length", "activation_embed"))
    cos_BTH, sin_BTH = rope_tables(positions_BT, cfg)

    layer_cls = DecoderLayer
    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy != "none":
      layer_cls = nn.remat(DecoderLayer, policy=policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x_BTD, new_cache = stack(cfg, name="layers")(x_BTD, cache, cos_BTH, sin_BTH, mask_BTS, slots_BT)
    else:
      new_cache = cache
      cls_x_BTD = None
      for i in range(cfg.cls_layers if cls_only else cfg.n_layers):
        x_BTD, new_cache = layer_cls(cfg, i, name=f"layers_{i}")(x_BTD, new_cache, cos_BTH, sin_BTH, mask_BTS, slots_BT)
        if cfg.cls_adapter_rank and i < cfg.cls_layers:
          x_BTD = jnp.where(is_cls_BT1, x_BTD + CLSAdapter(cfg, name=f"cls_adapter_{i}")(x_BTD), x_BTD)
        if i + 1 == cfg.cls_exit_layer:
          cls_x_BTD = x_BTD

    final_norm = RMSNorm(cfg.rms_eps, dtype, pdtype, name="final_norm")
    if cfg.cls_exit_layer:
      cls_h_BTD = RMSNorm(cfg.rms_eps, dtype, pdtype, name="cls_norm")(cls_x_BTD)
    else:
      cls_h_BTD = final_norm(x_BTD)
    if cls_only:
      return ModelOutput(None, None if cls_row is None else self._cls_head(cls_h_BTD, cls_row), new_cache)

    h_BTD = final_norm(x_BTD) if cfg.cls_exit_layer else cls_h_BTD
    # K = T when every row gets logits; the suffix stays T below for the common case.
    lm_h_BTD = h_BTD if lm_rows_BK is None else jnp.take_along_axis(h_BTD, lm_rows_BK[..., None], axis=1)
    if cfg.tie_embeddings:
      logits_BTV = jnp.einsum("btd,vd->btv", lm_h_BTD, embed_VD.astype(dtype))
    else:
      head_DV = self.param("lm_head", nn.with_logical_partitioning(_dense_init(), ("embed", "vocab")), (D, V), pdtype)
      logits_BTV = jnp.einsum("btd,dv->btv", lm_h_BTD, head_DV.astype(dtype))
    logits_BTV = nn.with_logical_constraint(
      logits_BTV.astype(jnp.float32), ("activation_batch", "activation_length", "activation_vocab")
    )

    # Always applied (one row, negligible) so every param tree has the head.
    cls_logit_B = self._cls_head(cls_h_BTD, 0 if cls_row is None else cls_row)
    return ModelOutput(logits_BTV, None if cls_row is None else cls_logit_B, new_cache)

  def _cls_head(self, h_BTD, cls_row):
    """Logit of the CLS row(s): `cls_row` an int gives [B], [B, K] row indices give [B, K]."""
    cls_head = nn.Dense(
      1,
      dtype=jnp.float32,
      param_dtype=jnp.dtype(self.cfg.param_dtype),
      name="cls_head",
      kernel_init=nn.with_logical_partitioning(_dense_init(), ("embed", "cls_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("cls_out",)),
    )
    if isinstance(cls_row, int):
      return cls_head(h_BTD[:, cls_row].astype(jnp.float32))[:, 0]
    rows_BKD = jnp.take_along_axis(h_BTD, jnp.asarray(cls_row)[..., None], axis=1)
    return cls_head(rows_BKD.astype(jnp.float32))[..., 0]


def fresh_cls_path(cfg: ModelConfig, rng: Array) -> dict:
  """Initial params of the CLS side path (adapters: `up` zero, so the CLS starts as the base model's;
  cls_norm: ones), for weights imported without them (a GGUF or HF base model)."""
  out = {}
  x = jnp.zeros((1, 1, cfg.d_model), jnp.dtype(cfg.param_dtype))
  for i in range(cfg.cls_layers if cfg.cls_adapter_rank else 0):
    out[f"cls_adapter_{i}"] = nn.meta.unbox(CLSAdapter(cfg).init(jax.random.fold_in(rng, i), x)["params"])
  if cfg.cls_exit_layer:
    out["cls_norm"] = {"weight": jnp.ones((cfg.d_model,), jnp.dtype(cfg.param_dtype))}
  return out


CACHE_AXES = ("cache_layers", "activation_batch", "cache_kv_heads", "cache_slots", "cache_head_dim")


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype=None):
  """Zero K and V caches, [L, B, G, S, H] each (see Attention), logically named (`CACHE_AXES`) so a
  decode mesh splits them over rows (and kv heads) like the batch they belong to."""
  shape = (cfg.n_layers, batch, cfg.n_kv_heads, slots, cfg.head_dim)
  dt = jnp.dtype(dtype or cfg.dtype)
  zeros = lambda: nn.with_logical_constraint(jnp.zeros(shape, dt), CACHE_AXES)
  return (zeros(), zeros())


def init_params(cfg: ModelConfig, rng: Array, seq_len: int = 8):
  """Unboxed fp params for `cfg` (plain nested dict)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  positions = jnp.arange(seq_len, dtype=jnp.int32)[None]
  mask = jnp.tril(jnp.ones((1, seq_len, seq_len), bool))
  variables = Transformer(cfg).init(rng, tokens, positions, mask)
  return nn.meta.unbox(variables["params"])


def abstract_params(cfg: ModelConfig):
  """Boxed ShapeDtypeStructs (logical axis metadata kept), without allocating anything."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, 8, 8), jnp.bool_)
  init = lambda r, t, m: Transformer(cfg).init(r, t, t, m)
  return jax.eval_shape(init, jax.random.key(0), tokens, mask)["params"]


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nn.meta.unbox(params))))


def stack_layers(params: dict, n_layers: int) -> dict:
  """Per-layer `layers_{i}` subtrees → one `layers` subtree with a leading [L] axis (scan layout)."""
  if "layers" in params:
    return params
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(n_layers)])
  return out


def unstack_layers(params: dict) -> dict:
  if "layers" not in params:
    return params
  out = {k: v for k, v in params.items() if k != "layers"}
  n = jax.tree.leaves(params["layers"])[0].shape[0]
  for i in range(n):
    out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
  return out


def to_layout(params: dict, cfg: ModelConfig) -> dict:
  """Put params in the layout `cfg.scan_layers` expects."""
  return stack_layers(params, cfg.n_layers) if cfg.scan_layers else unstack_layers(params)
