"""Model families: everything that differs between the Llama-shaped architectures we run, one
`Family` entry per family, read by the model (`model.py`), the HF and GGUF interop
(`interop/hf.py`, `interop/gguf.py`) and the loader (`artifacts.py`).

A family is what an HF `architectures` entry names: the shapes (width, heads, layers, RoPE base)
are a `ModelConfig`'s, the fixed traits of the architecture (biases, how a window or RoPE scaling is
spelled in config.json, the chat template its instruct models use, the GGUF layout) live here.
Adding a Llama-shaped family is one entry in `FAMILIES` plus its parity test (docs/interop.md,
"Adding a model family").

A leaf module: it imports nothing from the package, so every layer may read it.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Any, Mapping

# llama.cpp's names of a decoder layer's tensors (`blk.{i}.{kind}.{weight|bias}`) -> the HF module
# under `model.layers.{i}`, for every Llama-shaped architecture llama.cpp writes.
LLAMA_GGUF_LAYER_NAMES: Mapping[str, str] = MappingProxyType(
  {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
  }
)
# ... and the tensors outside the layers.
LLAMA_GGUF_TOP_NAMES: Mapping[str, str] = MappingProxyType(
  {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
)

# What HF's Llama-style config classes assume for keys a config.json leaves out (max_position_embeddings
# as this code has always defaulted it).
LLAMA_HF_DEFAULTS = MappingProxyType(
  {
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
  }
)

# Every RoPE scaling the model implements (model.ROPE_TYPES names the same four).
ALL_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

# How a family's config.json states a sliding attention window (`Family.hf_window`).
WINDOW_NONE = "none"  # the architecture has no window
WINDOW_READ = "read"  # `sliding_window` is the window of every layer (Mistral)
WINDOW_REFUSE = "refuse"  # a window exists but we do not implement it: refused when switched on


@dataclasses.dataclass(frozen=True)
class Family:
  """The fixed traits of one architecture family."""

  # `ModelConfig.family`, and HF's `model_type` written on export.
  name: str
  # HF `architectures` entries read as this family; the first is the one an export writes.
  hf_architectures: tuple[str, ...]
  # Whether the q/k/v projections carry biases (Qwen2). The output projection never does in a
  # Llama-shaped family, nor does the MLP.
  qkv_bias: bool = False
  # How config.json states a sliding window: WINDOW_NONE, WINDOW_READ or WINDOW_REFUSE.
  hf_window: str = WINDOW_NONE
  # config.json keys whose true value adds something this family's model does not compute
  # (e.g. Llama's `attention_bias` also puts a bias on o_proj); refused by name.
  hf_refused_flags: tuple[str, ...] = ()
  # Values this family's config.json may leave out, as the key reads there (rms_norm_eps,
  # max_position_embeddings, rope_theta, tie_word_embeddings, bos_token_id, eos_token_id).
  hf_defaults: Mapping[str, Any] = dataclasses.field(default_factory=lambda: LLAMA_HF_DEFAULTS)
  # Keys an export writes besides the ones every family shares (config_to_hf), so that
  # transformers' config class reads back exactly our model.
  hf_export_extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # RoPE scalings (`rope_type` of HF's rope_parameters / rope_scaling) accepted for this family;
  # the HF fields map to ModelConfig's rope_* as in interop.hf.rope_fields_from_hf. Others are refused.
  rope_types: tuple[str, ...] = ALL_ROPE_TYPES
  # The chat template (a data.templates.get_template name) a checkpoint of this family gets when
  # neither the caller nor the run facts name one (artifacts.inferred_template): after the
  # vocabulary's hints (ChatML or Llama-3 header tokens) when `template_from_vocabulary`, else
  # regardless of them (one family, one format: Qwen2's ChatML with its own system prompt).
  chat_template: str = "llama2"
  template_from_vocabulary: bool = True
  # GGUF `general.architecture` values read as this family; also the prefix of their metadata
  # keys (`{arch}.block_count`). Empty: no GGUF import.
  gguf_architectures: tuple[str, ...] = ()
  # Whether llama.cpp's converter interleaved the Q/K rows of each head (its "normal" RoPE for
  # the llama architecture); False where it keeps HF's rotate-half order (NeoX RoPE, e.g. qwen2).
  gguf_permuted_qk: bool = True
  # GGUF tensor names -> HF names, for a layer's tensors and for the rest (see LLAMA_GGUF_*).
  gguf_layer_names: Mapping[str, str] = dataclasses.field(default_factory=lambda: LLAMA_GGUF_LAYER_NAMES)
  gguf_top_names: Mapping[str, str] = dataclasses.field(default_factory=lambda: LLAMA_GGUF_TOP_NAMES)

  def __post_init__(self):
    if not self.hf_architectures:
      raise ValueError(f"family {self.name!r}: hf_architectures is empty")
    if self.hf_window not in (WINDOW_NONE, WINDOW_READ, WINDOW_REFUSE):
      raise ValueError(f"family {self.name!r}: hf_window={self.hf_window!r}")
    missing = set(LLAMA_HF_DEFAULTS) - set(self.hf_defaults)
    if missing:
      raise ValueError(f"family {self.name!r}: hf_defaults lacks {sorted(missing)}")
    unknown = set(self.rope_types) - set(ALL_ROPE_TYPES)
    if unknown or "default" not in self.rope_types:
      raise ValueError(f"family {self.name!r}: rope_types={self.rope_types} (known: {ALL_ROPE_TYPES})")


FAMILIES: Mapping[str, Family] = MappingProxyType(
  {
    # Llama-2, Llama-3.x, SmolLM2 and every other LlamaForCausalLM without biases.
    "llama": Family(
      name="llama",
      hf_architectures=("LlamaForCausalLM",),
      hf_refused_flags=("attention_bias", "mlp_bias"),
      hf_export_extra=MappingProxyType({"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}),
      chat_template="llama2",
      gguf_architectures=("llama",),
    ),
    # Mistral-7B v0.1 / Instruct v0.2: Llama layers, a sliding window in v0.1, the [INST] format.
    # llama.cpp writes Mistral as GGUF architecture "llama" (imported as the llama family).
    "mistral": Family(
      name="mistral",
      hf_architectures=("MistralForCausalLM",),
      hf_window=WINDOW_READ,
      hf_refused_flags=("attention_bias", "mlp_bias"),
      chat_template="mistral",
    ),
    # Qwen2 / Qwen2.5: Llama layers with q/k/v biases, ChatML. Its optional sliding window
    # (`use_sliding_window`, on the top layers only) is refused.
    "qwen2": Family(
      name="qwen2",
      hf_architectures=("Qwen2ForCausalLM",),
      qkv_bias=True,
      hf_window=WINDOW_REFUSE,
      hf_defaults=MappingProxyType(
        {
          "rms_norm_eps": 1e-6,
          "max_position_embeddings": 32768,
          "rope_theta": 10000.0,
          "tie_word_embeddings": False,
          # <|endoftext|>: Qwen2's config class has no default; its checkpoints all say this.
          "bos_token_id": 151643,
          "eos_token_id": 151643,
        }
      ),
      hf_export_extra=MappingProxyType({"use_sliding_window": False, "sliding_window": None}),
      # Qwen's long-context releases use YaRN, which the model does not implement.
      rope_types=("default", "linear", "dynamic"),
      chat_template="qwen2_5",
      template_from_vocabulary=False,
      gguf_architectures=("qwen2",),
      gguf_permuted_qk=False,
    ),
  }
)


def get(name: str) -> Family:
  """The family called `name` (ModelConfig.family); KeyError naming the known ones."""
  if name not in FAMILIES:
    raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
  return FAMILIES[name]


def family_for_hf_architecture(architecture: str) -> Family | None:
  """The family whose config.json `architectures` entry this is; None when no family reads it."""
  return next((f for f in FAMILIES.values() if architecture in f.hf_architectures), None)


def family_for_gguf(architecture: str) -> Family | None:
  """The family a GGUF `general.architecture` value is read as; None when none is."""
  return next((f for f in FAMILIES.values() if architecture in f.gguf_architectures), None)


def hf_architectures() -> list[str]:
  """Every HF architecture some family reads, sorted (for error messages)."""
  return sorted(a for f in FAMILIES.values() for a in f.hf_architectures)


def gguf_architectures() -> list[str]:
  return sorted(a for f in FAMILIES.values() for a in f.gguf_architectures)
