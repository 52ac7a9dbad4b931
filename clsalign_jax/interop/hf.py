"""Hugging Face directories <-> our param tree, without torch.

Import reads `config.json` and `model.safetensors` (or a sharded index). Export writes a
directory that `transformers.AutoModelForCausalLM.from_pretrained` loads unchanged, plus the
[CLS] extras (input-embedding row and safety head) in `clsalign_cls.safetensors` described by
`clsalign.json`. Import of our own export restores every tensor bit-exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

import numpy as np
import safetensors
import safetensors.numpy

from clsalign_jax import families, files
from clsalign_jax.data.templates import QUERY, Special
from clsalign_jax.errors import CheckpointError
from clsalign_jax.model import ROPE_TYPES, ModelConfig, unstack_layers

CLS_FILE = "clsalign_cls.safetensors"
CLS_META = "clsalign.json"
FORMAT_VERSION = 1
_SHARD_BYTES = 4 * 1024**3


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
  archs = hf.get("architectures") or []
  known = [f for f in map(families.family_for_hf_architecture, archs) if f is not None]
  if not known:
    raise CheckpointError(f"{source}: architectures={archs} is not supported; supported: {families.hf_architectures()}")
  family = known[0]
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
  for flag in family.hf_refused_flags:
    if hf.get(flag):
      raise CheckpointError(f"{source}: {flag}=true is not supported")
  rope = rope_fields_from_hf(hf, source, family)
  n_heads = hf["num_attention_heads"]
  d_model = hf["hidden_size"]
  default = family.hf_defaults
  return ModelConfig(
    vocab_size=hf["vocab_size"],
    d_model=d_model,
    n_layers=hf["num_hidden_layers"],
    n_heads=n_heads,
    n_kv_heads=hf.get("num_key_value_heads") or n_heads,
    head_dim=hf.get("head_dim") or d_model // n_heads,
    d_ff=hf["intermediate_size"],
    rms_eps=hf.get("rms_norm_eps", default["rms_norm_eps"]),
    **rope,
    max_seq_len=hf.get("max_position_embeddings", default["max_position_embeddings"]),
    sliding_window=_window_from_hf(hf, family, source),
    tie_embeddings=bool(hf.get("tie_word_embeddings", default["tie_word_embeddings"])),
    bos_id=_first_id(hf.get("bos_token_id"), default["bos_token_id"]),
    eos_id=_first_id(hf.get("eos_token_id"), default["eos_token_id"]),
    family=family.name,
  )


def _window_from_hf(hf: dict, family: families.Family, source: str) -> int | None:
  if family.hf_window == families.WINDOW_READ:
    return hf.get("sliding_window")
  if family.hf_window == families.WINDOW_REFUSE:
    # transformers >= 5 spells the switch per layer (`layer_types`), older configs as one flag.
    if hf.get("use_sliding_window"):
      raise CheckpointError(f"{source}: use_sliding_window=true is not supported ({family.name}: full attention only)")
    if "sliding_attention" in (hf.get("layer_types") or ()):
      raise CheckpointError(
        f"{source}: layer_types has 'sliding_attention' layers, not supported ({family.name}: full attention only)"
      )
  return None


def rope_fields_from_hf(hf: dict, source: str, family: families.Family | None = None) -> dict:
  """ModelConfig rope_* fields from `rope_parameters` (transformers >= 5) or the older
  `rope_theta` + `rope_scaling` pair; any scaling we (or the family) do not implement is refused."""
  family = family or families.get("llama")
  rope = dict(hf.get("rope_scaling") or {})
  rope.update(hf.get("rope_parameters") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ROPE_TYPES or rope_type not in family.rope_types:
    raise CheckpointError(
      f"{source}: rope type {rope_type!r} is not supported (supported for {family.name}: {', '.join(family.rope_types)})"
    )
  theta = rope.get("rope_theta", hf.get("rope_theta", family.hf_defaults["rope_theta"]))
  fields = {"rope_theta": float(theta), "rope_type": rope_type}
  if rope_type == "default":
    return fields
  # "dynamic" grows the base past max_position_embeddings, as in HF (which ignores any
  # original_max_position_embeddings for this type).
  needed = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
  }
  missing = [k for k in needed[rope_type] if k not in rope]
  if missing:
    raise CheckpointError(f"{source}: rope type {rope_type!r} needs {missing} in rope_parameters")
  fields["rope_factor"] = float(rope["factor"])
  if rope_type == "llama3":
    fields.update(
      rope_low_freq_factor=float(rope["low_freq_factor"]),
      rope_high_freq_factor=float(rope["high_freq_factor"]),
      rope_original_max_len=int(rope["original_max_position_embeddings"]),
    )
  return fields


def rope_parameters_to_hf(cfg: ModelConfig) -> dict:
  out = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type != "default":
    out["factor"] = cfg.rope_factor
  if cfg.rope_type == "llama3":
    out.update(
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_len,
    )
  return out


def _first_id(value, default):
  if value is None:
    return default
  return int(value[0] if isinstance(value, list) else value)


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
  family = cfg.family_spec
  hf = {
    "architectures": [family.hf_architectures[0]],
    "model_type": family.name,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.d_ff,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": cfg.max_seq_len,
    "rms_norm_eps": cfg.rms_eps,
    "rope_theta": cfg.rope_theta,
    "rope_parameters": rope_parameters_to_hf(cfg),
    "tie_word_embeddings": cfg.tie_embeddings,
    "bos_token_id": cfg.bos_id,
    "eos_token_id": cfg.eos_id,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": dtype,
    "dtype": dtype,
  }
  hf.update(family.hf_export_extra)
  if family.hf_window == families.WINDOW_READ:
    hf["sliding_window"] = cfg.sliding_window
  return hf


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor an HF checkpoint of this config must hold, with its shape."""
  D, N, G, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (V, D)
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    shapes.update(
      {
        p + "self_attn.q_proj.weight": (N * H, D),
        p + "self_attn.k_proj.weight": (G * H, D),
        p + "self_attn.v_proj.weight": (G * H, D),
        p + "self_attn.o_proj.weight": (D, N * H),
        p + "mlp.gate_proj.weight": (F, D),
        p + "mlp.up_proj.weight": (F, D),
        p + "mlp.down_proj.weight": (D, F),
        p + "input_layernorm.weight": (D,),
        p + "post_attention_layernorm.weight": (D,),
      }
    )
    if cfg.qkv_bias:
      for proj, width in (("q", N * H), ("k", G * H), ("v", G * H)):
        shapes[f"{p}self_attn.{proj}_proj.bias"] = (width,)
  return shapes


def params_from_hf_tensors(cfg: ModelConfig, get, source: str) -> dict:
  """Build our unstacked param tree; `get(name)` returns one HF tensor as numpy."""
  D, N, G, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  shapes = hf_tensor_shapes(cfg)

  def t(name):
    arr = get(name)
    if arr is None:
      raise CheckpointError(f"{source}: tensor {name!r} is missing")
    if tuple(arr.shape) != shapes[name]:
      raise CheckpointError(
        f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, expected {shapes[name]} from the config"
      )
    return arr

  params: dict[str, Any] = {
    "embedding": t("model.embed_tokens.weight"),
    "final_norm": {"weight": t("model.norm.weight")},
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = np.ascontiguousarray(t("lm_head.weight").T)
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    params[f"layers_{i}"] = {
      "attn": {
        "q_proj": np.ascontiguousarray(t(p + "self_attn.q_proj.weight").T.reshape(D, N, H)),
        "k_proj": np.ascontiguousarray(t(p + "self_attn.k_proj.weight").T.reshape(D, G, H)),
        "v_proj": np.ascontiguousarray(t(p + "self_attn.v_proj.weight").T.reshape(D, G, H)),
        "o_proj": np.ascontiguousarray(t(p + "self_attn.o_proj.weight").T.reshape(N, H, D)),
      },
      "mlp": {
        "gate_proj": np.ascontiguousarray(t(p + "mlp.gate_proj.weight").T),
        "up_proj": np.ascontiguousarray(t(p + "mlp.up_proj.weight").T),
        "down_proj": np.ascontiguousarray(t(p + "mlp.down_proj.weight").T),
      },
      "input_norm": {"weight": t(p + "input_layernorm.weight")},
      "post_attn_norm": {"weight": t(p + "post_attention_layernorm.weight")},
    }
    if cfg.qkv_bias:
      attn = params[f"layers_{i}"]["attn"]
      for proj, heads in (("q", N), ("k", G), ("v", G)):
        attn[f"{proj}_bias"] = t(f"{p}self_attn.{proj}_proj.bias").reshape(heads, H)
  return params


def hf_tensors_from_params(cfg: ModelConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
  """Our param tree (stacked or not) → HF tensor names and arrays, in checkpoint order."""
  params = unstack_layers(params)
  D, N, G, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  a = lambda x: np.asarray(x)
  yield "model.embed_tokens.weight", a(params["embedding"])
  for i in range(cfg.n_layers):
    lp, p = params[f"layers_{i}"], f"model.layers.{i}."
    yield p + "self_attn.q_proj.weight", a(lp["attn"]["q_proj"]).reshape(D, N * H).T
    yield p + "self_attn.k_proj.weight", a(lp["attn"]["k_proj"]).reshape(D, G * H).T
    yield p + "self_attn.v_proj.weight", a(lp["attn"]["v_proj"]).reshape(D, G * H).T
    yield p + "self_attn.o_proj.weight", a(lp["attn"]["o_proj"]).reshape(N * H, D).T
    if cfg.qkv_bias:
      for proj in "qkv":
        yield f"{p}self_attn.{proj}_proj.bias", a(lp["attn"][f"{proj}_bias"]).reshape(-1)
    yield p + "mlp.gate_proj.weight", a(lp["mlp"]["gate_proj"]).T
    yield p + "mlp.up_proj.weight", a(lp["mlp"]["up_proj"]).T
    yield p + "mlp.down_proj.weight", a(lp["mlp"]["down_proj"]).T
    yield p + "input_layernorm.weight", a(lp["input_norm"]["weight"])
    yield p + "post_attention_layernorm.weight", a(lp["post_attn_norm"]["weight"])
  yield "model.norm.weight", a(params["final_norm"]["weight"])
  if not cfg.tie_embeddings:
    yield "lm_head.weight", a(params["lm_head"]).T


@contextlib.contextmanager
def _safetensors_errors(path: str, tensor: str | None = None):
  """A file the safetensors library refuses (a header that does not parse, or claims tensors the
  file does not hold) is a CheckpointError naming it, not the library's bare SafetensorError."""
  try:
    yield
  except safetensors.SafetensorError as e:
    what = f" (tensor {tensor!r})" if tensor else ""
    raise CheckpointError(f"{path}: not a readable safetensors file{what}: {e}") from None


class _SafetensorsDir:
  """Lazy tensor lookup across `model.safetensors` or the shards of an index."""

  def __init__(self, directory: str):
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      weight_map = files.read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' object")
      self.where = {name: os.path.join(directory, fname) for name, fname in weight_map.items()}
    elif os.path.exists(single):
      with _safetensors_errors(single), safetensors.safe_open(single, "np") as f:
        self.where = {name: single for name in f.keys()}
    else:
      raise CheckpointError(f"{directory}: neither model.safetensors nor model.safetensors.index.json found")
    self._open: dict[str, Any] = {}

  def get(self, name: str):
    path = self.where.get(name)
    if path is None:
      return None
    if path not in self._open:
      if not os.path.exists(path):
        raise CheckpointError(f"{path}: shard listed in the index is missing (needed for {name!r})")
      with _safetensors_errors(path):
        self._open[path] = safetensors.safe_open(path, "np").__enter__()
    with _safetensors_errors(path, name):
      return self._open[path].get_tensor(name)

  def close(self):
    for f in self._open.values():
      f.__exit__(None, None, None)
    self._open.clear()


def load_hf(directory: str) -> tuple[ModelConfig, dict]:
  """Import an HF directory of any family in `families.FAMILIES`. The CLS extras come from our
  export when present, otherwise the CLS row is the mean embedding and the head is zero
  (p(malicious) = 0.5)."""
  cfg_path = os.path.join(directory, "config.json")
  cfg = config_from_hf(files.read_json(cfg_path), cfg_path)
  tensors = _SafetensorsDir(directory)
  try:
    params = params_from_hf_tensors(cfg, tensors.get, directory)
  finally:
    tensors.close()
  cls_path = os.path.join(directory, CLS_FILE)
  if os.path.exists(cls_path):
    meta_path = os.path.join(directory, CLS_META)
    side = files.read_json(meta_path).get("side_path", {}) if os.path.exists(meta_path) else {}
    try:
      cfg = cfg.replace(
        cls_exit_layer=int(side.get("exit_layer", 0)), cls_adapter_rank=int(side.get("adapter_rank", 0))
      )
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"{meta_path}: side_path: {e}") from None
    params.update(_load_cls_extras(cls_path, cfg))
  else:
    params.update(fresh_cls_extras(params["embedding"]))
  return cfg, params


def fresh_cls_extras(embedding_VD) -> dict:
  emb = np.asarray(embedding_VD)
  D = emb.shape[1]
  return {
    "cls_embedding": emb.astype(np.float32).mean(axis=0).astype(emb.dtype),
    "cls_head": {"kernel": np.zeros((D, 1), emb.dtype), "bias": np.zeros((1,), emb.dtype)},
  }


def _load_cls_extras(path: str, cfg: ModelConfig) -> dict:
  with _safetensors_errors(path):
    tensors = safetensors.numpy.load_file(path)
  expected = {"cls_embedding": (cfg.d_model,), "cls_head.weight": (1, cfg.d_model), "cls_head.bias": (1,)}
  for name, shape in expected.items():
    if name not in tensors:
      raise CheckpointError(f"{path}: tensor {name!r} is missing")
    if tuple(tensors[name].shape) != shape:
      raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
  out = {
    "cls_embedding": tensors["cls_embedding"],
    "cls_head": {"kernel": np.ascontiguousarray(tensors["cls_head.weight"].T), "bias": tensors["cls_head.bias"]},
  }
  for name, shape in _side_path_shapes(cfg).items():
    if name not in tensors:
      raise CheckpointError(f"{path}: tensor {name!r} is missing (the CLS side path in clsalign.json needs it)")
    if tuple(tensors[name].shape) != shape:
      raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
  for i in range(cfg.cls_layers if cfg.cls_adapter_rank else 0):
    pre = f"cls_adapter.{i}."
    out[f"cls_adapter_{i}"] = {
      "norm": {"weight": tensors[pre + "norm.weight"]},
      "down": np.ascontiguousarray(tensors[pre + "down.weight"].T),
      "up": np.ascontiguousarray(tensors[pre + "up.weight"].T),
    }
  if cfg.cls_exit_layer:
    out["cls_norm"] = {"weight": tensors["cls_norm.weight"]}
  return out


def _side_path_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Tensor names and (torch Linear [out, in]) shapes of the CLS side path in the CLS file."""
  D, r = cfg.d_model, cfg.cls_adapter_rank
  out = {}
  for i in range(cfg.cls_layers if r else 0):
    out.update({f"cls_adapter.{i}.norm.weight": (D,), f"cls_adapter.{i}.down.weight": (r, D)})
    out[f"cls_adapter.{i}.up.weight"] = (D, r)
  if cfg.cls_exit_layer:
    out["cls_norm.weight"] = (D,)
  return out


def _side_path_tensors(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
  out = {}
  for i in range(cfg.cls_layers if cfg.cls_adapter_rank else 0):
    a = params[f"cls_adapter_{i}"]
    out[f"cls_adapter.{i}.norm.weight"] = np.asarray(a["norm"]["weight"])
    out[f"cls_adapter.{i}.down.weight"] = np.ascontiguousarray(np.asarray(a["down"]).T)
    out[f"cls_adapter.{i}.up.weight"] = np.ascontiguousarray(np.asarray(a["up"]).T)
  if cfg.cls_exit_layer:
    out["cls_norm.weight"] = np.asarray(params["cls_norm"]["weight"])
  return out


def _dtype_name(arr) -> str:
  return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[np.dtype(arr.dtype).name]


def save_hf(
  directory: str,
  cfg: ModelConfig,
  params: dict,
  tokenizer=None,
  shard_bytes: int = _SHARD_BYTES,
  threshold: float = 0.5,
  chat_template: str | None = None,
) -> None:
  """Write an HF directory plus the CLS extras. Writes go to a temporary name first, so an
  interrupted export never leaves a half-written file under a final name. `chat_template` (Jinja,
  see `jinja_chat_template`) replaces the tokenizer's own in tokenizer_config.json."""
  os.makedirs(directory, exist_ok=True)
  params = unstack_layers(params)
  dtype = _dtype_name(np.asarray(params["embedding"]))
  files.atomic_write_json(os.path.join(directory, "config.json"), config_to_hf(cfg, dtype), indent=2)
  files.atomic_write_json(
    os.path.join(directory, "generation_config.json"),
    {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "do_sample": False},
    indent=2,
  )

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, arr in hf_tensors_from_params(cfg, params):
    arr = np.ascontiguousarray(arr)
    if shards[-1] and size + arr.nbytes > shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  if len(shards) == 1:
    _save_tensors(shards[0], os.path.join(directory, "model.safetensors"))
  else:
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
      fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      _save_tensors(shard, os.path.join(directory, fname))
      for name, arr in shard.items():
        weight_map[name] = fname
        total += arr.nbytes
    files.atomic_write_json(
      os.path.join(directory, "model.safetensors.index.json"),
      {"metadata": {"total_size": total}, "weight_map": weight_map},
      indent=2,
    )

  head = params["cls_head"]
  _save_tensors(
    {
      "cls_embedding": np.asarray(params["cls_embedding"]),
      "cls_head.weight": np.ascontiguousarray(np.asarray(head["kernel"]).T),
      "cls_head.bias": np.asarray(head["bias"]),
      **_side_path_tensors(cfg, params),
    },
    os.path.join(directory, CLS_FILE),
  )
  side = {}
  if cfg.has_cls_path:
    side = {
      "side_path": {
        "exit_layer": cfg.cls_exit_layer,
        "adapter_rank": cfg.cls_adapter_rank,
        "how": (
          "the CLS row alone adds up(silu(down(rmsnorm(x)))) after each decoder layer below exit_layer "
          "(all layers when 0); with exit_layer k > 0 the head reads cls_norm(h after layer k-1) instead "
          "of final_norm(h); no token attends to the CLS row, so the LM is the plain model"
        ),
      }
    }
  files.atomic_write_json(
    os.path.join(directory, CLS_META),
    {
      "format_version": FORMAT_VERSION,
      "cls_token": "[CLS]",
      "cls_token_id": cfg.cls_id,
      "cls_position": 0,
      "embedding": "cls_embedding is input-embedding row cls_token_id; the LM head keeps the base vocab",
      "head": "logit = cls_head.weight @ final_norm(h)[cls_position] + cls_head.bias; p(malicious) = sigmoid(logit)",
      "labels": {"0": "benign", "1": "malicious"},
      "threshold": threshold,
      "file": CLS_FILE,
      **side,
    },
    indent=2,
  )
  if tokenizer is not None:
    tokenizer.save_hf(directory)
    if chat_template is not None:
      path = os.path.join(directory, "tokenizer_config.json")
      with open(path, encoding="utf-8") as f:
        tok_config = json.load(f)
      tok_config["chat_template"] = chat_template
      files.atomic_write_json(path, tok_config, indent=2)


def jinja_chat_template(template, tokenizer) -> str:
  """A Jinja `chat_template` for tokenizer_config.json that renders `template` (a
  data.templates.ChatTemplate) as `encode_prompt` tokenises it, minus the leading [CLS]: a user
  turn is the template's prompt around the message (generation prompt included, as our templates
  end with the assistant header), an assistant turn is the response with its prefix, suffix and end
  token. Single-turn, as training: a system message (the template has its own) or a second user
  turn is refused rather than rendered in a format the model never saw."""

  def lit(text: str) -> str:
    # An expression, not raw text: HF renders with trim_blocks, which would eat a leading newline.
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

  def part(p) -> str:
    return lit(p.text(tokenizer)) if isinstance(p, Special) else lit(p)

  i = template.prompt.index(QUERY)
  before = "".join(part(p) for p in template.prompt[:i])
  after = "".join(part(p) for p in template.prompt[i + 1 :])
  end = part(template.end)
  return (
    f"{{#- {template.name} template written by clsalign_jax (data/templates.py); single-turn -#}}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'user' -%}\n"
    "{%- if loop.index0 > 0 -%}{{ raise_exception('this model was trained on single-turn chats: one user "
    "message, optionally followed by the assistant reply') }}{%- endif -%}\n"
    f"{before}{{{{ message['content'] }}}}{after}\n"
    "{%- elif message['role'] == 'assistant' -%}\n"
    f"{lit(template.response_prefix)}{{{{ message['content'] }}}}{lit(template.response_suffix)}{end}\n"
    "{%- else -%}\n"
    "{{ raise_exception('role ' + message['role'] + ' is not supported: the template has a fixed system "
    "prompt') }}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
  )


def _save_tensors(tensors: dict, path: str) -> None:
  with files.atomic_path(path) as tmp:
    safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"})
